"""gisp eval refuses what it cannot score honestly: damaged plain exports, empty protocols, levels a run lacks."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from tests.conftest import random_calib, tiny_model

import gisp
from gisp.cli import main
from gisp.errors import GispError
from gisp.evaluation.evaluate import evaluate


@pytest.fixture(scope="module")
def run_and_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_inputs")
    base = tiny_model("llama", 2, layers=4)
    traj = gisp.prune(copy.deepcopy(base), gisp.PruneConfig(target=0.5, steps=4, batch_size=4, protect_first=0.25),
                      random_calib(n=8, seq_len=16), progress=False,
                      model_info={"name": "gone", "path": str(root / "no-such-model")})
    traj.save(root / "run")
    return base, traj, root / "run"


@pytest.fixture
def plain_export(run_and_base, tmp_path):
    base, traj, _ = run_and_base
    res = gisp.export(traj, tmp_path / "plain", model=base, sparsity=0.3, uniform="cut")
    assert res.plain
    return res.path


def test_plain_export_with_a_tensor_removed_is_refused(plain_export):
    weights = plain_export / "model.safetensors"
    tensors = load_file(weights)
    tensors.pop(next(k for k in tensors if k.endswith("down_proj.weight")))
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(GispError, match="lack") as e:
        evaluate(str(plain_export), ppl="wiki")
    assert "\n" not in str(e.value)


def test_truncated_plain_export_is_refused(plain_export):
    weights = plain_export / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(GispError, match="not a readable safetensors file"):
        evaluate(str(plain_export), ppl="wiki")


def test_plain_export_with_a_mismatched_config_is_refused(plain_export):
    cfg_file = plain_export / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["intermediate_size"] += 1
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(GispError, match="do not match"):
        evaluate(str(plain_export), ppl="wiki")


def test_any_directory_transformers_would_complete_at_random_is_refused(tmp_path):
    """Without gisp's record the loader's own report decides: missing, unexpected or mismatched -> one line."""
    model = tiny_model("llama", 2, layers=2)
    model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith("up_proj.weight"))
    for change, match in ((lambda t: t.pop(key), "lacks"),
                          (lambda t: t.__setitem__("model.extra", torch.zeros(2)), "holds tensors"),
                          (lambda t: t.__setitem__(key, t[key][:-1].contiguous()), "could not load the weights")):
        damaged = dict(tensors)
        change(damaged)
        save_file(damaged, weights, metadata={"format": "pt"})
        with pytest.raises(GispError, match=match) as e:
            gisp.load_model(str(tmp_path / "m"), dtype="fp32", device="cpu")
        assert "\n" not in str(e.value)


def test_sparsity_above_the_last_level_is_refused_before_loading(run_and_base):
    _, traj, run = run_and_base
    top = max(r["sparsity"] for r in traj.steps)
    with pytest.raises(GispError, match=f"holds sparsities up to {top:.4f}"):
        evaluate(run, [0.2, 0.9])
    evaluate_at_top = traj.step_at(top + 0.004)  # within the tolerance: the last level, as asked
    assert evaluate_at_top["step"] == traj.last_step


@pytest.mark.parametrize("args,match", [
    (("--max-windows", "0"), "--max-windows must be at least 1"),
    (("--batch-size", "0"), "--batch-size must be at least 1"),
    (("--json", "RUN/trajectory.json"), "is not a gisp eval result"),
    (("--json", "RUN/eval.json"), "is not a gisp eval result"),
    (("--json", "RUN"), "is a directory"),
])
def test_eval_options_fail_in_one_line(run_and_base, monkeypatch, capsys, args, match):
    _, _, run = run_and_base
    (run / "eval.json").write_text('{"entries": []}')
    before = (run / "trajectory.json").read_bytes()
    monkeypatch.setattr(sys, "argv", ["gisp", "eval", str(run), "--sparsity", "0.2",
                                      *[a.replace("RUN", str(run)) for a in args]])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("gisp: error:")]
    assert e.value.code == 2 and len(lines) == 1 and match in lines[0] and "Traceback" not in err
    assert (run / "trajectory.json").read_bytes() == before


def test_window_beyond_the_context_is_refused(tiny_dir):
    with pytest.raises(GispError, match="exceeds this model's context length of 128"):
        evaluate(str(tiny_dir), window=256, max_windows=1, device="cpu")
