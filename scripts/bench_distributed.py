"""One process vs two (torchrun, gloo) on SmolLM2-135M: same trajectory? how long?

The single process uses both cores (2 torch threads); the two ranks use one
thread each, so both runs have the same CPU. Each rank takes half of the
calibration set; gradients are all-reduced before scoring. Compared: the
structure steps and orders (must be bit-equal), the per-step calibration losses
(float tolerance), and the time of the prune call and of its gradient passes.

    python scripts/bench_distributed.py               # -> docs/bench_scale.md (section "distributed")
    python scripts/bench_distributed.py --quick       # smoke run
    python scripts/bench_distributed.py worker OUT JSON   # one rank (internal; torchrun starts it)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import ROOT, command, machine, machine_block, md_table, write_section  # noqa: E402

STRUCTURE = ("head_step", "channel_step", "head_order", "channel_order")


def worker(out: Path, cfg: dict) -> None:
    import torch

    import gisp
    from gisp import distributed
    from gisp.prune import PruneConfig, prune

    distributed.init_from_env()
    r = distributed.rank()
    loaded = gisp.load_model("smollm2-135m", dtype=cfg["dtype"], device="cpu")
    calib = gisp.build_calibration("lm", "c4", loaded.tokenizer, cfg["samples"], cfg["seq_len"], 0)
    config = PruneConfig(target=cfg["target"], steps=cfg["steps"], calib_samples=cfg["samples"],
                         seq_len=cfg["seq_len"], batch_size=cfg["batch"])
    t0 = time.perf_counter()
    traj = prune(loaded.model, config, calib, run_dir=out / f"run{r}", progress=False)
    seconds = time.perf_counter() - t0
    result = {"rank": r, "world": distributed.world_size(), "threads": torch.get_num_threads(),
              "prune_seconds": seconds, "traj": traj.to_dict()}
    (out / f"result{r}.json").write_text(json.dumps(result))
    distributed.shutdown()


def launch(out: Path, cfg: dict, procs: int) -> tuple[list[dict], float]:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // procs))}
    env.pop("WORLD_SIZE", None)
    args = [__file__, "worker", str(out), json.dumps(cfg)]
    cmd = ([sys.executable, *args] if procs == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), *args])
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{procs}-process run failed:\n{r.stderr[-3000:]}")
    return [json.loads((out / f"result{i}.json").read_text()) for i in range(procs)], wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", nargs="?", default="all", choices=["all", "worker"])
    ap.add_argument("out", nargs="?")
    ap.add_argument("config", nargs="?")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--target", type=float, default=0.3)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()
    if args.mode == "worker":
        worker(Path(args.out), json.loads(args.config))
        return
    if args.quick:
        args.samples, args.seq_len, args.steps = 4, 32, 2
    t_start = time.perf_counter()
    info = machine()
    cfg = {"samples": args.samples, "seq_len": args.seq_len, "batch": args.batch, "steps": args.steps,
           "target": args.target, "dtype": args.dtype}
    with tempfile.TemporaryDirectory() as tmp:
        one, wall1 = launch(Path(tmp) / "one", cfg, 1)
        two, wall2 = launch(Path(tmp) / "two", cfg, 2)
        only_rank0 = (Path(tmp) / "two" / "run0").exists() and not (Path(tmp) / "two" / "run1").exists()
    a = one[0]["traj"]
    same = {k: all(r["traj"][k] == a[k] for r in two) for k in STRUCTURE}
    losses = [(x["calib_loss"], y["calib_loss"]) for x, y in zip(a["steps"], two[0]["traj"]["steps"])]
    rel = max(abs(x - y) / abs(x) for x, y in losses if x is not None)
    ranks_agree = all(r["traj"][k] == two[0]["traj"][k] for r in two for k in STRUCTURE)

    def grad_s(res: dict) -> float:
        return sum(s.get("gradient_seconds", 0.0) for s in res["traj"]["steps"])

    rows = [
        ["1 process x 2 threads", f"{wall1:.1f}", f"{one[0]['prune_seconds']:.1f}", f"{grad_s(one[0]):.1f}"],
        ["2 processes x 1 thread (torchrun, gloo)", f"{wall2:.1f}",
         f"{max(r['prune_seconds'] for r in two):.1f}", f"{max(grad_s(r) for r in two):.1f}"],
    ]
    verdict = "yes" if all(same.values()) else "NO"
    body = "\n".join([
        "## One process vs two (CPU, gloo)",
        "",
        f"SmolLM2-135M in {args.dtype}, {args.samples} c4 windows x {args.seq_len} tokens, micro-batch "
        f"{args.batch}, target {args.target} in {args.steps} steps (complete run, final loss included). Both "
        "runs have the same 2 cores; each rank takes half of the windows (strided shard) and the gradients "
        "are all-reduced (SUM) before scoring.",
        "",
        md_table(["run", "wall s (with start-up)", "prune() s", "gradient passes s"], rows),
        "",
        f"- Same structure steps and orders as the single process: **{verdict}** "
        f"({', '.join(f'{k}: {v}' for k, v in same.items())}); the two ranks agree: {ranks_agree}.",
        f"- Calibration losses: largest relative difference {rel:.1e} (summation order differs).",
        f"- Only rank 0 wrote its run directory (each rank was given its own): {only_rank0}.",
        "- On 2 shared cores two processes cannot be faster than one: this checks equality and the cost of "
        "the all-reduce, not speed-up. With one GPU per rank the gradient passes split N ways and the "
        "all-reduce of the gradient (prunable weights, fp32) is added once per step.",
        "",
        machine_block(info, command(), time.perf_counter() - t_start),
    ])
    raw = {"machine": info, "command": command(), "config": cfg, "one": one, "two": two, "wall": [wall1, wall2],
           "same_structure": same, "max_rel_loss_diff": rel}
    print(f"same structure: {same}; max rel loss diff {rel:.1e}; wall {wall1:.1f} s vs {wall2:.1f} s", flush=True)
    if not args.no_doc:
        print(f"wrote {write_section('distributed', body, raw, args.json)}")
    elif args.json:
        from gisp.provenance import atomic_write_json

        atomic_write_json(args.json, raw)


if __name__ == "__main__":
    main()
