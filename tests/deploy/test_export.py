"""Export: physically smaller models that compute exactly what the masked model computes."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tests.conftest import VARIANTS, VOCAB, random_calib, tiny_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import gisp
from gisp.architectures import apply_mask, layout_of
from gisp.architectures.slicing import count_params, plan_layers
from gisp.core.fingerprint import fingerprint
from gisp.core.structures import Mask
from gisp.deploy.export import save_slim
from gisp.deploy.levels import levels, parse_params
from gisp.errors import GispError
from gisp.run.trajectory import Trajectory

CFG = dict(target=0.5, steps=5, batch_size=4, protect_first=0.25)
TOL = 1e-4



def pruned(arch: str = "llama", kv: int = 2, layers: int = 6) -> tuple[torch.nn.Module, Trajectory]:
    """An unpruned base model and the trajectory of a GISP run on a copy of it."""
    base = tiny_model(arch, kv, layers=layers)
    traj = gisp.prune(copy.deepcopy(base), gisp.PruneConfig(**CFG), random_calib(n=8, seq_len=16), progress=False)
    return base, traj


def masked(base: torch.nn.Module, mask: Mask) -> torch.nn.Module:
    ref = copy.deepcopy(base)
    apply_mask(ref, mask)
    return ref


def hand_trajectory(base: torch.nn.Module, head_steps: dict, channel_steps: dict, last: int = 2) -> Trajectory:
    """A trajectory whose per-structure removal steps are given by hand ({layer: [step per head]})."""
    layout = layout_of(base)
    traj = Trajectory.start(layout, {}, {"name": "model", "fingerprint": fingerprint(base)}, {}, {})
    for i, st in head_steps.items():
        traj.head_step[i] = list(st)
    for i, st in channel_steps.items():
        traj.channel_step[i] = list(st)
    order = 0
    for step in range(1, last + 1):  # global order: by step, then layer, heads before channels
        for i in range(layout.num_layers):
            for steps, orders in ((traj.head_step[i], traj.head_order[i]),
                                  (traj.channel_step[i], traj.channel_order[i])):
                for j, s in enumerate(steps):
                    if s == step:
                        orders[j] = order
                        order += 1
    traj.steps = [{"step": k} for k in range(last + 1)]
    for rec in traj.steps:
        mask = traj.mask_at_step(rec["step"])
        rec.update(sparsity=mask.sparsity(layout), kept_params=mask.kept_params(layout))
    traj.completed = True
    return traj


def max_diff(a: torch.nn.Module, b: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a(input_ids=ids).logits - b(input_ids=ids).logits).abs().max())


def ids(n: int = 2, length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def greedy(model: torch.nn.Module, prompt: torch.Tensor, new: int = 8) -> torch.Tensor:
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, do_sample=False,
                          pad_token_id=0)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch,kv", VARIANTS)
def test_export_is_exact_loadable_and_counted(arch, kv, tmp_path):
    base, traj = pruned(arch, kv)
    listing = {lv.step: lv for lv in levels(traj, base)}
    x = ids()
    for s in (0.2, 0.45):
        res = gisp.export(traj, tmp_path / f"s{s}", model=base, sparsity=s)
        assert res.step == traj.step_at(s)["step"]
        ref = masked(base, traj.mask_at_step(res.step))
        auto = AutoModelForCausalLM.from_pretrained(res.path).eval()
        loaded = gisp.load_pretrained(res.path).model
        assert max_diff(auto, ref, x) <= TOL and max_diff(loaded, ref, x) <= TOL
        assert torch.equal(greedy(auto, x[:1]), greedy(ref, x[:1]))
        assert res.params == n_params(auto) == listing[res.step].params < n_params(base)
        assert json.loads((res.path / "gisp_export.json").read_text())["step"] == res.step


def _forced_mask(base: torch.nn.Module) -> Mask:
    """Layer 0: no attention; 1: uneven GQA groups (2, 1), fewer channels; 2: no MLP; 3: nothing left."""
    layout = layout_of(base)
    mask = Mask.dense(layout)
    mask.heads[0][:] = False
    mask.heads[1] = torch.tensor([True, True, False, True])
    mask.channels[1][::3] = False
    mask.channels[2][:] = False
    mask.heads[3][:] = False
    mask.channels[3][:] = False
    return mask


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_empty_blocks_and_uneven_gqa_exact_with_kv_cache(arch, tmp_path):
    base = tiny_model(arch, 2, layers=5)
    mask = _forced_mask(base)
    ref = masked(base, mask)
    x = ids()
    for gqa in ("map", "duplicate"):
        path, slim = save_slim(base, mask, tmp_path / gqa, gqa=gqa)
        cfg = json.loads((path / "config.json").read_text())
        per_layer = cfg["per_layer_config"]
        assert cfg["model_type"] == f"gisp_{arch}"
        assert sorted(per_layer["0"]["skip"]) == ["self_attn"] and per_layer["2"]["skip"] == ["mlp"]
        assert sorted(per_layer["3"]["skip"]) == ["mlp", "self_attn"]
        if gqa == "map":
            assert per_layer["1"]["kv_head_map"] == [0, 0, 1] and cfg["num_key_value_heads"] == 2  # global value
        else:  # groups made uniform by duplicating KV head 1's partner: standard GQA (here MHA) widths
            assert "kv_head_map" not in per_layer["1"] and per_layer["1"]["num_key_value_heads"] == 3
        loaded = AutoModelForCausalLM.from_pretrained(path).eval()
        assert loaded.model.layers[0].self_attn is None and loaded.model.layers[2].mlp is None
        assert max_diff(slim, ref, x) <= TOL and max_diff(loaded, ref, x) <= TOL
        # decoding token by token with the KV cache equals the full forward (layer 0 holds no cache)
        with torch.no_grad():
            full = loaded(input_ids=x).logits
            out = loaded(input_ids=x[:, :10], use_cache=True)
            steps = [out.logits]
            for t in range(10, x.shape[1]):
                out = loaded(input_ids=x[:, t : t + 1], cache=out.cache, use_cache=True)
                steps.append(out.logits)
        assert (torch.cat(steps, 1) - full).abs().max() <= TOL
        assert torch.equal(greedy(loaded, x[:1]), greedy(ref, x[:1]))


def test_removed_blocks_keep_their_output_bias(tmp_path):
    """A masked block still adds its o_proj/down_proj bias: the export keeps it as a residual bias."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_bias=True, mlp_bias=True)
    base = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, 0.2)
    mask = Mask.dense(layout_of(base))
    mask.heads[1][:] = False
    mask.channels[1][:] = False
    mask.heads[2] = torch.tensor([False, True, True, True])
    path, _ = save_slim(base, mask, tmp_path / "b")
    loaded = gisp.load_pretrained(path).model
    assert max_diff(loaded, masked(base, mask), ids()) <= TOL
    layout = layout_of(base)
    assert n_params(loaded) == count_params(base, layout, plan_layers(mask, layout))


