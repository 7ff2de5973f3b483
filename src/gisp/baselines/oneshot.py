"""One-shot global Taylor pruning: GISP with a single step.

The paper's ablation (``docs/method.md``: one-shot collapses at 50%, WikiText-2
ppl 159 vs 64 for Llama-2-7B). Gradients of the mean calibration loss are
accumulated once on the dense model, structures are scored ``sum |w * g|``,
normalised as GISP does and cut at one global threshold. Because the scores
come from the dense model only, the masks at rising sparsity are prefixes of
one ranking, so every level equals ``gisp.prune(..., steps=1, target=s)`` and
one gradient pass serves them all.
"""

from __future__ import annotations

from torch import nn

from gisp.architectures import get_architecture
from gisp.baselines.base import MaskingMethod, Masks
from gisp.baselines.selection import global_masks
from gisp.core.calibration import CalibrationSet
from gisp.core.importance import StructureScores, TaylorImportance, normalize
from gisp.core.objectives import get_objective
from gisp.core.structures import Layout
from gisp.run.gradients import accumulate_gradients, restore_grad_dtype


def taylor_scores(model: nn.Module, layout: Layout, calib: CalibrationSet, batch_size: int,
                  autocast: str = "none") -> StructureScores:
    """Raw ``sum |w * dL/dw|`` per structure, gradients of the mean calibration loss on the model as it is."""
    arch = get_architecture(model)
    params = arch.prunable_parameters(model, layout)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        model.zero_grad(set_to_none=True)
        accumulate_gradients(model, get_objective("lm"), calib, batch_size, autocast)
        return TaylorImportance().scores(model, layout, arch)
    finally:
        for p in model.parameters():
            p.requires_grad_(False)
        model.zero_grad(set_to_none=True)
        restore_grad_dtype(model)  # bf16 weights got fp32 gradients for the accumulation: undo


class OneShot(MaskingMethod):
    name = "oneshot"
    nested = True
    reference = "GISP paper's one-shot ablation (arXiv 2510.18030): gisp.prune with steps=1"
    defaults = {"normalize": "params", "protect_first": 0.1, "protect_last": 1, "autocast": "none", "batch_size": 8}

    def masks(self, model: nn.Module, calib: CalibrationSet | None, layout: Layout,
              sparsities: list[float]) -> Masks:
        raw = taylor_scores(model, layout, calib, self.opts["batch_size"], self.opts["autocast"])
        masks = global_masks(normalize(raw, layout, self.opts["normalize"]), layout, sparsities)
        return Masks(masks)
