"""Wanda-sp: Wanda's |W| x ||X|| score on structures, the same ratio in every layer.

Follows FLAP's ``prune_wanda_sp`` (github CASIA-IVA-Lab/FLAP, lib/prune.py),
the structured Wanda baseline of the FLAP and GISP papers: for the o and
down projections, ``|W_ij| * ||X_j||_2`` (input column norm over calibration tokens),
averaged over output rows; a head scores the sum over its columns of the o projection, a
channel its column of the down projection; every layer loses the same fraction of heads
and channels; layers are processed in order and each layer's statistics are
taken on the output of the already-pruned layers before it (sequential).

Deviations: the ratio is a parameter ratio per layer (heads at
``round(ratio * heads)``, channels filling the layer's parameter budget, then a
one-channel-per-layer top-up to meet the global parameter target exactly; see
:mod:`gisp.baselines.selection`), instead of FLAP's ``int(ratio * n)`` per
module; all layers are pruned by default, as in FLAP's code. With GQA a query
head goes with its o-projection columns, and its KV head when its group is empty.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gisp.architectures import apply_mask, get_architecture
from gisp.baselines.activations import LayerwiseRunner, collect_input_stats, input_hooks, projection_inputs
from gisp.baselines.base import MaskingMethod, Masks, WeightSnapshot
from gisp.baselines.selection import layer_budgets, select_in_layer, top_up
from gisp.core.calibration import CalibrationSet
from gisp.core.structures import Layout, Mask

RatioFn = Callable[[float], dict[int, float] | None]


def wanda_layer_scores(model: nn.Module, i: int, o_meansq: torch.Tensor, down_meansq: torch.Tensor,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Head and channel scores of layer ``i``: mean over rows of ``|W| * sqrt(mean x^2)`` per input column."""
    arch = get_architecture(model)
    layer = arch.layers(model)[i]
    o = arch.attention(layer).o.weight.detach().double().cpu()
    down = arch.mlp(layer).down.weight.detach().double().cpu()
    col_o = (o.abs() * o_meansq.sqrt()).mean(0)
    col_down = (down.abs() * down_meansq.sqrt()).mean(0)
    return col_o.view(-1, arch.head_dim).sum(1), col_down


def sequential_uniform_masks(model: nn.Module, layout: Layout, calib: CalibrationSet, sparsities: list[float],
                             batch_size: int, sequential: bool = True, ratios: RatioFn | None = None,
                             ) -> tuple[list[tuple[float, Mask]], dict[float, Any]]:
    """Wanda-sp masks at every sparsity; ``ratios(s)`` gives per-layer ratios (OWL) or None (uniform).

    The model's weights are restored between levels and left masked at the last one.
    """
    snapshot = WeightSnapshot(model)
    runner = LayerwiseRunner(model, calib, batch_size) if sequential else None
    start = list(runner.hidden) if runner else []
    dense_stats = None if sequential else collect_input_stats(model, calib, batch_size)
    out, details = [], {}
    for s in sparsities:
        snapshot.restore()
        per_layer = ratios(s) if ratios else None
        budgets = layer_budgets(layout, s, per_layer)
        mask = Mask.dense(layout)
        channel_scores = [torch.zeros(c.numel(), dtype=torch.float64) for c in mask.channels]
        if runner:
            runner.hidden = list(start)
        for i in range(layout.num_layers):
            if i not in budgets:  # protected: only pass the hidden states on
                if runner:
                    runner.advance(i)
                continue
            if runner:
                with input_hooks(projection_inputs(model, [i])) as st:
                    runner.run(i)
            else:
                st = dense_stats
            hs, cs = wanda_layer_scores(model, i, st[f"{i}.o"].mean_sq, st[f"{i}.down"].mean_sq)
            channel_scores[i] = cs
            select_in_layer(hs, cs, mask, layout, i, budgets[i])
            apply_mask(model, mask)
            if runner:
                runner.advance(i)
        top_up(channel_scores, mask, layout, s, budgets)
        apply_mask(model, mask)
        out.append((s, mask))
        details[s] = {"layer_ratios": {i: r for i, r in (per_layer or {}).items()}} if per_layer else {}
    return out, details


class WandaSP(MaskingMethod):
    name = "wanda-sp"
    nested = False
    reference = "FLAP (AAAI 2024) lib/prune.py prune_wanda_sp, github CASIA-IVA-Lab/FLAP; Wanda, locuslab/wanda"
    defaults = {"protect_first": 0.0, "protect_last": 0, "sequential": True, "batch_size": 8}

    def masks(self, model: nn.Module, calib: CalibrationSet | None, layout: Layout,
              sparsities: list[float]) -> Masks:
        masks, _ = sequential_uniform_masks(model, layout, calib, sparsities, self.opts["batch_size"],
                                            self.opts["sequential"])
        return Masks(masks)
