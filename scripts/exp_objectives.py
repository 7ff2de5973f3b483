#!/usr/bin/env python
"""Experiment (issue #4): task-aligned objectives against language modelling on SmolLM2-135M.

Three GISP runs, one per objective, each read at 20/30/40/50% parameter sparsity
(prune once, deploy many):

(a) ``lm`` on c4 vs ``margin`` on cmqa, scored by the mean accuracy over the
    seven MC tasks (headline metric of each, lm-eval conventions) on held-out items;
(b) ``lm`` on c4 vs ``answer`` on gsm8k, scored by the bits per byte of GSM8K gold
    solutions given the question, on held-out questions.

Every level is evaluated on a freshly loaded base model with the run's nested
mask applied (``Trajectory.apply``). Differences come with paired standard
errors (same items for both models). Stages are cached under ``--out``; rerun
the same command to resume. Writes ``summary.json`` and ``summary.md`` there
(``--doc`` also copies the markdown to a file).

    nohup python scripts/exp_objectives.py --out runs/exp_objectives --doc docs/exp_objectives.md &
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

import gisp
from gisp.provenance import atomic_write_json, atomic_write_text, versions
from gisp.tasks import TASKS, evaluate_tasks
from gisp.tasks.gsm8k import ratio_stderr

RUNS = {"lm": ("lm", "c4"), "margin": ("margin", "cmqa"), "answer": ("answer", "gsm8k"),
        "margin_big": ("margin", "cmqa")}
SUITE = {"lm": ["mc", "gsm8k"], "margin": ["mc"], "answer": ["gsm8k"], "dense": ["mc", "gsm8k"], "margin_big": ["mc"]}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", default="runs/exp_objectives")
    p.add_argument("--doc", default=None, help="also write the markdown summary here")
    p.add_argument("--levels", default="0.2,0.3,0.4,0.5")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--autocast", default="bf16", help="pruning forward/backward precision")
    p.add_argument("--lm-samples", type=int, default=96, help="c4 windows")
    p.add_argument("--lm-seq-len", type=int, default=256)
    p.add_argument("--margin-samples", type=int, default=192, help="cmqa budget = samples * seq_len tokens")
    p.add_argument("--margin-seq-len", type=int, default=128)
    p.add_argument("--margin-big-samples", type=int, default=0,
                   help="also run margin on cmqa with this larger budget (x --margin-seq-len tokens); 0: skip")
    p.add_argument("--answer-samples", type=int, default=144, help="GSM8K question/solution pairs")
    p.add_argument("--answer-seq-len", type=int, default=256)
    p.add_argument("--prune-batch", type=int, default=8)
    p.add_argument("--mc-limit", type=int, default=250, help="held-out items per MC task")
    p.add_argument("--gsm-limit", type=int, default=300, help="held-out GSM8K questions")
    p.add_argument("--eval-batch", type=int, default=32)
    p.add_argument("--eval-autocast", default="none", help="evaluation precision: none (fp32), bf16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads; 0 = all cores when the machine is idle, 1 when it is shared (per stage)")
    p.add_argument("--precision-check", type=int, default=0, metavar="N",
                   help="only compare fp32 with the experiment's bf16-autocast evaluation of the dense model on the "
                        "first N held-out items per task (needs evals/dense.json)")
    p.add_argument("--notes", default=None, help="markdown appended to the summary (the analysis)")
    p.add_argument("--bench", type=int, default=0, metavar="N",
                   help="only measure scoring speed on N held-out items per MC task (shared vs separate contexts)")
    return p.parse_args()


def set_threads(args) -> int:
    """On a shared machine, one thread per process beats oversubscribed OpenMP barriers by 2-3x."""
    if args.threads:
        n = args.threads
    else:
        cores = os.cpu_count() or 1
        n = cores if os.getloadavg()[0] < cores + 0.5 else 1
    torch.set_num_threads(n)
    return n


def budget(args, run: str) -> tuple[int, int]:
    return {"lm": (args.lm_samples, args.lm_seq_len), "margin": (args.margin_samples, args.margin_seq_len),
            "answer": (args.answer_samples, args.answer_seq_len),
            "margin_big": (args.margin_big_samples, args.margin_seq_len)}[run]


def prune_run(args, run: str, target: float) -> gisp.Trajectory:
    out = Path(args.out) / f"run_{run}"
    objective, source = RUNS[run]
    samples, seq_len = budget(args, run)
    threads = set_threads(args)
    lm = gisp.load_model(args.model, dtype="fp32", device="cpu")
    calib = gisp.build_calibration(objective, source, lm.tokenizer, samples, seq_len, args.seed)
    cfg = gisp.PruneConfig(target=target, steps=args.steps, objective=objective, calib=source, calib_samples=samples,
                           seq_len=seq_len, batch_size=args.prune_batch, autocast=args.autocast, seed=args.seed)
    t0 = time.perf_counter()
    traj = gisp.prune(lm.model, cfg, calib, run_dir=out, resume=True, model_info={"name": args.model})
    print(f"[{run}] pruned in {time.perf_counter() - t0:.0f}s ({len(calib)} calibration samples, {threads} threads)",
          flush=True)
    return traj


def evaluate_level(args, run: str, level: float, traj: gisp.Trajectory | None) -> dict[str, Any]:
    key = "dense" if traj is None else f"{run}@{level:.2f}"
    path = Path(args.out) / "evals" / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    threads = set_threads(args)
    lm = gisp.load_model(args.model, dtype="fp32", device="cpu")
    rec: dict[str, Any] = {"run": run, "level": level, "step": 0, "sparsity": 0.0, "threads": threads,
                           "load_average": os.getloadavg()[0], "autocast": args.eval_autocast}
    if traj is not None:
        step = next(s for s in traj.steps if abs(s["target"] - level) < 1e-9)
        traj.apply(lm.model, step=step["step"])
        rec.update(step=step["step"], sparsity=step["sparsity"])
    tasks: list[str] = []
    if "mc" in SUITE[run]:
        tasks += list(TASKS)
    t0 = time.perf_counter()
    res = {}
    if tasks:
        res.update(evaluate_tasks(lm.model, lm.tokenizer, tasks, limit=args.mc_limit, batch_size=args.eval_batch,
                                  autocast=args.eval_autocast, details=True))
    if "gsm8k" in SUITE[run]:
        res.update(evaluate_tasks(lm.model, lm.tokenizer, ["gsm8k"], limit=args.gsm_limit,
                                  batch_size=args.eval_batch, autocast=args.eval_autocast, details=True))
    rec.update(results=res, seconds=time.perf_counter() - t0)
    atomic_write_json(path, rec)
    print(f"[{key}] evaluated in {rec['seconds']:.0f}s", flush=True)
    return rec


def correct(res: dict[str, Any], task: str) -> list[float]:
    m = res[task]["metric"]
    return [p[m] for p in res[task]["per_item"]]


def mc_mean(res: dict[str, Any], tasks: list[str] | None = None) -> tuple[float, float]:
    """Mean over tasks of each task's headline accuracy, and its standard error."""
    tasks = tasks or list(TASKS)
    means, var = [], 0.0
    for t in tasks:
        c = correct(res, t)
        mu = sum(c) / len(c)
        means.append(mu)
        var += sum((x - mu) ** 2 for x in c) / (len(c) - 1) / len(c)
    return sum(means) / len(means), math.sqrt(var) / len(tasks)


