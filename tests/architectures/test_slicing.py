"""Slicing plans: GQA groups, parameter counts, standard vs per-layer configs."""

import pytest
import torch
from tests.architectures.test_base import random_mask
from tests.conftest import tiny_model

from gisp.architectures import layout_of
from gisp.architectures.slicing import count_params, plan_layers, slim_config, slim_model
from gisp.core.structures import Mask
from gisp.errors import GispError


def test_uneven_groups_map_or_duplicate():
    base = tiny_model("llama", 2)  # 4 query heads in 2 KV groups of 2
    lay = layout_of(base)
    m = Mask.dense(lay)
    m.heads[1][1] = False  # groups keep 1 and 2 heads
    mapped = plan_layers(m, lay, "map")[1]
    assert mapped.heads == [0, 2, 3] and mapped.kv_heads == [0, 1] and mapped.kv_map == [0, 1, 1]
    dup = plan_layers(m, lay, "duplicate")[1]
    assert dup.kv_heads == [0, 1, 1] and dup.kv_map is None
    with pytest.raises(GispError, match="unknown --gqa"):
        plan_layers(m, lay, "split")


@pytest.mark.parametrize("arch,kv", [("llama", 2), ("qwen2", 4), ("qwen3", 2), ("mistral", 2)])
@pytest.mark.parametrize("gqa", ["map", "duplicate"])
def test_count_params_equals_the_sliced_model(arch, kv, gqa):
    base = tiny_model(arch, kv)
    lay = layout_of(base)
    m = random_mask(lay, seed=3, p=0.5)
    m.heads[1][:] = False  # a whole attention block
    m.channels[2][:] = False  # a whole MLP block
    slim = slim_model(base, m, gqa=gqa)
    assert count_params(base, lay, plan_layers(m, lay, gqa)) == sum(p.numel() for p in slim.parameters())


def test_uniform_widths_give_a_standard_config_else_per_layer():
    base = tiny_model("llama", 4)
    lay = layout_of(base)
    m = Mask.dense(lay)
    for i in range(lay.num_layers):
        m.heads[i][:2] = False  # 2 of 4 heads: standard configs want hidden divisible by the head count
        m.channels[i][:8] = False
    assert slim_config(base.config, plan_layers(m, lay)).model_type == "llama"
    m.channels[0][8] = False
    cfg = slim_config(base.config, plan_layers(m, lay))
    assert cfg.model_type == "gisp_llama"
    assert cfg.per_layer_config[0].intermediate_size == lay.layers[0].intermediate - 9
    assert torch.is_tensor(next(base.parameters()))
