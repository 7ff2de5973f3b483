"""The command line end to end on a tiny model with a real tokenizer, and its error lines."""

import json
import subprocess
import sys

import pytest


def gisp_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "gisp", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_prune_then_eval(tiny_dir, tmp_path):
    run = tmp_path / "run"
    r = gisp_cli("prune", tiny_dir, "--out", run, "--calib", "c4", "--calib-samples", 4, "--seq-len", 32,
                 "--steps", 3, "--target", 0.4, "--protect-first", 0.2, "--shrink-every", 2)
    assert r.returncode == 0, r.stderr
    traj = json.loads((run / "trajectory.json").read_text())
    assert traj["config"]["shrink_every"] == 2  # step 3 ran on a sliced copy
    assert traj["steps"][3]["work_params"] < traj["steps"][1]["work_params"]
    assert traj["completed"] and traj["calibration"]["name"] == "c4" and traj["calibration"]["part"] == "calib"
    assert traj["model"]["fingerprint"] and traj["versions"]["torch"]
    out = tmp_path / "e.json"
    r = gisp_cli("eval", run, "--sparsity", "0,0.4", "--ppl", "wiki", "--max-windows", 4, "--window", 32,
                 "--json", out)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert [row["step"] for row in res["rows"]] == [0, 3]
    assert res["rows"][0]["ppl"]["window"] == 32 and res["rows"][0]["ppl"]["windows"] == 4
    assert res["rows"][0]["ppl"]["source"]["part"] == "eval"
    assert (run / "eval.json").exists()
    # rerunning without --resume is refused with one line
    r = gisp_cli("prune", tiny_dir, "--out", run, "--steps", 3)
    assert r.returncode == 2 and "--resume" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args,match", [
    (("prune", "no-such-model", "--out", "x"), "unknown model"),
    (("prune", "smollm2-135m", "--out", "x", "--target", "1.2"), "target sparsity must be in (0, 1)"),
    (("eval", "missing_dir_xyz", "--sparsity", "0.2"), "unknown model"),
    (("prune", "smollm2-135m", "--out", "x", "--shrink-every", "-1"), "--shrink-every must be 0"),
    (("eval", "smollm2-135m", "--sparsity", "a,b"), "comma-separated"),
])
def test_errors_are_one_line(args, match, tmp_path):
    r = gisp_cli(*args, cwd=tmp_path)
    assert r.returncode == 2
    assert match in r.stderr and "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("gisp: error:")]
    assert len(errors) == 1 and match in errors[0]


def test_run_input_errors_are_one_line(tiny_dir, tmp_path):
    """--seq-len past the context (used to grind), an unknown device and a binary --calib (tracebacks)."""
    binary = tmp_path / "some.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    for args, match in (
        (("--seq-len", 100000), "--seq-len 100000 exceeds the model's context length of 128 tokens"),
        (("--device", "tpu"), "unknown --device 'tpu'"),
        (("--calib", binary, "--seq-len", 32), "some.bin is not UTF-8 text"),
    ):
        r = gisp_cli("prune", tiny_dir, "--out", tmp_path / "run", "--steps", 2, *args)
        errors = [line for line in r.stderr.splitlines() if line.startswith("gisp: error:")]
        assert r.returncode == 2 and "Traceback" not in r.stderr and len(errors) == 1 and match in errors[0], r.stderr
        assert not (tmp_path / "run").exists()