def mc_diff(a: dict[str, Any], b: dict[str, Any], tasks: list[str] | None = None) -> tuple[float, float]:
    """Mean accuracy of a minus b over the tasks (default: the seven), with its paired standard error."""
    tasks = tasks or list(TASKS)
    total, var = 0.0, 0.0
    for t in tasks:
        d = [x - y for x, y in zip(correct(a, t), correct(b, t), strict=True)]
        mu = sum(d) / len(d)
        total += mu
        var += sum((x - mu) ** 2 for x in d) / (len(d) - 1) / len(d)
    return total / len(tasks), math.sqrt(var) / len(tasks)


def yes_rate(res: dict[str, Any]) -> float:
    """BoolQ: fraction of items answered 'yes' (choice 1)."""
    items = res["boolq"]["per_item"]
    return sum(max(range(len(p["lls"])), key=lambda i: p["lls"][i]) == 1 for p in items) / len(items)


def bpb_diff(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float]:
    pa, pb = a["gsm8k"]["per_item"], b["gsm8k"]["per_item"]
    num = [(x["nll"] - y["nll"]) / math.log(2) for x, y in zip(pa, pb, strict=True)]
    den = [x["bytes"] for x in pa]
    return sum(num) / sum(den), ratio_stderr(num, den)


def describe_calibration(prov: dict[str, Any]) -> str:
    if prov.get("objective") == "margin":
        per = ", ".join(f"{t} {d['questions']} q/{d['tokens']} tok" for t, d in prov["tasks"].items())
        return f"{prov['samples']} questions (budget {prov['budget_tokens']} tokens): {per}"
    if prov.get("objective") == "answer":
        return (f"{prov['samples']} pairs, {prov['tokens']} tokens ({prov['answer_tokens']} answer tokens), "
                f"{prov['split']['items_used']} of {prov['split']['calib_items']} calibration questions")
    return (f"{prov.get('samples')} windows x {prov.get('seq_len')} tokens from the calibration part of "
            f"{prov.get('name')} ({prov.get('documents')} documents, {prov.get('tokens')} tokens)")


