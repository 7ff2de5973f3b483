"""OWL: outlier-weighted layer-wise sparsity, here on top of Wanda-sp.

Follows OWL (Yin et al., ICML 2024; github luuyin/OWL, lib/prune_all.py
``prune_wanda_outlier``): on the dense model, each layer's outlier ratio
``D_l`` is the fraction of Wanda scores ``|W_ij| * ||X_j||`` over all its linear
layers (q, k, v, o, gate, up, down) above ``M`` times the layer's mean score
(M = 5). The ratios are rescaled to ``[0, 2 * lambda]`` (lambda = 0.08),
centred on their mean and subtracted from the target, so layers with more
outliers keep more: per-layer sparsity = target - (D'_l - mean D'), i.e. within
about +-lambda of the target. Each layer is then pruned by Wanda-sp at its own
ratio (sequential, as OWL's pruning pass).

Deviations: OWL sets unstructured per-layer sparsity; here the ratio is the
layer's structured parameter ratio (heads and channels as in
:mod:`gisp.baselines.wanda_sp`), and the global parameter target is enforced
exactly (ratios are scaled down if clipping at 0 pushed their total above it,
then a one-channel top-up).
"""

from __future__ import annotations

import torch
from torch import nn

from gisp.architectures import get_architecture
from gisp.baselines.activations import collect_input_stats
from gisp.baselines.base import MaskingMethod, Masks
from gisp.baselines.wanda_sp import sequential_uniform_masks
from gisp.core.calibration import CalibrationSet
from gisp.core.structures import Layout


def outlier_ratios(model: nn.Module, layout: Layout, calib: CalibrationSet, batch_size: int, m: float,
                   ) -> dict[int, float]:
    """Per unprotected layer: fraction of ``|W| * ||X||`` entries above ``m`` x the layer mean (dense model)."""
    arch = get_architecture(model)
    stats = collect_input_stats(model, calib, batch_size, which=("q", "o", "gate", "down"))
    out = {}
    for i in layout.prunable:
        layer = arch.layers(model)[i]
        att, mlp = arch.attention(layer), arch.mlp(layer)
        pairs = [(att.q, "q"), (att.k, "q"), (att.v, "q"), (att.o, "o"), (mlp.gate, "gate"), (mlp.up, "gate"),
                 (mlp.down, "down")]
        metrics = [lin.weight.detach().float().cpu().abs() * stats[f"{i}.{key}"].mean_sq.sqrt().float()
                   for lin, key in pairs]
        total = sum(float(x.sum(dtype=torch.float64)) for x in metrics)
        count = sum(x.numel() for x in metrics)
        threshold = m * total / count
        out[i] = sum(int((x > threshold).sum()) for x in metrics) / count
    return out


def owl_layer_ratios(outliers: dict[int, float], layout: Layout, target: float, lam: float) -> dict[int, float]:
    """OWL's rule: layer sparsity = uniform ratio - (rescaled outlier ratio - its mean), clipped to [0, 1)."""
    prunable = sorted(outliers)
    dense = {i: layout.layers[i].dense_params for i in prunable}
    uniform = target * layout.dense_params / sum(dense.values())
    d = torch.tensor([outliers[i] for i in prunable], dtype=torch.float64)
    spread = float(d.max() - d.min())
    scaled = (d - d.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(d)
    shift = scaled - scaled.mean()
    return {i: float(min(max(uniform - float(sh), 0.0), 0.999)) for i, sh in zip(prunable, shift)}


class OWL(MaskingMethod):
    name = "owl"
    nested = False
    reference = "OWL (ICML 2024) github luuyin/OWL lib/prune_all.py prune_wanda_outlier, on FLAP's Wanda-sp"
    defaults = {"m": 5.0, "lam": 0.08, "protect_first": 0.0, "protect_last": 0, "sequential": True,
                "batch_size": 8}

    def masks(self, model: nn.Module, calib: CalibrationSet | None, layout: Layout,
              sparsities: list[float]) -> Masks:
        outliers = outlier_ratios(model, layout, calib, self.opts["batch_size"], self.opts["m"])
        masks, details = sequential_uniform_masks(
            model, layout, calib, sparsities, self.opts["batch_size"], self.opts["sequential"],
            ratios=lambda s: owl_layer_ratios(outliers, layout, s, self.opts["lam"]),
        )
        for d in details.values():
            d["outlier_ratios"] = outliers
        return Masks(masks, details=details)
