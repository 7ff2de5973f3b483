"""Global ranking: choose which structures go next, across all layers at once."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gisp.importance import StructureScores
from gisp.structures import Layout, Mask

UNITS = ("params", "structures")


@dataclass(frozen=True)
class Pick:
    kind: str  # "head" or "channel"
    layer: int
    index: int


def ranked_candidates(scores: StructureScores, mask: Mask, layout: Layout) -> list[Pick]:
    """Kept structures of unprotected layers, least important first.

    Ties are broken by (layer, kind, index) so runs are reproducible.
    """
    vals, picks = [], []
    for i in layout.prunable:
        per_kind = (("head", scores.heads[i], mask.heads[i]), ("channel", scores.channels[i], mask.channels[i]))
        for kind, sc, kept in per_kind:
            idx = kept.nonzero().flatten()
            vals.append(sc[idx].double())
            picks.extend(Pick(kind, i, int(j)) for j in idx.tolist())
    if not picks:
        return []
    order = torch.sort(torch.cat(vals), stable=True).indices.tolist()
    return [picks[j] for j in order]


def select(
    scores: StructureScores, mask: Mask, layout: Layout, target: float, unit: str = "params"
) -> list[Pick]:
    """Remove the lowest-ranked structures until ``target`` is reached, never beyond it.

    ``unit='params'``: target is the parameter sparsity; stop at the first
    structure whose removal would overshoot, so the result lies within one
    structure below the target. ``unit='structures'``: target is the fraction of
    prunable structures removed (the reference code's schedule).
    """
    cands = ranked_candidates(scores, mask, layout)
    heads = [int(h.sum()) for h in mask.heads]
    kv_kept = [mask.kv_heads(layout, i).clone() for i in range(layout.num_layers)]
    group_left = [mask.heads[i].view(s.num_kv_heads, s.group_size).sum(1) for i, s in enumerate(layout.layers)]
    chans = [int(c.sum()) for c in mask.channels]
    if unit == "structures":
        total = layout.num_structures()
        already = total - sum(heads[i] + chans[i] for i in layout.prunable)
        budget = max(0, round(target * total) - already)
        return cands[:budget]
    dense = layout.dense_params
    kept = mask.kept_params(layout)
    limit = (1.0 - target) * dense
    chosen: list[Pick] = []
    for p in cands:
        s = layout.layers[p.layer]
        before = s.params(heads[p.layer], int(kv_kept[p.layer].sum()), chans[p.layer])
        if p.kind == "head":
            g = p.index // s.group_size
            kv_after = int(kv_kept[p.layer].sum()) - (1 if group_left[p.layer][g] == 1 else 0)
            after = s.params(heads[p.layer] - 1, kv_after, chans[p.layer])
        else:
            after = s.params(heads[p.layer], int(kv_kept[p.layer].sum()), chans[p.layer] - 1)
        if kept - (before - after) < limit - 1e-6:
            break
        kept -= before - after
        chosen.append(p)
        if p.kind == "head":
            heads[p.layer] -= 1
            group_left[p.layer][g] -= 1
            if group_left[p.layer][g] == 0:
                kv_kept[p.layer][g] = False
        else:
            chans[p.layer] -= 1
    return chosen


def apply_picks(mask: Mask, picks: list[Pick]) -> Mask:
    out = mask.clone()
    for p in picks:
        (out.heads if p.kind == "head" else out.channels)[p.layer][p.index] = False
    return out
