"""Layouts and masks as plain data: counts, sparsity, nesting, protection."""

import pytest
import torch

from gisp.core.structures import LayerShape, Layout, Mask, block_rows, protected_layers
from gisp.errors import GispError


def layout(kv: int = 2, layers: int = 4, protected: frozenset[int] = frozenset()) -> Layout:
    s = LayerShape(num_heads=4, num_kv_heads=kv, head_dim=8, hidden=32, intermediate=48)
    return Layout(tuple([s] * layers), protected)


def test_layer_params_formula_counts_every_projection():
    s = LayerShape(num_heads=4, num_kv_heads=2, head_dim=8, hidden=32, intermediate=48, qkv_bias=True, o_bias=True,
                   mlp_bias=True)
    q, kv, o = 4 * 8 * 32 + 32, 2 * (2 * 8 * 32 + 16), 32 * 32 + 32
    mlp = 3 * 48 * 32 + 2 * 48 + 32
    assert s.dense_params == q + kv + o + mlp
    assert s.params(0, 0, 0) == 0  # a layer that lost everything keeps no projection


def test_kv_head_goes_with_its_last_query_head():
    lay = layout(kv=2)
    m = Mask.dense(lay)
    m.heads[0][:1] = False
    assert m.kv_heads(lay, 0).tolist() == [True, True]
    m.heads[0][:2] = False
    assert m.kv_heads(lay, 0).tolist() == [False, True]


def test_sparsity_is_the_fraction_of_linear_parameters_removed():
    lay = layout()
    m = Mask.dense(lay)
    assert m.sparsity(lay) == 0.0 and m.kept_params(lay) == lay.dense_params
    for i in range(lay.num_layers):
        m.channels[i][:] = False
    mlp = 3 * 48 * 32 * lay.num_layers
    assert m.kept_params(lay) == lay.dense_params - mlp
    assert m.sparsity(lay) == pytest.approx(mlp / lay.dense_params)


def test_nesting():
    lay = layout()
    a = Mask.dense(lay)
    b = a.clone()
    b.channels[1][3] = False
    assert b.is_subset_of(a) and not a.is_subset_of(b)


def test_protected_layers_and_their_errors():
    assert protected_layers(10, 0.1, 1) == frozenset({0, 9})
    assert protected_layers(30, 0.1, 1) == frozenset({0, 1, 2, 29})
    with pytest.raises(GispError, match="protect-first"):
        protected_layers(10, 1.0, 1)
    with pytest.raises(GispError, match="protect-last"):
        protected_layers(10, 0.0, 10)
    with pytest.raises(GispError, match="every layer is protected"):
        protected_layers(2, 0.5, 1)


def test_layout_round_trips_through_a_dict():
    lay = layout(protected=frozenset({0, 3}))
    assert Layout.from_dict(lay.to_dict()) == lay
    assert lay.prunable == [1, 2]
    assert lay.num_structures() == 2 * (4 + 48)


def test_block_rows():
    assert block_rows([2, 0], 3).tolist() == [6, 7, 8, 0, 1, 2]
    assert block_rows(torch.tensor([], dtype=torch.long), 4).numel() == 0
