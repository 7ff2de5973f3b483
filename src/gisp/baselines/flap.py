"""FLAP: fluctuation-based adaptive structured pruning with bias compensation.

Follows FLAP (An et al., AAAI 2024; github CASIA-IVA-Lab/FLAP, lib/prune.py
``prune_flap`` with ``--metrics WIFV --structure AL-AM``, lib/layerwrapper.py
``BiasGPT``), all statistics from the dense model:

- fluctuation metric per input column ``j`` of the o/down projections:
  ``var_j(X) * ||W[:, j]||^2`` (variance of the column's input over calibration
  tokens times the squared column norm); for attention the code squares it;
- per-layer, per-module standardisation ``(x - mean) / std`` over the columns;
  a head scores the mean over its ``head_dim`` columns;
- one global threshold over all heads and channels of all layers, weighted by
  their parameter cost (adaptive widths: some layers lose much more);
- bias compensation: removed columns are replaced by their mean input, i.e.
  ``W[:, removed] @ mean_input[removed]`` becomes a bias of the o/down projections
  (:mod:`gisp.deploy.compensation`).

Deviations: the variance is the exact per-column variance over all tokens
(FLAP's running update normalises by samples, a constant factor that the
standardisation removes); the global cut is :func:`gisp.core.ranking.select` on
parameter sparsity (FLAP's cumulative compression weights 512/3 per head are
the same idea for Llama-7B); with GQA a query head is one structure and its KV
head goes once its group is empty (FLAP's code assumes MHA). All layers are
prunable by default, as in FLAP. The masks are nested (one ranking), the
compensation is computed per level.
"""

from __future__ import annotations

import torch
from torch import nn

from gisp.architectures import get_architecture
from gisp.baselines.activations import collect_input_stats
from gisp.baselines.base import MaskingMethod, Masks
from gisp.baselines.selection import global_masks
from gisp.core.calibration import CalibrationSet
from gisp.core.importance import StructureScores
from gisp.core.structures import Layout
from gisp.deploy.compensation import Compensation


def _standardise(x: torch.Tensor) -> torch.Tensor:
    std = x.std()
    return (x - x.mean()) / (std if std > 0 else 1.0)


def flap_scores(model: nn.Module, stats: dict) -> StructureScores:
    """Standardised fluctuation scores of every head and channel (dense statistics)."""
    arch = get_architecture(model)
    heads, channels = [], []
    for i, layer in enumerate(arch.layers(model)):
        o = arch.attention(layer).o.weight.detach().double().cpu()
        down = arch.mlp(layer).down.weight.detach().double().cpu()
        attn = (stats[f"{i}.o"].var * o.pow(2).sum(0)) ** 2
        mlp = stats[f"{i}.down"].var * down.pow(2).sum(0)
        heads.append(_standardise(attn).view(-1, arch.head_dim).mean(1))
        channels.append(_standardise(mlp))
    return StructureScores(heads, channels)


class FLAP(MaskingMethod):
    name = "flap"
    nested = True
    reference = "FLAP (AAAI 2024) github CASIA-IVA-Lab/FLAP lib/prune.py prune_flap, WIFV metric, AL-AM structure"
    defaults = {"protect_first": 0.0, "protect_last": 0, "bias": True, "batch_size": 8}

    def masks(self, model: nn.Module, calib: CalibrationSet | None, layout: Layout,
              sparsities: list[float]) -> Masks:
        stats = collect_input_stats(model, calib, self.opts["batch_size"])
        masks = global_masks(flap_scores(model, stats), layout, sparsities)
        comps = {}
        if self.opts["bias"]:
            attn_means = {i: stats[f"{i}.o"].mean for i in range(layout.num_layers)}
            mlp_means = {i: stats[f"{i}.down"].mean for i in range(layout.num_layers)}
            for s, mask in masks:
                comps[s] = Compensation.from_means(model, mask.heads, mask.channels, attn_means, mlp_means)
        return Masks(masks, compensations=comps)
