"""Data-parallel GISP: 2 CPU processes (gloo) give the single-process trajectory; helpers behave."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import random_calib, tiny_model

import gisp
from gisp.core.ranking import Pick
from gisp.run import distributed

WORKER = Path(__file__).with_name("_dist_prune_worker.py")
CFG = dict(target=0.5, steps=4, batch_size=2, protect_first=0.25, protect_last=1)
SAMPLES = 11  # odd: the ranks' shards differ in size (6 and 5)
STRUCTURE = ("head_step", "channel_step", "head_order", "channel_order")


def _run_and_compare(launcher: list[str], out: Path) -> None:
    """Launch the 2-rank run, compute the single-process reference meanwhile, compare."""
    from tests.run._dist_prune_worker import weight_digest

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [*launcher, str(WORKER), str(out), json.dumps(CFG), str(SAMPLES)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=WORKER.parents[2])
    model = tiny_model()
    single = gisp.prune(model, gisp.PruneConfig(**CFG), random_calib(n=SAMPLES), progress=False).to_dict()
    lone = gisp.prune(tiny_model(), gisp.PruneConfig(**{**CFG, "steps": 1}), random_calib(n=1),
                      progress=False).to_dict()
    try:
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, stdout[-2000:] + stderr[-4000:]
    results = [json.loads((out / f"result{i}.json").read_text()) for i in (0, 1)]
    for res in results:
        assert res["world"] == 2 and res["backend"] == "gloo"
        for key in STRUCTURE:  # bit-equal structure steps and orders, on every rank
            assert res["traj"][key] == single[key], key
            assert res["lone"][key] == lone[key], key  # a rank with no sample takes part too
        for a, b in zip(res["traj"]["steps"], single["steps"], strict=True):
            assert a["sparsity"] == b["sparsity"] and a["kept_params"] == b["kept_params"]
            assert a["calib_loss"] == pytest.approx(b["calib_loss"], rel=1e-5)  # summation order differs
        assert all(s["timing"]["processes"] == 2 for s in res["traj"]["steps"][1:])
        assert res["weights"] == weight_digest(model)  # every rank holds the single-process masked model
    # only rank 0 writes the run directory, and it holds the same trajectory
    assert not (out / "rank1").exists()
    saved = json.loads((out / "rank0" / "trajectory.json").read_text())
    assert saved["completed"] and all(saved[k] == single[k] for k in STRUCTURE)


def test_torchrun_two_processes_equal_one(tmp_path):
    _run_and_compare([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
                     tmp_path)


def _accelerate() -> str | None:
    exe = Path(sys.executable).with_name("accelerate")
    return str(exe) if exe.exists() else shutil.which("accelerate")


@pytest.mark.skipif(_accelerate() is None, reason="accelerate CLI not installed")
def test_cli_under_accelerate_launch_equals_in_process_run(tiny_dir, tmp_path):
    """`accelerate launch -m gisp prune ...`: the CLI path (process group from env, rank-0 output)."""
    from gisp.core.calibration import build_calibration

    args = dict(calib="c4", calib_samples=5, seq_len=32, steps=3, target=0.4, protect_first=0.2, batch_size=2)
    cli = [f"--{k.replace('_', '-')}={v}" for k, v in args.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    # --multi_gpu selects accelerate's torch.distributed launcher; gisp picks gloo where there is no GPU
    cmd = [_accelerate(), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "gisp", "prune", str(tiny_dir),
           "--out", str(tmp_path / "run"), "--dtype", "fp32", "--device", "cpu", *cli]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    loaded = gisp.load_model(str(tiny_dir), dtype="fp32", device="cpu")
    calib = build_calibration("lm", "c4", loaded.tokenizer, args["calib_samples"], args["seq_len"], 0)
    single = gisp.prune(loaded.model, gisp.PruneConfig(**args), calib, progress=False).to_dict()
    try:
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-4000:]
    saved = json.loads((tmp_path / "run" / "trajectory.json").read_text())
    assert saved["completed"] and all(saved[k] == single[k] for k in STRUCTURE)
    assert saved["steps"][-1]["timing"]["processes"] == 2
    assert stdout.count("GISP run:") == 1  # the steps table is printed once, by rank 0


def test_shards_are_disjoint_complete_balanced_and_deterministic():
    for n in (0, 1, 5, 11, 64):
        for world in (1, 2, 3, 8):
            for mode in distributed.SHARDS:
                for block in (1, 3):
                    shards = [distributed.shard_indices(n, r, world, mode, block) for r in range(world)]
                    assert sorted(i for s in shards for i in s) == list(range(n))
                    assert max(map(len, shards)) - min(map(len, shards)) < 2 * block  # blocks differ by <= 1
                    assert shards == [distributed.shard_indices(n, r, world, mode, block) for r in range(world)]
    assert distributed.shard_indices(7, 1, 2, "strided") == [1, 3, 5]
    assert distributed.shard_indices(7, 1, 2, "contiguous") == [4, 5, 6]
    # blocks of micro-batch size: every rank's micro-batch is one of the single-process run
    assert distributed.shard_indices(11, 0, 2, "strided", block=3) == [0, 1, 2, 6, 7, 8]
    assert distributed.shard_indices(11, 1, 2, "strided", block=3) == [3, 4, 5, 9, 10]
    assert distributed.shard_indices(11, 1, 2, "contiguous", block=3) == [6, 7, 8, 9, 10]
    with pytest.raises(gisp.GispError, match="shard mode"):
        distributed.shard_indices(4, 0, 2, "random")
    with pytest.raises(gisp.GispError, match="outside a world"):
        distributed.shard_indices(4, 2, 2)


def test_single_process_is_a_world_of_one(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_from_env() is False
    assert not distributed.active() and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.all_reduce_float(2.5) == 2.5
    picks = [Pick("head", 1, 2), Pick("channel", 2, 5)]
    assert distributed.broadcast_picks(picks) == (picks, True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(gisp.GispError, match="torchrun"):
        distributed.init_from_env()
