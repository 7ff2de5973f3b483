"""Turning scores into masks: one global threshold, or the same ratio in every layer.

Global methods (GISP, one-shot, FLAP, the floors) rank all structures of all
unprotected layers in one list through :func:`gisp.core.ranking.select`, so their
sparsity lands within one structure below the target.

Local (uniform-ratio) methods (Wanda-sp, LLM-Pruner, OWL's per-layer ratios)
give every unprotected layer its own parameter budget. Within a layer the
lowest-scored ``round(ratio * heads)`` heads go first (fewer if they alone would
overshoot the budget) and channels fill the rest of the budget, so every
layer loses the same parameter fraction within one channel. Layers are then
topped up one channel at a time (largest shortfall first) until the next
channel would overshoot the *global* target, protected layers included: the
result is within one channel of the target and never above it.
"""

from __future__ import annotations

import torch

from gisp.core.importance import StructureScores
from gisp.core.ranking import apply_picks, select
from gisp.core.structures import Layout, Mask
from gisp.errors import GispError


def layer_params(mask: Mask, layout: Layout, i: int) -> int:
    """Linear parameters layer ``i`` keeps under ``mask``."""
    s = layout.layers[i]
    return s.params(int(mask.heads[i].sum()), int(mask.kv_heads(layout, i).sum()), int(mask.channels[i].sum()))


def global_masks(scores: StructureScores, layout: Layout, sparsities: list[float]) -> list[tuple[float, Mask]]:
    """Nested masks from one global ranking: each level continues the previous one."""
    mask, out = Mask.dense(layout), []
    for s in sorted(sparsities):
        mask = apply_picks(mask, select(scores, mask, layout, s))
        out.append((s, mask))
    return out


def layer_budgets(layout: Layout, target: float, ratios: dict[int, float] | None = None) -> dict[int, float]:
    """Parameters to remove per unprotected layer; never more than the global target in total.

    Without ``ratios`` every unprotected layer gets the same fraction, chosen so
    the whole model (protected layers included) reaches ``target``.
    """
    prunable = layout.prunable
    dense = {i: layout.layers[i].dense_params for i in prunable}
    total = target * layout.dense_params
    if ratios is None:
        r = total / sum(dense.values())
        if r >= 1.0:
            raise GispError(f"sparsity {target} needs more than the unprotected layers hold: protect fewer layers")
        ratios = {i: r for i in prunable}
    budgets = {i: min(max(ratios[i], 0.0), 1.0) * dense[i] for i in prunable}
    planned = sum(budgets.values())
    if planned > total:
        budgets = {i: b * total / planned for i, b in budgets.items()}
    return budgets


def channel_cost(mask: Mask, layout: Layout, i: int) -> int:
    """Parameters freed by removing one more channel of layer ``i``."""
    s = layout.layers[i]
    h, kv, c = int(mask.heads[i].sum()), int(mask.kv_heads(layout, i).sum()), int(mask.channels[i].sum())
    return s.params(h, kv, c) - s.params(h, kv, c - 1) if c else 0


def _lowest(scores: torch.Tensor, kept: torch.Tensor) -> list[int]:
    """Indices of kept structures, lowest score first (ties by index)."""
    idx = kept.nonzero().flatten()
    order = torch.sort(scores[idx].double(), stable=True).indices
    return idx[order].tolist()


def select_in_layer(head_scores: torch.Tensor, channel_scores: torch.Tensor, mask: Mask, layout: Layout, i: int,
                    budget: float) -> None:
    """Remove about ``budget`` parameters from layer ``i`` of ``mask`` (in place), never more.

    Heads and channels go at the same ratio: ``round(ratio * heads)`` heads (fewer
    if they would overshoot) and channels for the rest of the budget.
    """
    s = layout.layers[i]
    start = layer_params(mask, layout, i)
    ratio = budget / s.dense_params
    heads = _lowest(head_scores, mask.heads[i])
    k = min(round(ratio * s.num_heads), len(heads))
    while k > 0:
        trial = mask.heads[i].clone()
        trial[heads[:k]] = False
        probe = Mask([*mask.heads[:i], trial, *mask.heads[i + 1:]], mask.channels)
        if start - layer_params(probe, layout, i) <= budget + 1e-6:
            break
        k -= 1
    mask.heads[i][heads[:k]] = False
    removed = start - layer_params(mask, layout, i)
    for c in _lowest(channel_scores, mask.channels[i]):
        cost = channel_cost(mask, layout, i)
        if removed + cost > budget + 1e-6:
            break
        mask.channels[i][c] = False
        removed += cost


def top_up(channel_scores: list[torch.Tensor], mask: Mask, layout: Layout, target: float,
           budgets: dict[int, float], dense_mask: Mask | None = None) -> None:
    """Add channel removals, largest per-layer shortfall first, until the next would overshoot ``target``."""
    base = dense_mask or Mask.dense(layout)
    limit = (1.0 - target) * layout.dense_params
    kept = mask.kept_params(layout)
    removed = {i: layer_params(base, layout, i) - layer_params(mask, layout, i) for i in budgets}
    while True:
        open_layers = [i for i in budgets if mask.channels[i].any()]
        if not open_layers:
            return
        i = max(open_layers, key=lambda j: (budgets[j] - removed[j], -j))
        cost = channel_cost(mask, layout, i)
        if kept - cost < limit - 1e-6:
            return
        c = _lowest(channel_scores[i], mask.channels[i])[0]
        mask.channels[i][c] = False
        kept -= cost
        removed[i] += cost


def uniform_mask(scores: StructureScores, layout: Layout, target: float,
                 ratios: dict[int, float] | None = None) -> Mask:
    """Same parameter fraction per unprotected layer (or the given per-layer ratios), global target met."""
    budgets = layer_budgets(layout, target, ratios)
    mask = Mask.dense(layout)
    for i, b in budgets.items():
        select_in_layer(scores.heads[i], scores.channels[i], mask, layout, i, b)
    top_up(scores.channels, mask, layout, target, budgets)
    return mask


def layer_sparsities(mask: Mask, layout: Layout) -> list[float]:
    """Fraction of each layer's linear parameters removed."""
    return [1.0 - layer_params(mask, layout, i) / s.dense_params for i, s in enumerate(layout.layers)]
