"""Every baseline on tiny models: on target, uniform where it should be, nested where it claims, exact units."""

import pytest
import torch
from tests.conftest import one_thread_fixture, random_calib, tiny_model

import gisp
from gisp.architectures import apply_mask, layout_of
from gisp.baselines import METHODS, get_method
from gisp.baselines.activations import LayerwiseRunner, block_influence
from gisp.baselines.owl import owl_layer_ratios
from gisp.baselines.selection import layer_sparsities, uniform_mask
from gisp.core.calibration import CalibrationSet
from gisp.core.importance import StructureScores

LEVELS = [0.2, 0.3, 0.4, 0.5]
MASKING = [m for m in METHODS if not m.startswith("torch-pruning") and METHODS[m].objective == "lm"]  # lm windows
OPTS = {"gisp": {"steps": 10}}  # 10 linear steps to 0.5 stop at every level


one_thread = one_thread_fixture("module")


def run(name, kv=2, layers=4, levels=LEVELS, **opts):
    model = tiny_model("llama", kv, layers=layers)
    return model, get_method(name, **{**OPTS.get(name, {}), **opts}).run(model, random_calib(), levels)


def largest_structure(layout):
    """Parameters of the biggest single removal: a head (with its KV group when it is the last one)."""
    return max(max(s.params(1, 1, 0), s.params(0, 0, 1)) for s in layout.layers)


@pytest.mark.parametrize("kv", [2, 4])
@pytest.mark.parametrize("name", MASKING)
def test_on_target_within_one_structure(name, kv):
    if name == "gisp" and kv == 4:
        pytest.skip("GISP's own targets are tested in tests/run/test_loop.py; one variant keeps this file fast")
    model, levels = run(name, kv)
    layout = layout_of(model)
    # ShortGPT removes whole layers: within one layer; everything else within one structure
    slack = layout.layers[0].dense_params if name == "shortgpt" else largest_structure(layout)
    assert [lv.requested for lv in levels] == LEVELS
    for lv in levels:
        assert lv.sparsity == pytest.approx(lv.mask.sparsity(layout))
        assert lv.requested - slack / layout.dense_params - 1e-9 <= lv.sparsity <= lv.requested + 1e-9, name
        assert lv.trajectory.mask_at_step(lv.step).heads[1].equal(lv.mask.heads[1])


@pytest.mark.parametrize("name", ["wanda-sp", "llm-pruner"])
def test_uniform_methods_have_equal_layer_ratios(name):
    model, levels = run(name, kv=2, layers=5)
    layout = layout_of(model)
    method = get_method(name)
    pruned = method.layout(model).prunable
    channel = 3 * layout.layers[0].hidden / layout.layers[0].dense_params
    for lv in levels:
        ratios = [layer_sparsities(lv.mask, layout)[i] for i in pruned]
        assert max(ratios) - min(ratios) <= 2 * channel + 1e-9, (lv.requested, ratios)
        for i in set(range(layout.num_layers)) - set(pruned):
            assert lv.mask.heads[i].all() and lv.mask.channels[i].all()


def test_llm_pruner_keeps_its_layer_range():
    model = tiny_model("llama", 2, layers=8)
    layout = get_method("llm-pruner").layout(model)
    assert layout.protected == {0, 7}  # 4/32 of 8 layers first, 2/32 of 8 rounded up to one last


def test_uniform_selection_helper_meets_global_target_and_ratios():
    layout = layout_of(tiny_model("llama", 2, layers=6), protect_first=0.2, protect_last=1)
    g = torch.Generator().manual_seed(0)
    scores = StructureScores([torch.rand(s.num_heads, generator=g) for s in layout.layers],
                             [torch.rand(s.intermediate, generator=g) for s in layout.layers])
    channel = 3 * layout.layers[0].hidden
    for target in (0.1, 0.33, 0.6):
        mask = uniform_mask(scores, layout, target)
        assert target - channel / layout.dense_params - 1e-9 <= mask.sparsity(layout) <= target + 1e-9
        ratios = [layer_sparsities(mask, layout)[i] for i in layout.prunable]
        assert max(ratios) - min(ratios) <= 2 * channel / layout.layers[0].dense_params + 1e-9
        # heads go at the same ratio as the layer (rounded), channels fill the rest
        for i in layout.prunable:
            assert abs(int((~mask.heads[i]).sum()) - round(ratios[0] * 4)) <= 1


