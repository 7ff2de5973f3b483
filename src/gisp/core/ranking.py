"""Global ranking: choose which structures go next, across all layers at once."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gisp.core.importance import StructureScores
from gisp.core.structures import Layout, Mask

UNITS = ("params", "structures")


@dataclass(frozen=True)
class Pick:
    kind: str  # "head" or "channel"
    layer: int
    index: int


@dataclass(frozen=True)
class _Ranked:
    """Candidates as parallel tensors in ranked order (no Python object per structure)."""

    is_head: torch.Tensor  # bool
    layer: torch.Tensor  # int64
    index: torch.Tensor  # int64

    def __len__(self) -> int:
        return len(self.layer)

    def picks(self, stop: int | None = None) -> list[Pick]:
        sl = slice(0, stop)
        return [Pick("head" if h else "channel", la, i) for h, la, i in
                zip(self.is_head[sl].tolist(), self.layer[sl].tolist(), self.index[sl].tolist())]


def _ranked(scores: StructureScores, mask: Mask, layout: Layout, first: int | None = None) -> _Ranked:
    """Kept structures of unprotected layers in stable ascending score order.

    Concatenation order is (layer, heads then channels, index), so the stable
    sort breaks ties by (layer, kind, index), as the reference loop did. With
    ``first``, only a prefix of at least that many is ranked: every score up to
    the ``first``-th smallest (ties included), which a stable sort of that subset
    orders exactly as the full sort would, at the cost of a selection, not a sort.
    """
    vals, seg_head, seg_layer, seg_index = [], [], [], []
    for i in layout.prunable:
        for head, sc, kept in ((True, scores.heads[i], mask.heads[i]), (False, scores.channels[i], mask.channels[i])):
            idx = kept.cpu().nonzero().flatten()
            if len(idx):
                vals.append(sc.detach().to("cpu", torch.float64).index_select(0, idx))
                seg_head.append(head)
                seg_layer.append(i)
                seg_index.append(idx)
    if not vals:
        empty = torch.zeros(0, dtype=torch.int64)
        return _Ranked(empty.bool(), empty, empty)
    flat = torch.cat(vals)
    order = None
    if first is not None and first < len(flat):
        v = torch.kthvalue(flat, max(first, 1)).values
        if not torch.isnan(v):
            sub = (flat <= v).nonzero().flatten()
            order = sub.index_select(0, torch.sort(flat.index_select(0, sub), stable=True).indices)
    if order is None:
        order = torch.sort(flat, stable=True).indices
    ends = torch.tensor([len(x) for x in vals], dtype=torch.int64).cumsum(0)
    seg = torch.searchsorted(ends, order, right=True)
    return _Ranked(torch.tensor(seg_head).index_select(0, seg),
                   torch.tensor(seg_layer, dtype=torch.int64).index_select(0, seg),
                   torch.cat(seg_index).index_select(0, order))


def ranked_candidates(scores: StructureScores, mask: Mask, layout: Layout) -> list[Pick]:
    """Kept structures of unprotected layers, least important first.

    Ties are broken by (layer, kind, index) so runs are reproducible.
    """
    return _ranked(scores, mask, layout).picks()


def _occurrence(keys: torch.Tensor) -> torch.Tensor:
    """For each element, how many earlier elements carry the same key (0 for the first)."""
    n = len(keys)
    order = torch.sort(keys, stable=True).indices
    sk = keys.index_select(0, order)
    pos = torch.arange(n)
    start = torch.ones(n, dtype=torch.bool)
    start[1:] = sk[1:] != sk[:-1]
    first = torch.cummax(torch.where(start, pos, torch.zeros_like(pos)), dim=0).values
    return torch.empty_like(pos).index_copy_(0, order, pos - first)


def _removal_costs(r: _Ranked, mask: Mask, layout: Layout) -> torch.Tensor:
    """Parameters each candidate frees if every earlier candidate was removed first.

    Differences of :meth:`LayerShape.params`: a head frees its q rows and o columns,
    plus its KV pair when it is the last kept head of its group, plus the o bias
    when it is the layer's last head; a channel frees its gate/up rows and down
    column (and their biases), plus the down bias when it is the last channel.
    """
    shapes = layout.layers

    def per_layer(fn) -> torch.Tensor:
        return torch.tensor([fn(s) for s in shapes], dtype=torch.int64)

    # every cost is a difference of the one parameter formula, LayerShape.params
    head_base = per_layer(lambda s: s.params(2, 0, 0) - s.params(1, 0, 0))
    head_last = per_layer(lambda s: 2 * s.params(1, 0, 0) - s.params(2, 0, 0))  # the o bias, with the last head
    kv_pair = per_layer(lambda s: s.params(0, 1, 0))
    chan_base = per_layer(lambda s: s.params(0, 0, 2) - s.params(0, 0, 1))
    chan_last = per_layer(lambda s: 2 * s.params(0, 0, 1) - s.params(0, 0, 2))  # the down bias, with the last one
    group = per_layer(lambda s: s.group_size)
    group_offset = torch.tensor([0] + [s.num_kv_heads for s in shapes], dtype=torch.int64).cumsum(0)
    heads_kept = torch.stack([h.cpu().sum() for h in mask.heads]).to(torch.int64)
    chans_kept = torch.stack([c.cpu().sum() for c in mask.channels]).to(torch.int64)
    group_left = torch.cat([mask.heads[i].cpu().view(s.num_kv_heads, s.group_size).sum(1)
                            for i, s in enumerate(shapes)]).to(torch.int64)

    lay, idx, head = r.layer, r.index, r.is_head

    def at(table: torch.Tensor, i: torch.Tensor) -> torch.Tensor:  # index_select: tensor[i] is slow on CPU
        return table.index_select(0, i)

    occ = _occurrence(lay * 2 + (~head).long())  # earlier picks of the same layer and kind
    last = torch.where(head, occ + 1 == at(heads_kept, lay), occ + 1 == at(chans_kept, lay))
    cost = torch.where(head, at(head_base, lay) + at(head_last, lay) * last,
                       at(chan_base, lay) + at(chan_last, lay) * last)
    hsel = head.nonzero().flatten()
    if len(hsel):
        hl = at(lay, hsel)
        gkey = at(group_offset, hl) + at(idx, hsel) // at(group, hl)
        empties = _occurrence(gkey) + 1 == at(group_left, gkey)
        cost.index_add_(0, hsel, at(kv_pair, hl) * empties)
    return cost


def select(
    scores: StructureScores, mask: Mask, layout: Layout, target: float, unit: str = "params"
) -> list[Pick]:
    """Remove the lowest-ranked structures until ``target`` is reached, never beyond it.

    ``unit='params'``: target is the parameter sparsity; stop at the first
    structure whose removal would overshoot, so the result lies within one
    structure below the target. ``unit='structures'``: target is the fraction of
    prunable structures removed (the reference code's schedule).

    Vectorised: a k-th-value selection bounds how many candidates can fit, one
    stable sort orders just those, each one's cost given the ones before it
    comes from cumulative counts per layer and KV group, and a cumulative sum
    finds the stop; no Python loop over candidates. Picks equal the original
    per-candidate loop's (tests/core/test_ranking_equivalence.py keeps it as the reference).
    """
    if unit == "structures":
        total = layout.num_structures()
        kept = sum(int(mask.heads[i].sum()) + int(mask.channels[i].sum()) for i in layout.prunable)
        budget = max(0, round(target * total) - (total - kept))
        return _ranked(scores, mask, layout, first=budget).picks(budget)
    if not layout.prunable:
        return []
    kept = mask.kept_params(layout)
    limit = (1.0 - target) * layout.dense_params - 1e-6
    # Extras (KV pairs, biases) only add to a candidate's cost, so at most this many fit under the budget:
    cheapest = min(min(s.params(2, 0, 0) - s.params(1, 0, 0), s.params(0, 0, 2) - s.params(0, 0, 1))
                   for i, s in enumerate(layout.layers) if i not in layout.protected)
    fit = int(max(0.0, kept - limit) // cheapest) + 2
    r = _ranked(scores, mask, layout, first=fit)
    if not len(r):
        return []
    remaining = kept - torch.cumsum(_removal_costs(r, mask, layout), dim=0)
    over = (remaining.double() < limit).nonzero()
    if len(over):
        return r.picks(int(over[0]))
    candidates = sum(int(mask.heads[i].sum()) + int(mask.channels[i].sum()) for i in layout.prunable)
    if len(r) < candidates:  # cannot happen: ``fit`` bounds the picks; guards the prefix shortcut
        raise AssertionError("ranking prefix too short")
    return r.picks()


def apply_picks(mask: Mask, picks: list[Pick]) -> Mask:
    """A new mask without the picked structures (one indexed write per layer and kind)."""
    out = mask.clone()
    groups: dict[tuple[str, int], list[int]] = {}
    for p in picks:
        groups.setdefault((p.kind, p.layer), []).append(p.index)
    for (kind, layer), idx in groups.items():
        (out.heads if kind == "head" else out.channels)[layer].index_fill_(0, torch.tensor(idx, dtype=torch.int64),
                                                                           False)
    return out
