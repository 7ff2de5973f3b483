#!/usr/bin/env python
"""Experiment (issue #12, part 3): how many steps and how much calibration GISP needs.

Two curves on SmolLM2-135M, each point one GISP run to 50% parameter sparsity read
at 30% and 50% (prune once, deploy many), scored by wiki perplexity (eval part,
128-token windows):

* steps: 5 ... 80 at a fixed calibration budget (``--tokens``, default 4k);
* calibration tokens: 4k ... 256k (``--seq-len``-token c4 windows) at fixed ``--fixed-steps`` (10).

The default grids are the issue's (several hours on one CPU core, run cheapest first); change them with
``--steps-grid``/``--tokens-grid`` (cells already done are kept).

Every cell is a plain ``gisp prune ... --resume`` followed by ``gisp eval``, so a
killed experiment (or one spread over several sessions) continues where it stopped:
rerun the same command. Cells run cheapest first; ``--max-hours`` stops before a
cell that would start after the limit. Writes ``summary.json``, the markdown
(``--doc``) and a plot (``--plot``) from whatever cells are done.

``--record`` is a JSON file kept in the repository with every finished cell (its numbers and
commands, not the pruned runs): cells found there are not run again, so the table survives the
loss of ``--out`` (a new machine, a cleaned ``runs/``) and grows across sessions.

    OMP_NUM_THREADS=1 nohup python scripts/exp_budget.py --doc docs/exp_budget.md --plot docs/exp_budget.png \
        --notes docs/exp_budget_notes.md --record docs/exp_budget.json &
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_common import machine, refuse_emulated  # noqa: E402

from gisp.provenance import atomic_write_json, atomic_write_text, save_figure  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", default="runs/exp_budget")
    p.add_argument("--doc", default=None, help="write the markdown summary here")
    p.add_argument("--plot", default=None, help="write the PNG of both curves here")
    p.add_argument("--notes", default=None, help="markdown file with the analysis, included as it is")
    p.add_argument("--record", default=None, help="JSON of finished cells, read first and rewritten after each cell")
    p.add_argument("--steps-grid", default="5,10,20,40,80")
    p.add_argument("--tokens-grid", default="4096,8192,16384,32768,65536,131072,262144")
    p.add_argument("--tokens", type=int, default=4096, help="calibration tokens of the steps curve")
    p.add_argument("--fixed-steps", type=int, default=10, help="steps of the calibration curve")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--levels", default="0.3,0.5")
    p.add_argument("--autocast", default="bf16")
    p.add_argument("--shrink-every", type=int, default=1)
    p.add_argument("--max-windows", type=int, default=128)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--max-hours", type=float, default=0.0, help="start no cell after this many hours; 0: none")
    p.add_argument("--allow-emulated", action="store_true",
                   help="compute cells under --autocast bf16 even where bf16 is emulated (about 25x slower)")
    p.add_argument("--only-summary", action="store_true", help="write the summary of the cells done, run nothing")
    return p.parse_args()


def cells(args: argparse.Namespace) -> list[dict[str, int]]:
    """(steps, tokens) points of both curves, deduplicated, cheapest (steps x tokens) first."""
    pts = {(int(s), args.tokens) for s in args.steps_grid.split(",")}
    pts |= {(args.fixed_steps, int(t)) for t in args.tokens_grid.split(",")}
    return [{"steps": s, "tokens": t} for s, t in sorted(pts, key=lambda st: (st[0] * st[1], st))]


def gisp_cmd(*argv: str) -> list[str]:
    return [sys.executable, "-m", "gisp", *argv]


def run_cell(args: argparse.Namespace, cell: dict[str, int], out: Path) -> dict[str, Any]:
    """Prune (resuming) and evaluate one cell; cached in ``cells/<name>/result.json``."""
    name = f"s{cell['steps']}_t{cell['tokens']}"
    cdir = out / "cells" / name
    result_file = cdir / "result.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    samples = cell["tokens"] // args.seq_len
    prune = gisp_cmd("prune", args.model, "--out", str(cdir / "run"), "--calib", "c4",
                     "--calib-samples", str(samples), "--seq-len", str(args.seq_len), "--steps", str(cell["steps"]),
                     "--target", str(args.target), "--autocast", args.autocast,
                     "--shrink-every", str(args.shrink_every), "--resume")
    evaluate = gisp_cmd("eval", str(cdir / "run"), "--sparsity", args.levels, "--ppl", "wiki",
                        "--window", str(args.window), "--max-windows", str(args.max_windows),
                        "--json", str(cdir / "eval.json"))
    cdir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    subprocess.run(prune, check=True)
    t1 = time.time()
    subprocess.run(evaluate, check=True)
    t2 = time.time()
    traj = json.loads((cdir / "run" / "trajectory.json").read_text())
    result = {"cell": name, **cell, "calib_samples": samples, "seq_len": args.seq_len,
              "prune_command": shlex.join(prune[1:]), "eval_command": shlex.join(evaluate[1:]),
              "prune_wall_s_this_session": round(t1 - t0, 1), "eval_wall_s": round(t2 - t1, 1),
              "prune_time_s_recorded": sum(st.get("seconds", 0.0) for st in traj.get("steps", [])),
              "eval": json.loads((cdir / "eval.json").read_text())}
    result["ppl"] = level_ppl(result)
    atomic_write_json(result_file, result)
    return result


def level_ppl(result: dict[str, Any]) -> dict[str, float]:
    """requested sparsity (as text) -> wiki perplexity, from the eval JSON of a cell."""
    if "ppl" in result:  # cells kept in --record may carry only the numbers
        return result["ppl"]
    return {f"{float(row['requested_sparsity']):.2f}": row["ppl"]["ppl"] for row in result["eval"]["rows"]}


def summary(args: argparse.Namespace, done: list[dict[str, Any]], out: Path) -> None:
    levels = [f"{float(x):.2f}" for x in args.levels.split(",")]
    shown = [a for a in sys.argv[1:] if a != "--only-summary"]  # the command that computes it all
    lines = ["# How many steps and how much calibration GISP needs (SmolLM2-135M)", "",
             f"Generated by `{shlex.join(['python', 'scripts/exp_budget.py', *shown])}`; every cell is a "
             f"`gisp prune` to {args.target:.0%} parameter sparsity (c4 calibration, {args.seq_len}-token windows, "
             f"autocast {args.autocast}, --shrink-every {args.shrink_every}, linear schedule, seed 0) read at "
             f"{', '.join(levels)} and scored by wiki perplexity (evaluation part, {args.window}-token windows, "
             f"{args.max_windows} windows, fp32). Prune time is the sum of the recorded step times on this machine "
             "(2 CPU cores; how they were shared is in the notes).", "",
             "| steps | calib tokens | " + " | ".join(f"ppl @ {lv}" for lv in levels)
             + " | prune s (sum of steps) | eval s |",
             "|---|---|" + "---|" * len(levels) + "---|---|"]
    for r in sorted(done, key=lambda r: (r["steps"], r["tokens"])):
        ppl = level_ppl(r)
        lines.append(f"| {r['steps']} | {r['tokens']:,} | " + " | ".join(f"{ppl.get(lv, float('nan')):.2f}"
                     for lv in levels) + f" | {r['prune_time_s_recorded']:.0f} | {r['eval_wall_s']:.0f} |")
    missing = [c for c in cells(args) if f"s{c['steps']}_t{c['tokens']}" not in {r["cell"] for r in done}]
    if missing:
        lines += ["", "Not run yet (rerun the command to continue): " +
                  ", ".join(f"{c['steps']} steps x {c['tokens']:,} tokens" for c in missing) + "."]
    if args.plot and args.doc and done:
        rel = os.path.relpath(Path(args.plot).resolve(), Path(args.doc).resolve().parent)
        lines += ["", f"![wiki perplexity against steps and calibration tokens]({rel})"]
    if args.notes:
        lines += ["", Path(args.notes).read_text().strip()]
    info = machine()
    lines += ["", "Machine and versions: " + ", ".join(f"{k} {v}" for k, v in info.items()) + "."]
    text = "\n".join(lines) + "\n"
    atomic_write_json(out / "summary.json", {"cells": done, "missing": missing, "machine": info})
    if args.record:
        atomic_write_json(args.record, {"about": RECORD_ABOUT, "cells": sorted(done, key=lambda r: r["cell"]),
                                        "missing": missing, "machine": info})
    if args.doc:
        atomic_write_text(args.doc, text)
    if args.plot and done:
        plot(args, done, levels)
    print(text)


def plot(args: argparse.Namespace, done: list[dict[str, Any]], levels: list[str]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    curves = [("steps", [r for r in done if r["tokens"] == args.tokens], f"calibration {args.tokens:,} tokens"),
              ("tokens", [r for r in done if r["steps"] == args.fixed_steps], f"{args.fixed_steps} steps")]
    for ax, (key, rows, fixed) in zip(axes, curves):
        rows = sorted(rows, key=lambda r: r[key])
        if not rows:
            ax.set_title(f"{fixed}: no cell done yet")
            continue
        for lv in levels:
            ax.plot([r[key] for r in rows], [level_ppl(r).get(lv, float("nan")) for r in rows], "o-",
                    label=f"{float(lv):.0%} sparsity")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("GISP steps" if key == "steps" else "calibration tokens")
        ax.set_ylabel("wiki perplexity")
        ax.set_title(f"SmolLM2-135M, {fixed}")
        ax.legend()
    save_figure(fig, args.plot)


RECORD_ABOUT = ("Finished cells of scripts/exp_budget.py (numbers and commands; the pruned runs stay in --out). "
                "Cells with 'recovered_from' were rebuilt from the committed report after their run directories "
                "were lost: they hold only the reported numbers.")


def recorded(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Cells kept in ``--record``, by name."""
    if not args.record or not Path(args.record).is_file():
        return {}
    return {r["cell"]: r for r in json.loads(Path(args.record).read_text())["cells"]}


def main() -> None:
    args = parse()
    refuse_emulated(args)
    out = ROOT / args.out if not Path(args.out).is_absolute() else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    # every finished cell by name: the record's, replaced by those computed in --out
    found = {**recorded(args), **{f.parent.name: json.loads(f.read_text()) for f in out.glob("cells/*/result.json")}}
    done = []
    for cell in cells(args):
        name = f"s{cell['steps']}_t{cell['tokens']}"
        if name in found:
            done.append(found[name])
            continue
        if args.only_summary or (args.max_hours and time.time() - start > args.max_hours * 3600):
            continue
        done.append(run_cell(args, cell, out))
        summary(args, done, out)
    # cells of earlier grids stay in the table (same protocol, other points); only the curves' cells are plotted
    names = {r["cell"] for r in done}
    done += [r for n, r in sorted(found.items()) if n not in names]
    summary(args, done, out)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