@pytest.mark.parametrize("name", [m for m in MASKING if METHODS[m].nested])
def test_nested_methods_produce_nested_masks(name):
    _, levels = run(name, kv=2)
    traj = levels[0].trajectory
    assert all(lv.trajectory is traj for lv in levels), "one run, one trajectory"
    for a, b in zip(levels, levels[1:]):
        assert b.mask.is_subset_of(a.mask) and b.sparsity >= a.sparsity


def test_oneshot_equals_gisp_with_one_step():
    _, levels = run("oneshot", kv=2)
    for lv in levels:
        model = tiny_model("llama", 2)
        cfg = gisp.PruneConfig(target=lv.requested, steps=1, protect_first=0.1, protect_last=1, batch_size=8)
        traj = gisp.prune(model, cfg, random_calib(), progress=False)
        ref = traj.mask_at_step(1)
        assert all(a.equal(b) for a, b in zip(ref.heads, lv.mask.heads))
        assert all(a.equal(b) for a, b in zip(ref.channels, lv.mask.channels))


def test_random_floor_is_seeded():
    _, a = run("random", seed=3)
    _, b = run("random", seed=3)
    _, c = run("random", seed=4)
    assert all(x.equal(y) for x, y in zip(a[-1].mask.channels, b[-1].mask.channels))
    assert not all(x.equal(y) for x, y in zip(a[-1].mask.channels, c[-1].mask.channels))


def test_flap_compensation_restores_output_at_mean_input():
    """W_masked x + b == W_dense x whenever the removed columns see their mean input (the formula, per module)."""
    model, levels = run("flap", kv=2, levels=[0.4])
    lv = levels[0]
    comp = lv.compensation
    assert comp.attn or comp.mlp
    dense, masked = tiny_model("llama", 2), tiny_model("llama", 2)
    apply_mask(masked, lv.mask)
    handle = gisp.baselines.apply_compensation(masked, comp)
    d = 16
    g = torch.Generator().manual_seed(1)
    for i in comp.mlp:
        gone = ~lv.mask.channels[i]
        mean = torch.randn(96, generator=g)  # any mean works: recompute the bias for it
        from gisp.deploy.compensation import Compensation

        c2 = Compensation.from_means(dense, lv.mask.heads, lv.mask.channels, {}, {i: mean})
        x = torch.randn(5, 96, generator=g)
        x[:, gone] = mean[gone]
        want = dense.model.layers[i].mlp.down_proj(x)
        got = masked.model.layers[i].mlp.down_proj.weight @ x.T
        torch.testing.assert_close(got.T + c2.mlp[i], want, rtol=1e-5, atol=1e-5)
    for i in comp.attn:
        cols = (~lv.mask.heads[i]).repeat_interleave(d)
        x = torch.randn(5, 64, generator=g)
        mean = torch.randn(64, generator=g)
        x[:, cols] = mean[cols]
        from gisp.deploy.compensation import Compensation

        c2 = Compensation.from_means(dense, lv.mask.heads, lv.mask.channels, {i: mean}, {})
        torch.testing.assert_close(masked.model.layers[i].self_attn.o_proj.weight @ x.T + c2.attn[i][:, None],
                                   dense.model.layers[i].self_attn.o_proj(x).T, rtol=1e-5, atol=1e-5)
    # the hooks add the stored vectors to the masked modules' outputs
    i = next(iter(comp.mlp))
    x = torch.randn(2, 96)
    torch.testing.assert_close(masked.model.layers[i].mlp.down_proj(x),
                               x @ masked.model.layers[i].mlp.down_proj.weight.T + comp.mlp[i])
    handle.remove()
    down = masked.model.layers[i].mlp.down_proj
    torch.testing.assert_close(down(x), x @ down.weight.T)


def test_compensation_roundtrip(tmp_path):
    _, levels = run("flap", kv=2, levels=[0.3])
    comp = levels[0].compensation
    comp.save(tmp_path)
    back = gisp.baselines.Compensation.load(tmp_path)
    assert set(back.attn) == set(comp.attn) and set(back.mlp) == set(comp.mlp)
    for i in comp.mlp:
        assert back.mlp[i].equal(comp.mlp[i]) and back.bias_for(i, "down").equal(comp.mlp[i])