def test_hand_made_trajectory_exports_each_step(tmp_path):
    base = tiny_model("qwen3", 2, layers=4)
    traj = hand_trajectory(base, {0: [1, 1, 1, 1], 1: [0, 0, 2, 0]}, {2: [1] * 96, 1: [2] * 40 + [0] * 56})
    x = ids()
    for step in (1, 2):
        res = gisp.export(traj, tmp_path / str(step), model=base, step=step)
        assert max_diff(gisp.load_pretrained(res.path).model, masked(base, traj.mask_at_step(step)), x) <= TOL
    per_layer = json.loads((res.path / "config.json").read_text())["per_layer_config"]
    assert per_layer["0"]["skip"] == ["self_attn"] and per_layer["1"]["kv_head_map"] == [0, 0, 1]


def test_uniform_keep_is_a_superset_along_the_global_order(tmp_path):
    """--uniform keeps every structure of the level; the ones added back are those the run removed last."""
    base = tiny_model("llama", 2, layers=3)  # 2 KV heads of 2 query heads, 96 channels
    traj = hand_trajectory(base, {0: [1, 0, 0, 2], 1: [1, 1, 0, 2], 2: [0, 2, 2, 0]},
                           {0: [1] * 20 + [2] * 10 + [0] * 66, 1: [1] * 30 + [2] * 10 + [0] * 56,
                            2: [2] * 10 + [0] * 86})
    level = traj.mask_at_step(2)
    res = gisp.export(traj, tmp_path / "k", model=base, step=2, uniform=True)
    assert res.plain
    for i in range(3):  # one shape: 2 KV heads of 1 query head each, the widest layer's 86 channels
        assert bool((res.mask.heads[i] | ~level.heads[i]).all())
        assert bool((res.mask.channels[i] | ~level.channels[i]).all())
        assert int(res.mask.heads[i].sum()) == 2 and int(res.mask.kv_heads(traj.layout, i).sum()) == 2
        assert int(res.mask.channels[i].sum()) == 86
    assert res.mask.heads[1].tolist() == [False, True, True, False]  # of the two removed at step 1, the later
    assert res.mask.channels[1][10:].all() and not res.mask.channels[1][:10].any()  # the last 30 removed
    for i in range(3):  # channels added back are the ones the run removed last (heads come back by KV group)
        o = torch.tensor(traj.channel_order[i], dtype=torch.float64)
        added, still_out = res.mask.channels[i] & ~level.channels[i], ~res.mask.channels[i]
        if added.any() and still_out.any():
            assert o[added].min() > o[still_out].max()
    a = res.adjustment
    assert a["rule"] == "keep" and a["level_structures_removed"] == 0 and a["structures_added"] == 1 + 20 + 30
    assert level.kept_params(traj.layout) < res.mask.kept_params(traj.layout) < Mask.dense(traj.layout).kept_params(
        traj.layout)
    assert max_diff(LlamaForCausalLM.from_pretrained(res.path).eval(), masked(base, res.mask), ids()) <= TOL