def mc_rows(evals: dict[str, dict[str, Any]], levels: list[float], run: str) -> list[str]:
    """One table row per level: lm's and ``run``'s mean accuracy and their paired difference."""
    rows = []
    for lv in levels:
        a, b = evals[f"lm@{lv:.2f}"], evals[f"{run}@{lv:.2f}"]
        diff, se = mc_diff(b["results"], a["results"])
        rows.append(f"| {lv:.0%} (measured {a['sparsity']:.3f} / {b['sparsity']:.3f}) | "
                    f"{pm(*mc_mean(a['results']))} | {pm(*mc_mean(b['results']))} | {pm(diff, se)} | "
                    f"{abs(diff) / se:.1f} |")
    return rows


def pm(v: float, se: float, digits: int = 3) -> str:
    return f"{v:.{digits}f} ± {se:.{digits}f}"


def summarise(args, evals: dict[str, dict[str, Any]], runs: dict[str, gisp.Trajectory], levels: list[float],
              timing: dict[str, float], command: str) -> str:
    dense = evals["dense"]["results"]
    lines = []
    vers = versions()
    lines += [
        "# Task-aligned objectives on SmolLM2-135M: margin and answer against lm", "",
        "## Setup (generated by scripts/exp_objectives.py)", "",
        f"- Command: `{command}` (stages are cached in `--out`: the runs and evaluations were computed by "
        "earlier calls with the same budgets; threads and load of each evaluation are listed below)",
        f"- Machine: {vers['platform']}, {vers['machine']}, {vers['cpu_count']} CPUs, CUDA: {vers['cuda']}",
        f"- Versions: gisp {vers['gisp']}, torch {vers['torch']}, transformers {vers['transformers']}, "
        f"python {vers['python']}",
        "- Machine load: the 2 cores were shared with other jobs; evaluation load averages "
        + ", ".join(f"{e.get('load_average', float('nan')):.1f}" for e in evals.values())
        + " (1-minute, at the start of each evaluation; torch threads "
        + ", ".join(str(e.get("threads", "?")) for e in evals.values()) + ")",
        f"- Model: {args.model} (fp32 weights); pruning autocast {args.autocast}; {args.steps} linear steps to "
        f"{max(levels):.0%} parameter sparsity, paper normalisation; levels read from each run's nested masks",
        f"- Calibration: lm = {args.lm_samples} c4 windows x {args.lm_seq_len} tokens; margin = cmqa, budget "
        f"{args.margin_samples} x {args.margin_seq_len} tokens; answer = {args.answer_samples} GSM8K "
        f"question/solution pairs (<= {args.answer_seq_len} tokens); seed {args.seed}",
        f"- Evaluation: held-out items only (split seed 0, 30% of each task reserved for calibration); "
        f"up to {args.mc_limit} items per MC task, {args.gsm_limit} GSM8K questions (first of the seeded "
        f"held-out order); fp32 weights, autocast {args.eval_autocast}; zero-shot lm-eval 0.4 prompts",
        "- Run times: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timing.items()),
        "",
    ]
    for run, traj in runs.items():
        lines.append(f"- `{run}` calibration: {describe_calibration(traj.calibration)}")
    lines += ["", "## (a) lm on c4 vs margin on cmqa: mean accuracy over the seven MC tasks", "",
              "Mean of each task's headline metric (acc for BoolQ/WinoGrande, acc_norm otherwise), ± standard "
              "error; the difference has a paired standard error (same items).", "",
              "| sparsity | lm (c4) | margin (cmqa) | margin - lm | |diff|/SE |", "|---|---|---|---|---|"]
    d_mean, d_se = mc_mean(dense)
    lines.append(f"| dense | {pm(d_mean, d_se)} | {pm(d_mean, d_se)} | - | - |")
    lines += mc_rows(evals, levels, "margin")
    if "margin_big" in runs:
        big = args.margin_big_samples * args.margin_seq_len
        lines += ["", f"The same with a {big}-token cmqa budget for margin ({args.margin_big_samples} x "
                  f"{args.margin_seq_len}; {describe_calibration(runs['margin_big'].calibration)}):", "",
                  "| sparsity | lm (c4) | margin, larger budget | difference | |diff|/SE |", "|---|---|---|---|---|"]
        lines += mc_rows(evals, levels, "margin_big")
    six = [t for t in TASKS if t != "boolq"]
    rates = {k: yes_rate(e["results"]) for k, e in evals.items() if "boolq" in e["results"]}
    gold_yes = sum(p["gold"] == 1 for p in dense["boolq"]["per_item"]) / len(dense["boolq"]["per_item"])
    lines += ["", f"BoolQ mostly measures a yes/no bias at this size: {gold_yes:.0%} of the evaluated items are 'yes'; "
              "the models answer 'yes' on " + ", ".join(f"{k} {v:.0%}" for k, v in rates.items()) + ". The same "
              "comparison without BoolQ (six tasks):", "",
              "| sparsity | lm (c4) | margin (cmqa) | margin - lm | |diff|/SE |", "|---|---|---|---|---|",
              f"| dense | {pm(*mc_mean(dense, six))} | {pm(*mc_mean(dense, six))} | - | - |"]
    for lv in levels:
        a, b = evals[f"lm@{lv:.2f}"]["results"], evals[f"margin@{lv:.2f}"]["results"]
        diff, se = mc_diff(b, a, six)
        lines.append(f"| {lv:.0%} | {pm(*mc_mean(a, six))} | {pm(*mc_mean(b, six))} | {pm(diff, se)} | "
                     f"{abs(diff) / se:.1f} |")
    lines += ["", "Per task (headline metric):", "",
              "| model | " + " | ".join(TASKS) + " |", "|---|" + "---|" * len(TASKS)]
    rows = [("dense", dense)] + [(f"{r} {lv:.0%}", evals[f"{r}@{lv:.2f}"]["results"])
                                 for lv in levels for r in ("lm", "margin", "margin_big") if r in runs]
    for label, res in rows:
        lines.append(f"| {label} | " + " | ".join(f"{res[t]['value']:.3f}" for t in TASKS) + " |")
    lines += ["", "## (b) lm on c4 vs answer on gsm8k: GSM8K gold-solution bits per byte (lower is better)", "",
              "| sparsity | lm (c4) | answer (gsm8k) | answer - lm | |diff|/SE |", "|---|---|---|---|---|"]
    g = dense["gsm8k"]
    lines.append(f"| dense | {pm(g['bpb'], g['bpb_stderr'])} | {pm(g['bpb'], g['bpb_stderr'])} | - | - |")
    for lv in levels:
        a, b = evals[f"lm@{lv:.2f}"], evals[f"answer@{lv:.2f}"]
        diff, se = bpb_diff(b["results"], a["results"])
        ga, gb = a["results"]["gsm8k"], b["results"]["gsm8k"]
        lines.append(f"| {lv:.0%} (measured {a['sparsity']:.3f} / {b['sparsity']:.3f}) | "
                     f"{pm(ga['bpb'], ga['bpb_stderr'])} | {pm(gb['bpb'], gb['bpb_stderr'])} | {pm(diff, se)} | "
                     f"{abs(diff) / se:.1f} |")
    lines += ["", "Items evaluated: " + ", ".join(f"{t} {dense[t]['items']}" for t in [*TASKS, "gsm8k"]) + ".", ""]
    out = Path(args.out)
    if (out / "fp32_vs_bf16.json").is_file():
        pc = json.loads((out / "fp32_vs_bf16.json").read_text())
        lines += ["## Evaluation precision check (dense model, `--precision-check`)", "",
                  "The tables above score with bf16 autocast (fp32 weights). The same held-out items scored in "
                  "fp32 (full precision):", "",
                  "| task | fp32 | bf16 autocast | items whose correctness changed | max abs log-likelihood diff |",
                  "|---|---|---|---|---|"]
        for t in TASKS:
            r = pc[t]
            lines.append(f"| {t} | {r['fp32']:.3f} | {r['bf16']:.3f} | {r['items_changed']} | "
                         f"{r['max_abs_ll_diff']:.3f} |")
        g = pc["gsm8k"]
        lines += [f"| gsm8k (bpb) | {g['fp32']:.4f} | {g['bf16']:.4f} | - | - |", ""]
    if (out / "bench.md").is_file():
        lines += ["## Scoring speed (`--bench`)", "", (out / "bench.md").read_text().strip(), "",
                  "'shared': each question's context runs once for all its choices (lm-eval's grouping of a "
                  "request's tokens); 'separate': every (context, choice) request is a full sequence. WinoGrande "
                  "varies the context and shares the continuation, so there is nothing to share.", ""]
    if args.notes:
        lines += [Path(args.notes).read_text().rstrip(), ""]
    return "\n".join(lines)


