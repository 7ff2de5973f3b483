"""Every way of naming a model goes the whole way: prune, eval, export in every format, reload, elastic.

Tiny models, named as a local directory, a ``.gguf`` file, a hub id (an offline hub cache) and an alias,
each pruned once; every export format of each run is reloaded and checked against the elastic model at
the same level. The real SmolLM2 GGUF, given by its path, goes the same way in tests/test_smollm2.py.
"""

from __future__ import annotations

import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
from tests.conftest import write_tiny_gguf
from typer.testing import CliRunner

import gisp
from gisp.cli.app import app

SOURCES = ["dir", "gguf", "hub", "alias"]
FORMATS = ["hf", "uniform", "gguf", "vllm"]
HUB_ID, ALIAS, LEVEL, TOL = "tiny-org/tiny-llama", "tiny-alias", 0.3, 1e-4
IDS = [5, 17, 100, 42, 7, 250, 3, 99]


def invoke(*args) -> str:
    r = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    assert r.exit_code == 0, f"{args}: {r.exception!r}\n{r.output}"
    return r.output


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits.float()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny Llama saved as a directory and a GGUF file, placed in an offline hub cache and behind an alias."""
    import huggingface_hub.constants as hub

    import gisp.loading as loading

    root = tmp_path_factory.mktemp("sources")
    gguf = write_tiny_gguf(root / "models" / "tiny.gguf")
    hf_dir = gguf.with_name("tiny.hf0")
    repo = root / "hf" / "hub" / "models--tiny-org--tiny-llama"
    commit = "0" * 40
    shutil.copytree(hf_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    real_package_dir = loading.package_dir
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GISP_CACHE", str(root / "cache"))
        mp.setenv("HF_HOME", str(root / "hf"))
        mp.setenv("HF_HUB_CACHE", str(root / "hf" / "hub"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(hub, "HF_HUB_CACHE", str(root / "hf" / "hub"))  # read once when huggingface_hub was imported
        mp.setattr(hub, "HF_HUB_OFFLINE", True)
        mp.setattr(loading, "_ALIASES", {**loading._ALIASES, ALIAS: ("tiny_models_pkg", gguf.name)})
        mp.setattr(loading, "package_dir", lambda p: gguf.parent if p == "tiny_models_pkg" else real_package_dir(p))
        # local paths relative to the directory prune runs in; later commands run from another one
        names = {"dir": "models/tiny.hf0", "gguf": "models/tiny.gguf", "hub": HUB_ID, "alias": ALIAS}
        recorded = {"dir": str(hf_dir), "gguf": str(gguf), "hub": HUB_ID, "alias": str(root / "cache" / ALIAS)}
        yield SimpleNamespace(root=root, names=names, recorded=recorded)


@pytest.fixture(scope="module", params=SOURCES)
def run(request, world) -> SimpleNamespace:
    """One pruning run per way of naming the model, and its elastic model at LEVEL."""
    source = request.param
    out = world.root / f"run-{source}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(world.root)
        invoke("prune", world.names[source], "--out", out, "--calib", "c4", "--calib-samples", 4, "--seq-len", 32,
               "--steps", 2, "--target", LEVEL, "--protect-first", 0, "--protect-last", 0, "--device", "cpu")
    em = gisp.ElasticModel.from_run(out, dtype="fp32", device="cpu")
    em.set_sparsity(LEVEL)
    return SimpleNamespace(source=source, dir=out, elastic=em, expected=logits(em.model))


def test_prune_eval_elastic(run, world, tmp_path):
    from gisp.architectures import apply_mask
    from gisp.loading import load_base_model

    traj = gisp.Trajectory.load(run.dir)
    assert traj.completed and traj.model["path"] == world.recorded[run.source]
    assert traj.steps[-1]["sparsity"] == pytest.approx(LEVEL, abs=0.05)
    out = tmp_path / "eval.json"
    invoke("eval", run.dir, "--sparsity", f"0,{LEVEL}", "--ppl", "wiki", "--window", 32, "--max-windows", 2,
           "--device", "cpu", "--json", out)
    rows = json.loads(out.read_text())["rows"]
    assert [r["step"] for r in rows] == [0, traj.last_step]
    assert all(math.isfinite(r["ppl"]["ppl"]) for r in rows) and rows[0]["ppl"]["ppl"] != rows[1]["ppl"]["ppl"]
    listing = invoke("export", run.dir, "--list")
    assert f"{traj.steps[-1]['sparsity']:.4f}" in listing
    base = load_base_model(traj.model, dtype="fp32")
    apply_mask(base.model, traj.mask_at(LEVEL))
    assert (logits(base.model) - run.expected).abs().max() <= TOL  # the elastic model is the masked model


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_and_reload(run, fmt, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / ("m.gguf" if fmt == "gguf" else "m")
    extra = {"hf": [], "uniform": ["--uniform"], "gguf": ["--format", "gguf"], "vllm": ["--format", "vllm"]}[fmt]
    invoke("export", run.dir, "--sparsity", LEVEL, "--out", out, *extra)
    if fmt == "gguf":
        from gisp.deploy.gguf import compare_with_hf

        res = compare_with_hf(out, run.elastic.model, IDS, 8, banned=[0], exact=True)
        assert res["same_prefix"] == res["n_tokens"] == 8 and res["max_abs_logprob_diff"] <= 1e-3, res
        return
    record = json.loads((out / "gisp_export.json").read_text())
    assert record["source"]["path"] == gisp.Trajectory.load(run.dir).model["path"]
    reloaded = gisp.load_pretrained(out, dtype="fp32", device="cpu")
    assert reloaded.tokenizer is not None
    if fmt == "uniform":  # every layer one shape: a plain checkpoint, no gisp needed; its own (adjusted) level
        assert reloaded.model.config.model_type == "llama"
        plain = AutoModelForCausalLM.from_pretrained(out).eval()
        assert (logits(plain) - logits(reloaded.model)).abs().max() == 0
    else:
        assert (logits(reloaded.model) - run.expected).abs().max() <= TOL
    res = tmp_path / "eval.json"
    invoke("eval", out, "--ppl", "wiki", "--window", 32, "--max-windows", 2, "--device", "cpu", "--json", res)
    assert math.isfinite(json.loads(res.read_text())["rows"][0]["ppl"]["ppl"])