def test_uniform_keep_with_dense_protected_layers_keeps_the_base_widths(tmp_path):
    base, traj = pruned("llama", 2)
    res = gisp.export(traj, tmp_path / "k", model=base, sparsity=0.3, uniform=True)
    assert res.plain and res.sparsity == 0.0 and res.adjustment["level_structures_removed"] == 0
    assert res.adjustment["structures_added"] > 0 and not res.adjustment["is_run_model"]


def test_uniform_export_is_a_plain_checkpoint(tmp_path):
    base, traj = pruned("llama", 2)
    res = gisp.export(traj, tmp_path / "u", model=base, sparsity=0.3, uniform="cut")
    cfg = json.loads((res.path / "config.json").read_text())
    assert res.plain and cfg["model_type"] == "llama" and "per_layer_config" not in cfg
    plain = LlamaForCausalLM.from_pretrained(res.path).eval()  # transformers' own class, no gisp code
    widths = {(int(h.sum()), int(c.sum())) for h, c in zip(res.mask.heads, res.mask.channels)}
    assert len(widths) == 1
    assert max_diff(plain, masked(base, res.mask), ids()) <= TOL
    assert res.adjustment["params_after"] - res.adjustment["params_before"] == res.adjustment["params_delta"]
    assert res.params == n_params(plain)
    assert abs(res.sparsity - res.step_sparsity) < 0.05
    a = res.adjustment
    assert a["rule"] == "cut" and a["protected_structures_removed"] > 0 and not a["is_run_model"]
    assert a["level_structures_removed"] >= a["protected_structures_removed"]


def test_equal_widths_everywhere_give_a_plain_checkpoint(tmp_path):
    base = tiny_model("mistral", 2, layers=3)
    mask = Mask.dense(layout_of(base))
    for i in range(3):
        mask.heads[i] = torch.tensor([True, False, True, False])
        mask.channels[i][i : i + 48] = False  # same width, different channels
    path, _ = save_slim(base, mask, tmp_path / "p")
    assert json.loads((path / "config.json").read_text())["model_type"] == "mistral"
    assert max_diff(AutoModelForCausalLM.from_pretrained(path), masked(base, mask), ids()) <= TOL


