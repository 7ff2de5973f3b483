"""Training-free reconstruction: what each method computes, and that exports and evaluation agree on it."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tests.conftest import random_calib, tiny_model
from typer.testing import CliRunner

import gisp
from gisp.architectures import apply_mask, get_architecture, layout_of
from gisp.cli.app import app
from gisp.core.calibration import build_calibration
from gisp.core.structures import Mask
from gisp.deploy.compensation import apply_compensation
from gisp.deploy.export import export
from gisp.deploy.reconstruct import LevelReconstructor, ReconSettings, reconstruct
from gisp.errors import GispError
from gisp.evaluation.evaluate import evaluate
from gisp.loading import load_pretrained

TOL = 1e-4



def a_mask(model: torch.nn.Module) -> Mask:
    """Heads, a whole KV group, channels and a whole MLP removed; layer 0 untouched."""
    mask = Mask.dense(layout_of(model))
    mask.heads[1][[0, 3]] = False
    mask.heads[2][[2, 3]] = False  # KV group 1 of 2 gone
    mask.channels[1][::3] = False
    mask.channels[2][:50] = False
    mask.channels[3][:] = False  # a removed MLP
    return mask


def projection_io(model: torch.nn.Module, ids: torch.Tensor) -> dict[tuple[int, str], tuple]:
    """(input, output) of every o/down projection on ``ids``."""
    arch = get_architecture(model)
    seen = {}
    handles = []
    for i, layer in enumerate(arch.layers(model)):
        for name, proj in (("o", arch.attention(layer).o), ("down", arch.mlp(layer).down)):
            handles.append(proj.register_forward_hook(
                lambda _m, inp, out, k=(i, name): seen.__setitem__(k, (inp[0].detach(), out.detach()))))
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("arch,kv", [("llama", 2), ("qwen2", 4)])
def test_lsq_reduces_every_block_error_on_the_calibration_set(arch, kv):
    base = tiny_model(arch, kv, layers=5)
    mask, calib = a_mask(base), random_calib(n=12, seq_len=24)
    ids = torch.stack(calib.samples)
    rec = copy.deepcopy(base)
    done = reconstruct(rec, mask, calib, ReconSettings("lsq", target="dense"))
    plain = copy.deepcopy(base)
    apply_mask(plain, mask)
    dense, inside = projection_io(base, ids), projection_io(rec, ids)
    arch_ = get_architecture(base)
    checked = 0
    for (i, name), (x, y_rec) in inside.items():
        if i == 0:  # before anything was removed nothing is refit
            assert torch.equal(y_rec, dense[(i, name)][1])
            continue
        w_plain = getattr(arch_.attention(arch_.layers(plain)[i]) if name == "o" else arch_.mlp(arch_.layers(plain)[i]),
                          name).weight
        target = dense[(i, name)][1]
        err_refit = float((y_rec - target).pow(2).sum())
        err_plain = float((x @ w_plain.detach().T - target).pow(2).sum())  # the plain masked block on the same inputs
        if (i, name) == (3, "down"):  # removed MLP: nothing left to refit
            assert err_refit == pytest.approx(err_plain)
            continue
        assert err_refit < err_plain, (i, name)
        checked += 1
    assert checked == 7
    d = done.record["details"]
    assert d["relative_error_refit"] < d["relative_error_masked"]
    for b in d["blocks"]:
        assert b["error_refit"] <= b["error_masked"] * (1 + 1e-9)
    # the reconstructed model keeps the mask: removed columns stay zero
    again = copy.deepcopy(rec)
    apply_mask(again, mask)
    for p, q in zip(rec.parameters(), again.parameters()):
        assert torch.equal(p, q)


def test_lsq_is_exact_when_nothing_is_removed():
    base = tiny_model("llama", 2, layers=3)
    rec = copy.deepcopy(base)
    done = reconstruct(rec, Mask.dense(layout_of(base)), random_calib(n=4, seq_len=16), "lsq-bias")
    assert done.biases is None and done.record["details"]["blocks_refit"] == 0
    for p, q in zip(base.parameters(), rec.parameters()):
        assert torch.equal(p, q)


def test_lsq_recovers_the_dense_weights_when_the_inputs_allow_it():
    """A layer with nothing removed after a pruned one still equals the dense block when its inputs equal the
    dense inputs: the damping pulls toward the current weights, never away from them."""
    base = tiny_model("llama", 2, layers=3)
    mask = Mask.dense(layout_of(base))
    mask.channels[2][:10] = False  # only the last MLP loses channels: its attention sees dense inputs
    rec = copy.deepcopy(base)
    reconstruct(rec, mask, random_calib(n=8, seq_len=16), ReconSettings("lsq", damping=0.5))
    arch = get_architecture(base)
    o_rec, o_base = arch.attention(arch.layers(rec)[2]).o.weight, arch.attention(arch.layers(base)[2]).o.weight
    assert torch.allclose(o_rec, o_base, atol=1e-5)


def test_bias_compensation_equals_the_closed_form():
    base = tiny_model("llama", 2, layers=5)
    mask, calib = a_mask(base), random_calib(n=6, seq_len=16)
    dense = projection_io(base, torch.stack(calib.samples))
    rec = copy.deepcopy(base)
    done = reconstruct(rec, mask, calib, "bias")
    arch = get_architecture(base)
    d = arch.head_dim
    for i, layer in enumerate(arch.layers(base)):
        for name, gone in (("o", (~mask.heads[i]).repeat_interleave(d)), ("down", ~mask.channels[i])):
            got = done.biases.bias_for(i, name)
            if not gone.any():
                assert got is None
                continue
            x = dense[(i, name)][0].reshape(-1, gone.numel()).double()
            w = getattr(arch.attention(layer) if name == "o" else arch.mlp(layer), name).weight.double()
            expected = w[:, gone] @ x.mean(0)[gone]
            assert torch.allclose(got.double(), expected, atol=1e-5)
    plain = copy.deepcopy(base)
    apply_mask(plain, mask)
    for p, q in zip(rec.parameters(), plain.parameters()):  # weights: the plain masked ones
        assert torch.equal(p, q)


def test_refusals():
    with pytest.raises(GispError, match="unknown --reconstruct"):
        ReconSettings("obc")
    with pytest.raises(GispError, match="damping"):
        ReconSettings("lsq", damping=-1)
    with pytest.raises(GispError, match="unknown reconstruction option"):
        LevelReconstructor({}, {}, None, "lsq", {"smaples": 3})


# exports and evaluation of a run ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tiny_dir, tmp_path_factory):
    """A GISP run of the tiny on-disk Llama on c4 windows (what reconstruction reuses by default)."""
    out = tmp_path_factory.mktemp("recon_run") / "run"
    lm = gisp.load_model(str(tiny_dir), dtype="fp32", device="cpu")
    cfg = gisp.PruneConfig(target=0.4, steps=4, batch_size=4, protect_first=0.2, calib_samples=6, seq_len=32)
    calib = build_calibration("lm", "c4", lm.tokenizer, 6, 32, 0)
    gisp.prune(copy.deepcopy(lm.model), cfg, calib, run_dir=out, progress=False,
               model_info={"name": str(tiny_dir), "path": str(tiny_dir)})
    return out


def in_memory(run, sparsity: float, method: str) -> tuple[torch.nn.Module, object]:
    traj = gisp.Trajectory.load(run)
    lm = gisp.load_model(traj.model["path"], dtype="fp32", device="cpu")
    recon = LevelReconstructor(traj.config, traj.calibration, lm.tokenizer, method)
    done = recon(lm.model, traj.mask_at(sparsity))
    return lm.model, done


@pytest.mark.parametrize("method", ["bias", "lsq", "lsq-bias"])
def test_export_loads_and_equals_the_reconstructed_masked_model(method, run, tmp_path):
    res = export(run, tmp_path / "e", sparsity=0.3, reconstruct=method)
    rec = res.record["reconstruction"]
    assert rec["method"] == method and rec["calibration"]["name"] == "c4" and rec["calibration"]["part"] == "calib"
    assert rec["calibration"]["samples"] == 6 and rec["calibration"]["seq_len"] == 32 and rec["damping"] == 1.0
    assert rec["calibration"]["from"] == {"source": "run", "samples": "run", "seq_len": "run", "seed": "run"}
    assert json.loads((res.path / "gisp_export.json").read_text())["reconstruction"]["method"] == method
    slim = load_pretrained(res.path, dtype="fp32", device="cpu", tokenizer=False).model
    model, done = in_memory(run, 0.3, method)
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), apply_compensation(model, done.biases):
        want = model(input_ids=ids).logits
    with torch.no_grad():
        assert float((slim(input_ids=ids).logits - want).abs().max()) < TOL
    plain = load_pretrained(export(run, tmp_path / "p", sparsity=0.3).path, dtype="fp32", device="cpu",
                            tokenizer=False).model
    with torch.no_grad():
        assert float((plain(input_ids=ids).logits - want).abs().max()) > 1e-3  # it did change something


def test_uniform_export_reconstructs_the_uniform_mask(run, tmp_path):
    res = export(run, tmp_path / "u", sparsity=0.3, uniform=True, reconstruct="lsq")
    assert res.plain and res.record["reconstruction"]["method"] == "lsq"
    slim = load_pretrained(res.path, dtype="fp32", device="cpu", tokenizer=False).model
    traj = gisp.Trajectory.load(run)
    lm = gisp.load_model(traj.model["path"], dtype="fp32", device="cpu")
    LevelReconstructor(traj.config, traj.calibration, lm.tokenizer, "lsq")(lm.model, res.mask)
    ids = torch.arange(1, 33).view(2, 16)
    with torch.no_grad():
        assert float((slim(input_ids=ids).logits - lm.model(input_ids=ids).logits).abs().max()) < TOL


def test_eval_of_the_reconstructed_level_equals_eval_of_its_export(run, tmp_path):
    kw = dict(ppl="wiki", window=32, max_windows=4, progress=False)
    level = evaluate(run, [0.3], reconstruct="lsq", recon_options={"samples": 4}, **kw)
    row = level["rows"][0]
    assert level["protocol"]["reconstruct"]["method"] == "lsq"
    assert row["reconstruction"]["calibration"]["samples"] == 4
    assert row["reconstruction"]["calibration"]["from"]["samples"] == "option"
    exported = export(run, tmp_path / "e", sparsity=0.3, reconstruct="lsq", recon_options={"samples": 4})
    direct = evaluate(exported.path, **kw)["rows"][0]
    assert row["ppl"]["ppl"] == pytest.approx(direct["ppl"]["ppl"], rel=1e-4)
    plain = evaluate(run, [0.3], **kw)["rows"][0]
    assert plain["ppl"]["ppl"] != pytest.approx(row["ppl"]["ppl"], rel=1e-4)
    # RUN/eval.json keeps both, and listings show the plain level's ppl only
    from gisp.deploy.levels import known_perplexities

    step = plain["step"]
    assert known_perplexities(run)[step][0] == pytest.approx(plain["ppl"]["ppl"])


def test_cli(run, tmp_path):
    r = CliRunner().invoke(app, ["export", str(run), "--sparsity", "0.3", "--reconstruct", "lsq-bias",
                                 "--recon-samples", "3", "--recon-damping", "0.1", "--out", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    assert "reconstructed with lsq-bias (damping 0.1)" in r.output
    rec = json.loads((tmp_path / "c" / "gisp_export.json").read_text())["reconstruction"]
    assert rec["calibration"]["samples"] == 3 and rec["damping"] == 0.1 and rec["adds_bias"]
    r = CliRunner().invoke(app, ["export", str(run), "--sparsity", "0.3", "--reconstruct", "obc",
                                 "--out", str(tmp_path / "d")])
    assert isinstance(r.exception, GispError) and "unknown --reconstruct" in str(r.exception)
    r = CliRunner().invoke(app, ["eval", str(tmp_path / "c"), "--reconstruct", "lsq", "--max-windows", "2"])
    assert isinstance(r.exception, GispError) and "run directory" in str(r.exception)


def test_formats(run, tmp_path):
    """lsq (weights only) goes to vLLM; biases go to GGUF (llama.cpp's llama/deci graphs load bo/ffn_down_b)."""
    from gisp.deploy.gguf import export_gguf
    from gisp.deploy.vllm import export_vllm, load_transformers

    v = export_vllm(run, tmp_path / "v", sparsity=0.3, reconstruct="lsq")
    assert v.record["reconstruction"]["method"] == "lsq"
    model, done = in_memory(run, 0.3, "lsq")
    ids = torch.arange(1, 33).view(2, 16)
    with torch.no_grad():
        vm = load_transformers(v.path)
        assert float((vm(input_ids=ids).logits - model(input_ids=ids).logits).abs().max()) < TOL
    (g,) = export_gguf(run, tmp_path / "g.gguf", sparsity=0.3, reconstruct="lsq-bias")
    assert g.path.is_file()
