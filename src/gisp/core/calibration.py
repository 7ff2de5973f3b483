"""Calibration sets: the samples an objective's gradient is averaged over."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

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

    def fingerprint(self) -> str:
        """SHA-256 of the samples' tokens (every tensor's dtype, shape and values, in order).

        A resumed run compares it with the one its trajectory recorded: the same settings on a changed
        calibration file give other tokens, hence another run.
        """
        h = hashlib.sha256()
        _hash_into(h, self.samples)
        return h.hexdigest()


def _hash_into(h: Any, obj: Any) -> None:
    """Feed ``obj`` (tensors, dataclasses, mappings, sequences, scalars) into ``h`` unambiguously."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        h.update(f"D{type(obj).__name__}(".encode())
        for f in dataclasses.fields(obj):
            h.update(f"{f.name}=".encode())
            _hash_into(h, getattr(obj, f.name))
        h.update(b")")
    elif isinstance(obj, Mapping):
        h.update(b"M{")
        for k in sorted(obj, key=repr):
            h.update(f"{k!r}:".encode())
            _hash_into(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}[".encode())
        for x in obj:
            _hash_into(h, x)
        h.update(b"]")
    else:
        h.update(f"S{obj!r};".encode())


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