def assert_moves_along_order(traj: Trajectory, before: Mask, after: Mask) -> None:
    """Added-back structures are the last removed; newly removed ones are the next ranked."""
    for i in range(traj.layout.num_layers):
        for order, b, a in ((traj.head_order[i], before.heads[i], after.heads[i]),
                            (traj.channel_order[i], before.channels[i], after.channels[i])):
            o = torch.tensor(order, dtype=torch.float64)
            added, dropped, still_out = a & ~b, b & ~a, ~a & ~b
            if added.any() and still_out.any():
                assert o[added].min() > o[still_out].max()
            if dropped.any():
                assert (o[dropped] >= 0).all()
                survivors = a & (o >= 0)
                if survivors.any():
                    assert o[dropped].max() < o[survivors].min()


def test_round_to_moves_along_the_global_order(tmp_path):
    base, traj = pruned("llama", 2)
    mask = traj.mask_at(0.3)
    for n in (8, 32):
        res = gisp.export(traj, tmp_path / f"r{n}", model=base, sparsity=0.3, round_to=n)
        for i, (h, c) in enumerate(zip(res.mask.heads, res.mask.channels)):
            if int(mask.channels[i].sum()) != 96:
                assert int(c.sum()) % n == 0
            assert int(h.sum()) * 16 % n == 0 or bool(h.all())
        assert_moves_along_order(traj, mask, res.mask)
        a = res.adjustment
        assert a["kind"] == "round_to" and a["params_delta"] == a["params_after"] - a["params_before"]
        assert a["protected_structures_removed"] == 0
        assert max_diff(gisp.load_pretrained(res.path).model, masked(base, res.mask), ids()) <= TOL


def test_budget_selection_and_listing(tmp_path):
    base, traj = pruned("llama", 2)
    lv = levels(traj, base)
    assert [x.step for x in lv] == list(range(traj.last_step + 1))
    assert all(a.params > b.params for a, b in zip(lv, lv[1:]))
    assert lv[0].params == n_params(base) and lv[0].size_bytes == 4 * lv[0].params
    target = lv[3].params
    res = gisp.export(traj, tmp_path / "p", model=base, max_params=target + 1)
    assert res.step == 3 and res.params == target
    res = gisp.export(traj, tmp_path / "g", model=base, max_size_gb=lv[2].size_bytes / 1e9)
    assert res.step == 2
    with pytest.raises(GispError, match="no level of this run fits"):
        gisp.export(traj, tmp_path / "x", model=base, max_params=10)
    with pytest.raises(GispError, match="exactly one"):
        gisp.export(traj, tmp_path / "y", model=base, sparsity=0.3, max_params="90M")
    assert parse_params("90M") == 90_000_000 and parse_params("1.5B") == 1_500_000_000 and parse_params(500) == 500
    with pytest.raises(GispError):
        parse_params("ninety")


def test_listing_reads_known_perplexity(tmp_path):
    base, traj = pruned("llama", 2)
    run = tmp_path / "run"
    traj.save(run)
    (run / "eval.json").write_text(json.dumps({"entries": [
        {"protocol": {"ppl_source": "wiki", "window": 128}, "row": {"step": 2, "ppl": {"ppl": 12.5}}}]}))
    lv = levels(traj, base, run_dir=run)
    assert lv[2].ppl == 12.5 and lv[2].ppl_protocol == "wiki/128" and lv[1].ppl is None