def bench(args) -> str:
    """Items per second and tokens forwarded, each context run once vs every request scored alone."""
    from gisp.tasks.evaluate import evaluate_mc, held_out_docs, resolve_task
    from gisp.tasks.scoring import forward_tokens

    lm = gisp.load_model(args.model, dtype="fp32", device="cpu")
    lines = [f"Scoring speed, {args.model} fp32, batch {args.eval_batch} requests, torch threads "
             f"{torch.get_num_threads()}, {args.bench} held-out items per task", "",
             "| task | items/s shared | items/s separate | tokens shared | tokens separate | work saved |",
             "|---|---|---|---|---|---|"]
    rows = {}
    for name in TASKS:
        spec, data = resolve_task(name)
        docs, _ = held_out_docs(data, 0, args.bench)
        reqs = [r for d in docs for r in spec.to_item(d).requests]
        speed = {}
        for share in (True, False, True, False):  # interleaved, best of two: the machine may be shared
            r = evaluate_mc(lm.model, lm.tokenizer, spec, docs, batch_size=args.eval_batch, progress=False,
                            autocast="none", share_context=share)
            speed[share] = max(speed.get(share, 0.0), r["items_per_second"])
        tok = {sh: forward_tokens(lm.tokenizer, reqs, sh) for sh in (True, False)}
        rows[name] = {"items_per_s": speed, "tokens": tok}
        lines.append(f"| {name} | {speed[True]:.2f} | {speed[False]:.2f} | {tok[True]} | {tok[False]} | "
                     f"{1 - tok[True] / tok[False]:.0%} |")
        print(lines[-1], flush=True)
    atomic_write_json(Path(args.out) / "bench.json", rows)
    return "\n".join(lines)


