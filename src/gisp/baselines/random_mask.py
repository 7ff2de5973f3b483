"""Random floor: structures removed in a seeded random order, one global list.

What any method must beat to claim its scores carry information. Scores are
uniform random numbers (``torch.Generator`` seeded by ``seed``), so heads and
channels are drawn in proportion to their counts; sizes enter only through
the parameter budget.
Nested: one random order serves every level.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gisp.baselines.base import Level, Method, OnLevel, Timer, check_sparsities, masked_levels, model_info_of
from gisp.baselines.selection import global_masks
from gisp.calibration import CalibrationSet
from gisp.importance import StructureScores


class RandomFloor(Method):
    name = "random"
    nested = True
    reference = "random structured pruning floor (seeded), GISP's structures, protection and global ranking"
    defaults = {"seed": 0, "protect_first": 0.1, "protect_last": 1}

    def run(self, model: nn.Module, calib: CalibrationSet | None, sparsities: list[float], *,
            model_info: dict[str, Any] | None = None, run_dir: str | None = None, progress: bool = False,
            on_level: OnLevel | None = None) -> list[Level]:
        timer = Timer()
        layout = self.layout(model)
        sparsities = check_sparsities(sparsities, layout)
        info = model_info_of(model, model_info, layout)
        g = torch.Generator().manual_seed(int(self.opts["seed"]))
        scores = StructureScores(
            [torch.rand(s.num_heads, generator=g, dtype=torch.float64) for s in layout.layers],
            [torch.rand(s.intermediate, generator=g, dtype=torch.float64) for s in layout.layers],
        )
        levels = masked_levels(self, layout, global_masks(scores, layout, sparsities), model_info=info,
                               calib=calib, seconds=timer.seconds)
        for level in levels:
            if on_level:
                on_level(level)
        return levels