def test_shortgpt_removes_lowest_influence_layers_exactly():
    model, levels = run("shortgpt", kv=2, layers=6, levels=[0.3])
    fresh = tiny_model("llama", 2, layers=6)
    bi = block_influence(fresh, random_calib(), 8)
    gone = [i for i in range(6) if not levels[0].mask.heads[i].any()]
    assert len(gone) == 1 and all(not levels[0].mask.channels[i].any() for i in gone)
    assert bi[gone[0]] == min(bi)
    # a fully masked layer is the identity: same logits as deleting it
    ids = torch.randint(0, 97, (2, 12))
    masked = tiny_model("llama", 2, layers=6)
    apply_mask(masked, levels[0].mask)
    deleted = tiny_model("llama", 2, layers=6)
    deleted.model.layers = torch.nn.ModuleList([m for i, m in enumerate(deleted.model.layers) if i not in gone])
    deleted.config.num_hidden_layers = 5
    with torch.no_grad():
        torch.testing.assert_close(masked(input_ids=ids, use_cache=False).logits,
                                   deleted(input_ids=ids, use_cache=False).logits, rtol=1e-5, atol=1e-5)


def test_layerwise_runner_replays_the_model():
    model = tiny_model("qwen2", 2)
    runner = LayerwiseRunner(model, random_calib(n=6), batch_size=4)
    for i in range(4):
        runner.advance(i)
    seen = []
    h = model.model.norm.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    with torch.no_grad():
        for ids in (torch.stack(random_calib(n=6).samples[:4]), torch.stack(random_calib(n=6).samples[4:])):
            model(input_ids=ids, use_cache=False)
    h.remove()
    for a, b in zip(runner.hidden, seen):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_owl_ratios_follow_outliers():
    layout = layout_of(tiny_model("llama", 2, layers=5))
    outliers = {0: 0.01, 1: 0.05, 2: 0.02, 3: 0.03, 4: 0.04}
    r = owl_layer_ratios(outliers, layout, 0.4, 0.08)
    assert sum(r.values()) / 5 == pytest.approx(0.4)
    assert max(r.values()) - min(r.values()) == pytest.approx(0.16)  # spread 2 * lambda
    order = sorted(outliers, key=outliers.get)
    assert [r[i] for i in order] == sorted(r.values(), reverse=True)  # more outliers, less pruning


def test_torch_pruning_row_slices_physically():
    pytest.importorskip("torch_pruning")
    for kv in (4, 2):
        model = tiny_model("llama", kv)
        ids = torch.randint(0, 97, (1, 10))
        levels = get_method("torch-pruning").run(model, random_calib(), [0.25, 0.5])
        for lv in levels:
            assert lv.model is not None and abs(lv.sparsity - lv.requested) < 0.02
            with torch.no_grad():
                assert lv.model(input_ids=ids, use_cache=False).logits.shape == (1, 10, 97)
            if kv == 2:  # GQA: attention untouched, MLP only
                assert lv.details["heads_per_layer"] == [4] * 4 and "MLP channels only" in lv.details["pruned"]
            else:
                assert min(lv.details["heads_per_layer"]) < 4
        assert model.model.layers[0].mlp.gate_proj.out_features == 96  # the caller's model is untouched
    taylor = get_method("torch-pruning-taylor").run(tiny_model("llama", 2), random_calib(), [0.3])[0]
    assert abs(taylor.sparsity - 0.3) < 0.02 and taylor.details["plan"]["heads_per_layer"] == 0


@pytest.mark.parametrize("call,match", [
    (lambda: get_method("nope"), "unknown method"),
    (lambda: get_method("flap", alpha=1), "has no option alpha"),
    (lambda: run("magnitude", levels=[1.2]), r"must be in \(0, 1\)"),
    (lambda: run("gisp", levels=[0.2, 0.5], steps=3), "do not stop at sparsity"),
    (lambda: get_method("wanda-sp").run(tiny_model(), CalibrationSet([{"x": 1}]), [0.2]), "objective 'lm'"),
    (lambda: run("llm-pruner", layers=4, levels=[0.8]), "out of reach"),
])
def test_bad_input_is_one_line_error(call, match):
    with pytest.raises(gisp.GispError, match=match):
        call()