def precision_check(args) -> dict[str, Any]:
    """Dense model: fp32 against the experiment's evaluation precision, same held-out items, per task."""
    bf = json.loads((Path(args.out) / "evals" / "dense.json").read_text())["results"]
    lm = gisp.load_model(args.model, dtype="fp32", device="cpu")
    fp = evaluate_tasks(lm.model, lm.tokenizer, [*TASKS, "gsm8k"], limit=args.precision_check,
                        batch_size=args.eval_batch, details=True, progress=False)
    out: dict[str, Any] = {}
    for t in TASKS:
        a, b = fp[t], bf[t]
        m = a["metric"]
        pairs = list(zip(a["per_item"], b["per_item"]))  # the same first items of the seeded held-out order
        out[t] = {"fp32": a["value"], "bf16": sum(y[m] for _, y in pairs) / len(pairs),
                  "items_changed": sum(x[m] != y[m] for x, y in pairs),
                  "max_abs_ll_diff": max(abs(u - v) for x, y in pairs for u, v in zip(x["lls"], y["lls"])),
                  "fp32_items_per_s": a["items_per_second"], "seconds": a["seconds"]}
        print(t, out[t], flush=True)
    out["gsm8k"] = {"fp32": fp["gsm8k"]["bpb"], "bf16": bf["gsm8k"]["bpb"],
                    "fp32_items_per_s": fp["gsm8k"]["items_per_second"]}
    atomic_write_json(Path(args.out) / "fp32_vs_bf16.json", out)
    return out


def main() -> None:
    args = parse()
    set_threads(args)
    if args.precision_check:
        precision_check(args)
        return
    if args.bench:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        md = bench(args)
        atomic_write_text(Path(args.out) / "bench.md", md)
        print(md)
        return
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    levels = [float(x) for x in args.levels.split(",")]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    timing: dict[str, float] = {}
    runs: dict[str, gisp.Trajectory] = {}
    for run in RUNS:
        if run == "margin_big" and not args.margin_big_samples:
            continue
        runs[run] = prune_run(args, run, max(levels))
        timing[f"prune {run}"] = sum(s.get("seconds", 0.0) for s in runs[run].steps)
    evals = {"dense": evaluate_level(args, "dense", 0.0, None)}
    for lv in levels:
        for run, traj in runs.items():
            evals[f"{run}@{lv:.2f}"] = evaluate_level(args, run, lv, traj)
    timing["evaluation (all levels)"] = sum(e["seconds"] for e in evals.values())
    md = summarise(args, evals, runs, levels, timing, command)
    summary = {"levels": levels, "timing_s": timing, "command": command,
               "evals": {k: {kk: vv for kk, vv in v.items() if kk != "results"} for k, v in evals.items()}}
    atomic_write_json(Path(args.out) / "summary.json", summary)
    atomic_write_text(Path(args.out) / "summary.md", md)
    if args.doc:
        atomic_write_text(args.doc, md)
    print(md, flush=True)


if __name__ == "__main__":
    main()
