"""Structure scores equal a brute-force autograd reference, for every architecture."""

import pytest
import torch
from tests.conftest import VARIANTS, random_calib, tiny_model

from gisp.architectures import get_architecture, layout_of
from gisp.core.importance import MagnitudeImportance, TaylorImportance, normalize
from gisp.core.objectives import LanguageModelling
from gisp.run.gradients import accumulate_gradients


def brute_force_scores(model, calib):
    """Mean loss over all samples in ONE batch, autograd, then explicit slices per structure."""
    ids = torch.stack(calib.samples)
    logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
    layers = model.model.layers
    weights = [m for layer in layers for m in (layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight,
                                             layer.self_attn.v_proj.weight, layer.self_attn.o_proj.weight,
                                             layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight,
                                             layer.mlp.down_proj.weight)]
    grads = torch.autograd.grad(loss, weights)
    g = dict(zip([id(w) for w in weights], grads))
    heads, channels = [], []
    for layer in layers:
        a, m = layer.self_attn, layer.mlp
        d = 16
        nh = a.q_proj.out_features // d
        mha = a.k_proj.out_features == a.q_proj.out_features
        hs = []
        for h in range(nh):
            r = slice(h * d, (h + 1) * d)
            s = (a.q_proj.weight[r] * g[id(a.q_proj.weight)][r]).abs().sum()
            s += (a.o_proj.weight[:, r] * g[id(a.o_proj.weight)][:, r]).abs().sum()
            if mha:
                s += (a.k_proj.weight[r] * g[id(a.k_proj.weight)][r]).abs().sum()
                s += (a.v_proj.weight[r] * g[id(a.v_proj.weight)][r]).abs().sum()
            hs.append(float(s.detach()))
        cs = []
        for c in range(m.gate_proj.out_features):
            s = (m.gate_proj.weight[c] * g[id(m.gate_proj.weight)][c]).abs().sum()
            s += (m.up_proj.weight[c] * g[id(m.up_proj.weight)][c]).abs().sum()
            s += (m.down_proj.weight[:, c] * g[id(m.down_proj.weight)][:, c]).abs().sum()
            cs.append(float(s.detach()))
        heads.append(torch.tensor(hs, dtype=torch.float64))
        channels.append(torch.tensor(cs, dtype=torch.float64))
    return heads, channels


@pytest.mark.parametrize("arch,kv", VARIANTS)
def test_taylor_scores_match_brute_force(arch, kv):
    model = tiny_model(arch, kv)
    calib = random_calib(n=7)
    layout = layout_of(model)  # no protection: every layer gets gradients
    for p in get_architecture(model).prunable_parameters(model, layout):
        p.requires_grad_(True)
    # uneven micro-batches (3+3+1) must give the same mean gradient as one big batch
    accumulate_gradients(model, LanguageModelling(), calib, batch_size=3)
    scores = TaylorImportance().scores(model, layout, get_architecture(model))
    ref_h, ref_c = brute_force_scores(model, calib)
    for i in range(layout.num_layers):
        torch.testing.assert_close(scores.heads[i], ref_h[i], rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(scores.channels[i], ref_c[i], rtol=1e-4, atol=1e-9)


def test_normalisation_modes():
    model = tiny_model("llama", 2)
    layout = layout_of(model)
    raw = MagnitudeImportance().scores(model, layout, get_architecture(model))
    s = layout.layers[0]
    p = normalize(raw, layout, "params")
    r = normalize(raw, layout, "reference")
    torch.testing.assert_close(p.heads[0], raw.heads[0] / (2 * 16 * 64))  # GQA: q rows + o columns
    torch.testing.assert_close(p.channels[0], raw.channels[0] / (3 * 64))
    torch.testing.assert_close(r.heads[0], raw.heads[0] / (4 * 16 * 64))
    torch.testing.assert_close(r.channels[0], raw.channels[0] / (3 * s.intermediate))
    assert normalize(raw, layout, "none") is raw


def test_only_prunable_weights_get_gradients():
    model = tiny_model("llama", 2)
    layout = layout_of(model, protect_first=0.25, protect_last=1)
    params = {id(p) for p in get_architecture(model).prunable_parameters(model, layout)}
    assert len(params) == 7 * 2  # 4 layers, first and last protected
    names = [n for n, p in model.named_parameters() if id(p) in params]
    assert all(".layers.1." in n or ".layers.2." in n for n in names)
    assert not any("embed" in n or "norm" in n or "lm_head" in n for n in names)
