"""Global ranking: lowest normalised scores go first, across layers, never beyond the target."""

import torch

from gisp.core.importance import StructureScores
from gisp.core.ranking import apply_picks, ranked_candidates, select
from gisp.core.structures import LayerShape, Layout, Mask


def setup(protected=frozenset()):
    s = LayerShape(num_heads=4, num_kv_heads=4, head_dim=8, hidden=32, intermediate=16)
    lay = Layout((s, s, s), protected)
    g = torch.Generator().manual_seed(0)
    scores = StructureScores([torch.rand(4, generator=g, dtype=torch.float64) for _ in range(3)],
                             [torch.rand(16, generator=g, dtype=torch.float64) for _ in range(3)])
    return lay, scores


def test_candidates_are_ranked_globally_lowest_first():
    lay, scores = setup()
    picks = ranked_candidates(scores, Mask.dense(lay), lay)
    values = [float((scores.heads if p.kind == "head" else scores.channels)[p.layer][p.index]) for p in picks]
    assert values == sorted(values)
    assert len(picks) == 3 * (4 + 16)


def test_select_stays_within_one_structure_below_the_target():
    lay, scores = setup()
    mask = Mask.dense(lay)
    for target in (0.1, 0.3, 0.55):
        new = apply_picks(mask, select(scores, mask, lay, target))
        assert new.sparsity(lay) <= target + 1e-9
        # one more candidate would overshoot
        nxt = ranked_candidates(scores, new, lay)[0]
        assert apply_picks(new, [nxt]).sparsity(lay) > target
        assert new.is_subset_of(mask)
        mask = new


def test_protected_layers_are_never_picked_and_structures_unit_counts_structures():
    lay, scores = setup(protected=frozenset({0}))
    picks = select(scores, Mask.dense(lay), lay, 0.25, unit="structures")
    assert picks and all(p.layer != 0 for p in picks)
    assert len(picks) == round(0.25 * lay.num_structures())


def test_a_removed_structure_is_not_picked_again():
    lay, scores = setup()
    first = select(scores, Mask.dense(lay), lay, 0.2)
    mask = apply_picks(Mask.dense(lay), first)
    again = select(scores, mask, lay, 0.4)
    assert not {(p.kind, p.layer, p.index) for p in first} & {(p.kind, p.layer, p.index) for p in again}
