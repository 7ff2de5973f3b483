"""Architecture facts derived from a model: layout, prunable weights, zeroing a mask."""

import copy

import pytest
import torch
from tests.conftest import tiny_model

from gisp.architectures import apply_mask, get_architecture, layout_of, zero_structures
from gisp.architectures.slicing import slim_model
from gisp.core.structures import Mask
from gisp.errors import GispError


def random_mask(layout, seed=0, p=0.4):
    g = torch.Generator().manual_seed(seed)
    m = Mask.dense(layout)
    for i in layout.prunable:
        m.heads[i] &= torch.rand(m.heads[i].shape, generator=g) > p
        m.channels[i] &= torch.rand(m.channels[i].shape, generator=g) > p
    return m


@pytest.mark.parametrize("arch,kv", [("llama", 4), ("qwen2", 2), ("qwen3", 2)])
def test_layout_matches_the_config(arch, kv):
    model = tiny_model(arch, kv)
    a = get_architecture(model)
    lay = layout_of(model, protect_first=0.25, protect_last=1)
    assert lay.protected == frozenset({0, lay.num_layers - 1})
    s = lay.layers[0]
    assert (s.num_heads, s.num_kv_heads, s.head_dim, s.intermediate) == (a.num_heads, a.num_kv_heads, a.head_dim,
                                                                         a.intermediate_size)
    assert s.qkv_bias == (arch == "qwen2")
    params = a.prunable_parameters(model, lay)
    assert len(params) == 7 * len(lay.prunable)


def test_incremental_mask_equals_a_full_apply():
    base = tiny_model("llama", 2)
    lay = layout_of(base)
    old = random_mask(lay, seed=1, p=0.2)
    new = old.clone()
    extra = random_mask(lay, seed=2, p=0.3)
    for i in range(lay.num_layers):
        new.heads[i] &= extra.heads[i]
        new.channels[i] &= extra.channels[i]
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    apply_mask(a, new)
    apply_mask(b, old)
    apply_mask(b, new, since=old)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_zero_structures_zeroes_exactly_the_owned_rows_and_columns():
    model = tiny_model("llama", 4)
    a = get_architecture(model)
    layer = a.layers(model)[1]
    att, mlp = a.attention(layer), a.mlp(layer)
    d = a.head_dim
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with torch.no_grad():
        zero_structures(att, mlp, d, torch.tensor([2]), torch.tensor([2]), torch.tensor([0, 5]))
    assert att.q.weight[2 * d:3 * d].abs().sum() == 0 and att.o.weight[:, 2 * d:3 * d].abs().sum() == 0
    assert att.k.weight[2 * d:3 * d].abs().sum() == 0 and att.v.weight[2 * d:3 * d].abs().sum() == 0
    assert mlp.gate.weight[[0, 5]].abs().sum() == 0 and mlp.down.weight[:, [0, 5]].abs().sum() == 0
    changed = sum(int((before[k] != v).sum()) for k, v in layer.state_dict().items())
    nonzero_removed = sum(int((t != 0).sum()) for t in (
        before["self_attn.q_proj.weight"][2 * d:3 * d], before["self_attn.k_proj.weight"][2 * d:3 * d],
        before["self_attn.v_proj.weight"][2 * d:3 * d], before["self_attn.o_proj.weight"][:, 2 * d:3 * d],
        before["mlp.gate_proj.weight"][[0, 5]], before["mlp.up_proj.weight"][[0, 5]],
        before["mlp.down_proj.weight"][:, [0, 5]]))
    assert changed == nonzero_removed  # nothing else was touched


def test_a_sliced_model_has_no_layout():
    base = tiny_model("llama", 2)
    mask = Mask.dense(layout_of(base))
    mask.heads[1][:] = False  # layer 1 loses its attention block
    slim = slim_model(base, mask)
    assert get_architecture(slim).attention(get_architecture(slim).layers(slim)[1]) is None
    with pytest.raises(GispError, match="already sliced"):
        layout_of(slim)
