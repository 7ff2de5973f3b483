"""Magnitude floor: ``sum |w|`` per structure, normalised as GISP does, one global threshold.

A data-free floor every data-driven method should beat (FLAP's and Wanda's
papers report structured magnitude pruning as theirs; FLAP's
``prune_magnitude_sp`` uses per-column L2 norms with a uniform ratio). Here the
structure set, normalisation, protection and global ranking are exactly
GISP's, so the only difference from one-shot GISP is the score: weights only,
no gradient. Nested: one ranking serves every level.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from gisp.baselines.base import Level, Method, OnLevel, Timer, check_sparsities, masked_levels, model_info_of
from gisp.baselines.selection import global_masks
from gisp.calibration import CalibrationSet
from gisp.importance import MagnitudeImportance, normalize


class Magnitude(Method):
    name = "magnitude"
    nested = True
    reference = "structured magnitude floor (cf. FLAP lib/prune.py prune_magnitude_sp); GISP's structures and norm"
    defaults = {"normalize": "params", "protect_first": 0.1, "protect_last": 1}

    def run(self, model: nn.Module, calib: CalibrationSet | None, sparsities: list[float], *,
            model_info: dict[str, Any] | None = None, run_dir: str | None = None, progress: bool = False,
            on_level: OnLevel | None = None) -> list[Level]:
        timer = Timer()
        layout = self.layout(model)
        sparsities = check_sparsities(sparsities, layout)
        info = model_info_of(model, model_info, layout)
        scores = normalize(MagnitudeImportance().scores(model, layout), layout, self.opts["normalize"])
        levels = masked_levels(self, layout, global_masks(scores, layout, sparsities), model_info=info,
                               calib=calib, seconds=timer.seconds)
        for level in levels:
            if on_level:
                on_level(level)
        return levels
