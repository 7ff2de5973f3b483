"""Fault injection: an export killed with SIGKILL at random points never leaves a partial export behind."""

from __future__ import annotations

import copy
import multiprocessing
import random
import time
from multiprocessing.connection import Connection
from pathlib import Path

import torch
from safetensors.torch import load_file
from tests.conftest import random_calib, tiny_model

import gisp


def _child(base_dir: str, run: str, out: str, ready: Connection) -> None:
    """Export over and over until killed: every kill lands somewhere inside an export."""
    from transformers import LlamaForCausalLM

    torch.set_num_threads(1)
    base = LlamaForCausalLM.from_pretrained(base_dir).eval()
    ready.send("ready")
    while True:
        gisp.export(run, out, model=base, sparsity=0.3, overwrite=True)


KILLS = 5


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def same_export(path: Path, ref: Path) -> bool:
    """Complete (every file the reference has) and the same tensors."""
    if sorted(p.name for p in path.iterdir()) != sorted(p.name for p in ref.iterdir()):
        return False
    a, b = tensors(path), tensors(ref)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_kill_9_at_random_points_leaves_nothing_partial(tmp_path):
    base = tiny_model("llama", 2, layers=4)
    base.save_pretrained(tmp_path / "base")
    traj = gisp.prune(copy.deepcopy(base), gisp.PruneConfig(target=0.5, steps=4, batch_size=4, protect_first=0.25),
                      random_calib(n=8, seq_len=16), progress=False,
                      model_info={"name": str(tmp_path / "base"), "path": str(tmp_path / "base")})
    run, work = tmp_path / "run", tmp_path / "exports"
    traj.save(run)
    work.mkdir()
    t0 = time.perf_counter()
    ref = gisp.export(run, tmp_path / "ref", model=base, sparsity=0.3).path  # uninterrupted
    once = time.perf_counter() - t0
    out = work / "o"
    # children fork from a server that imported torch, transformers and gisp once: each starts in well under
    # a second, and SIGKILL ends it exactly as kill -9 ends a gisp export
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "transformers", "gisp.deploy.export", "tests.deploy.test_export_kill"])
    rng = random.Random(0)
    survived = 0
    for k in range(KILLS):
        receive, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(str(tmp_path / "base"), str(run), str(out), send))
        proc.start()
        assert receive.poll(120) and receive.recv() == "ready"
        if k % 2:  # anywhere in the loop of exports
            time.sleep(rng.uniform(0.0, 3 * once))
        else:  # while files are being written: once a staging entry appears, within a few milliseconds
            deadline = time.monotonic() + 30
            while not any(p.name.startswith(".o.") for p in work.iterdir()) and time.monotonic() < deadline:
                time.sleep(0.0005)
            time.sleep(rng.uniform(0.0, 0.01))
        proc.kill()
        proc.join()
        receive.close()
        send.close()
        assert proc.exitcode == -9
        # the final name holds nothing or a complete export (the previous one), never a partial one
        survived += (not out.exists()) or same_export(out, ref)
    assert survived == KILLS, f"{KILLS - survived} of {KILLS} kills left a partial export"
    gisp.export(run, out, model=base, sparsity=0.3, overwrite=True)  # the next export cleans up and succeeds
    assert [p.name for p in work.iterdir()] == ["o"], "stale temporaries left after the next export"
    assert same_export(out, ref)
    print(f"kills: {KILLS}, survived: {survived}")
