"""Magnitude floor: ``sum |w|`` per structure, normalised as GISP does, one global threshold.

A data-free floor every data-driven method should beat (FLAP's and Wanda's
papers report structured magnitude pruning as theirs; FLAP's
``prune_magnitude_sp`` uses per-column L2 norms with a uniform ratio). Here the
structure set, normalisation, protection and global ranking are exactly
GISP's, so the only difference from one-shot GISP is the score: weights only,
no gradient. Nested: one ranking serves every level.
"""

from __future__ import annotations

from torch import nn

from gisp.architectures import get_architecture
from gisp.baselines.base import MaskingMethod, Masks
from gisp.baselines.selection import global_masks
from gisp.core.calibration import CalibrationSet
from gisp.core.importance import MagnitudeImportance, normalize
from gisp.core.structures import Layout


class Magnitude(MaskingMethod):
    name = "magnitude"
    nested = True
    reference = "structured magnitude floor (cf. FLAP lib/prune.py prune_magnitude_sp); GISP's structures and norm"
    defaults = {"normalize": "params", "protect_first": 0.1, "protect_last": 1}

    def masks(self, model: nn.Module, calib: CalibrationSet | None, layout: Layout,
              sparsities: list[float]) -> Masks:
        raw = MagnitudeImportance().scores(model, layout, get_architecture(model))
        scores = normalize(raw, layout, self.opts["normalize"])
        return Masks(global_masks(scores, layout, sparsities))
