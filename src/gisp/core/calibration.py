"""Calibration sets: the samples an objective's gradient is averaged over."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gisp.core.data import random_windows, token_stream
from gisp.core.objectives import load_providers
from gisp.errors import GispError


@dataclass
class CalibrationSet:
    """Samples in the form the objective's ``collate`` expects, and where they came from."""

    samples: list[Any]
    provenance: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.samples)


Builder = Callable[[str, Any, int, int, int], CalibrationSet]
_BUILDERS: dict[str, Builder] = {}


def register_calibration(objective: str) -> Callable[[Builder], Builder]:
    """Register how calibration samples are built for an objective."""

    def deco(fn: Builder) -> Builder:
        _BUILDERS[objective] = fn
        return fn

    return deco


@register_calibration("lm")
def text_windows(source: str, tokenizer, samples: int, seq_len: int, seed: int) -> CalibrationSet:
    """Seeded random windows from the calibration part of a text source."""
    stream, src = token_stream(source, "calib", tokenizer)
    windows = random_windows(stream, samples, seq_len, seed)
    prov = {**src.to_dict(), "samples": samples, "seq_len": seq_len, "seed": seed,
            "sampling": "random windows of seq_len tokens over the EOS-joined calibration part"}
    return CalibrationSet(list(windows), prov)


def build_calibration(objective: str, source: str, tokenizer, samples: int, seq_len: int, seed: int) -> CalibrationSet:
    if objective not in _BUILDERS:
        load_providers()
    if objective not in _BUILDERS:
        raise GispError(f"no calibration data is defined for objective '{objective}'")
    return _BUILDERS[objective](source, tokenizer, samples, seq_len, seed)
