"""Random floor: structures removed in a seeded random order, one global list.

What any method must beat to claim its scores carry information. Scores are
uniform random numbers (``torch.Generator`` seeded by ``seed``), so heads and
channels are drawn in proportion to their counts; sizes enter only through
the parameter budget.
Nested: one random order serves every level.
"""

from __future__ import annotations

import torch
from torch import nn

from gisp.baselines.base import MaskingMethod, Masks
from gisp.baselines.selection import global_masks
from gisp.core.calibration import CalibrationSet
from gisp.core.importance import StructureScores
from gisp.core.structures import Layout


class RandomFloor(MaskingMethod):
    name = "random"
    nested = True
    reference = "random structured pruning floor (seeded), GISP's structures, protection and global ranking"
    defaults = {"seed": 0, "protect_first": 0.1, "protect_last": 1}

    def masks(self, model: nn.Module, calib: CalibrationSet | None, layout: Layout,
              sparsities: list[float]) -> Masks:
        g = torch.Generator().manual_seed(int(self.opts["seed"]))
        scores = StructureScores(
            [torch.rand(s.num_heads, generator=g, dtype=torch.float64) for s in layout.layers],
            [torch.rand(s.intermediate, generator=g, dtype=torch.float64) for s in layout.layers],
        )
        return Masks(global_masks(scores, layout, sparsities))