def test_tampered_directory_fails_with_one_line(tmp_path):
    base, traj = pruned("llama", 2)
    res = gisp.export(traj, tmp_path / "e", model=base, sparsity=0.3)
    cfg_file = res.path / "config.json"
    original = cfg_file.read_text()
    cfg = json.loads(original)
    layer = next(k for k, v in cfg["per_layer_config"].items() if v.get("intermediate_size"))
    cfg["per_layer_config"][layer]["intermediate_size"] += 1
    cfg_file.write_text(json.dumps(cfg))
    for load in (gisp.load_pretrained, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(GispError, match="do not match") as e:
            load(res.path)
        assert "\n" not in str(e.value)
    cfg_file.write_text(original)
    weights = res.path / "model.safetensors"
    tensors = load_file(weights)
    tensors.pop(next(k for k in tensors if k.endswith("down_proj.weight")))
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(GispError, match="lack"):
        gisp.load_pretrained(res.path)
    weights.unlink()
    with pytest.raises(GispError, match="no safetensors"):
        gisp.load_pretrained(res.path)


def test_output_directory_is_written_atomically(tmp_path):
    base, traj = pruned("llama", 2)
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(GispError, match="not empty"):
        gisp.export(traj, out, model=base, sparsity=0.3)
    with pytest.raises(GispError, match="replaces only an earlier gisp export"):  # not ours: never deleted
        gisp.export(traj, out, model=base, sparsity=0.3, overwrite=True)
    assert (out / "keep.txt").read_text() == "x"
    (out / "keep.txt").unlink()
    gisp.export(traj, out, model=base, sparsity=0.2)  # an empty directory is fine
    res = gisp.export(traj, out, model=base, sparsity=0.3, overwrite=True)  # and so is our own export
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # no temp directories left behind
    rec = json.loads((res.path / "gisp_export.json").read_text())
    assert rec["source"]["fingerprint"] == traj.model["fingerprint"] and rec["sparsity"] == pytest.approx(0.3, abs=0.01)
    assert len(rec["layers"]) == 6 and rec["layers"][0]["channels"] == list(range(96))
    assert not list(res.path.glob("*.bin")) and not list(res.path.glob("*.pt"))  # no pickles


def test_a_masked_model_is_refused(tmp_path):
    base, traj = pruned("llama", 2)
    with pytest.raises(GispError, match="fingerprint"):
        gisp.export(traj, tmp_path / "m", model=masked(base, traj.mask_at(0.3)), sparsity=0.3)


def test_cli_lists_and_exports(tmp_path, tiny_dir):
    from typer.testing import CliRunner

    from gisp.cli.app import app

    loaded = gisp.load_model(str(tiny_dir), dtype="fp32", device="cpu")
    vocab = loaded.model.config.vocab_size
    calib = gisp.CalibrationSet([torch.randint(0, vocab, (16,)) for _ in range(4)], {"name": "random"})
    run = tmp_path / "run"
    gisp.prune(copy.deepcopy(loaded.model), gisp.PruneConfig(target=0.4, steps=3, batch_size=4, protect_first=0.2),
               calib, run_dir=run, model_info={"name": str(tiny_dir), "path": str(tiny_dir)}, progress=False)
    runner = CliRunner()
    r = runner.invoke(app, ["export", str(run), "--list"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "size (MB)" in r.output and "0.0000" in r.output
    out = tmp_path / "exp"
    r = runner.invoke(app, ["export", str(run), "--sparsity", "0.3", "--out", str(out), "--round-to", "8"])
    assert r.exit_code == 0, r.output
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()
    re_loaded = gisp.load_pretrained(out)
    assert re_loaded.tokenizer is not None
    r = runner.invoke(app, ["export", str(run), "--sparsity", "0.3"])
    assert isinstance(r.exception, GispError)


@pytest.mark.integration
def test_smollm2_exports_are_exact_and_counted(smollm2, tmp_path):
    from gisp.core.calibration import build_calibration

    base = smollm2.model
    calib = build_calibration("lm", "c4", smollm2.tokenizer, 8, 64, 0)
    run = tmp_path / "run"
    traj = gisp.prune(copy.deepcopy(base), gisp.PruneConfig(target=0.3, steps=3, batch_size=8, calib_samples=8,
                                                             seq_len=64),
                      calib, run_dir=run, progress=False,
                      model_info={"name": "smollm2-135m", "path": smollm2.path})
    listing = {lv.step: lv for lv in levels(traj, base)}
    x = smollm2.tokenizer("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids
    ref = copy.deepcopy(base)
    for s in (0.1, 0.3):  # nested masks: the second is applied on top of the first
        res = gisp.export(run, tmp_path / f"s{s}", model=base, tokenizer=smollm2.tokenizer, sparsity=s)
        apply_mask(ref, traj.mask_at_step(res.step))
        loaded = gisp.load_pretrained(res.path)
        assert max_diff(loaded.model, ref, x) <= TOL
        assert res.params == n_params(loaded.model) == listing[res.step].params < n_params(base)
        assert loaded.tokenizer is not None
        del loaded
