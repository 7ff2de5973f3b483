"""The vectorised selection and incremental masking equal the reference loops they replaced."""

from __future__ import annotations

import random

import torch
from tests.conftest import tiny_model

from gisp.architectures import apply_mask, layout_of
from gisp.core.importance import StructureScores
from gisp.core.ranking import Pick, apply_picks, ranked_candidates, select
from gisp.core.structures import LayerShape, Layout, Mask


# --- vectorised selection and masking equal the reference loops -----------------------------------------------
def reference_select(scores, mask, layout, target, unit="params"):
    """The original per-candidate loop (gisp 0.1.0), kept as the behavioural reference."""
    vals, picks = [], []
    for i in layout.prunable:
        for kind, sc, kept in (("head", scores.heads[i], mask.heads[i]), ("channel", scores.channels[i],
                                                                          mask.channels[i])):
            idx = kept.nonzero().flatten()
            vals.append(sc[idx].double())
            picks.extend(Pick(kind, i, int(j)) for j in idx.tolist())
    cands = [picks[j] for j in torch.sort(torch.cat(vals), stable=True).indices.tolist()] if picks else []
    heads = [int(h.sum()) for h in mask.heads]
    kv_kept = [mask.kv_heads(layout, i).clone() for i in range(layout.num_layers)]
    group_left = [mask.heads[i].view(s.num_kv_heads, s.group_size).sum(1) for i, s in enumerate(layout.layers)]
    chans = [int(c.sum()) for c in mask.channels]
    if unit == "structures":
        total = layout.num_structures()
        already = total - sum(heads[i] + chans[i] for i in layout.prunable)
        return cands, cands[:max(0, round(target * total) - already)]
    kept, limit, chosen = mask.kept_params(layout), (1.0 - target) * layout.dense_params, []
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
    return cands, chosen


def _random_case(rng: random.Random, seed: int):
    layers = rng.randint(2, 5)
    kv, group = rng.choice([1, 2, 4]), rng.choice([1, 2, 3])
    shapes = tuple(LayerShape(kv * group, kv, rng.choice([2, 4]), rng.choice([8, 16]), rng.randint(1, 12),
                              rng.random() < 0.5, rng.random() < 0.5, rng.random() < 0.5) for _ in range(layers))
    protected = frozenset(i for i in range(layers) if rng.random() < 0.3)
    layout = Layout(shapes, protected if len(protected) < layers else frozenset())
    g = torch.Generator().manual_seed(seed)
    levels = rng.choice([0, 3, 1000])  # few levels: many ties

    def sc(n):
        x = torch.rand(n, generator=g, dtype=torch.float64)
        return (x * levels).round() if levels else x

    scores = StructureScores([sc(s.num_heads) for s in shapes], [sc(s.intermediate) for s in shapes])
    mask = Mask.dense(layout)
    for i, s in enumerate(shapes):
        mask.heads[i] &= torch.rand(s.num_heads, generator=g) > rng.random() * 0.8
        mask.channels[i] &= torch.rand(s.intermediate, generator=g) > rng.random() * 0.8
    return layout, scores, mask


def test_vectorised_select_equals_reference_loop():
    rng = random.Random(0)
    for case in range(150):
        layout, scores, mask = _random_case(rng, case)
        for unit in ("params", "structures"):
            for target in (0.0, rng.random(), rng.random(), 0.999):
                cands, ref = reference_select(scores, mask, layout, target, unit)
                got = select(scores, mask, layout, target, unit)
                assert got == ref, (case, unit, target)
                assert apply_picks(mask, got).kept_params(layout) == apply_picks(mask, ref).kept_params(layout)
        assert ranked_candidates(scores, mask, layout) == cands


def test_incremental_apply_equals_full_apply():
    rng = random.Random(1)
    for seed in range(4):
        model = tiny_model("qwen2", kv_heads=2 if seed % 2 else 4, seed=seed)  # qwen2: q/k/v biases too
        layout = layout_of(model)
        scores = StructureScores([torch.rand(s.num_heads, dtype=torch.float64) for s in layout.layers],
                                 [torch.rand(s.intermediate, dtype=torch.float64) for s in layout.layers])
        old = apply_picks(Mask.dense(layout), select(scores, Mask.dense(layout), layout, rng.random() * 0.4))
        new = apply_picks(old, select(scores, old, layout, 0.4 + rng.random() * 0.5))
        a, b = tiny_model("qwen2", kv_heads=2 if seed % 2 else 4, seed=seed), model
        apply_mask(a, new)
        apply_mask(b, old)
        apply_mask(b, new, since=old)
        for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(pa, pb), name
