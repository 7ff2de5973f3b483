"""Regenerate docs/results.md: every method on SmolLM2-135M, one calibration set, one protocol.

Runs ``gisp compare`` (in-process, resumable: rerunning after an interruption
continues) with the budgets below, then writes ``docs/results.md`` with the
machine, versions, exact command, the table, the plot and GISP's per-layer
report, plus the measured findings (which method wins at each sparsity).

    python scripts/make_results.py                 # ~30-60 min on 2 CPU cores
    python scripts/make_results.py --notes docs/results_notes.md   # add hand-written analysis
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

from gisp.compare import DEFAULT_METHODS, CompareConfig, compare, markdown_table
from gisp.layer_report import write_layer_report
from gisp.provenance import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = float("nan")
    return f"{cpu}, {os.cpu_count()} CPUs visible, {mem:.0f} GiB RAM, {platform.platform()}"


def threads() -> int:
    import torch

    return torch.get_num_threads()


def cost(results: dict) -> str:
    """Compute time recorded in the rows, so a resumed comparison reports its whole cost."""
    rows = results["rows"] + ([results["dense"]] if results.get("dense") else [])
    ev = sum(r.get("eval_seconds") or 0 for r in rows)
    runs = {}
    for r in results["rows"]:
        runs[r["method"]] = max(runs.get(r["method"], 0), r.get("run_seconds") or 0)
    pr = sum(runs.values())
    return (f"Recorded compute: pruning {pr / 60:.1f} min (all methods, all levels) + evaluation {ev / 60:.1f} min "
            f"({len(rows)} evaluations) = {(pr + ev) / 60:.1f} min.")


def findings(results: dict) -> list[str]:
    """Per sparsity: the best method, GISP's rank and its ratio to the best other method."""
    out = []
    rows = results["rows"]
    for s in results["settings"]["sparsities"]:
        at = sorted((r["ppl"]["ppl"], r["method"]) for r in rows if r["requested_sparsity"] == s)
        if not at:
            continue
        best_ppl, best = at[0]
        names = [m for _, m in at]
        line = f"- {s:.0%}: best {best} ({best_ppl:.2f})"
        if "gisp" in names:
            g = dict((m, p) for p, m in at)["gisp"]
            others = [(p, m) for p, m in at if m != "gisp"]
            if others:
                line += (f"; GISP {g:.2f} ranks {names.index('gisp') + 1} of {len(names)}, "
                         f"{g / others[0][0]:.2f}x the best other method ({others[0][1]}, {others[0][0]:.2f})")
        out.append(line)
    return out


def accuracy_section(results: dict) -> list[str]:
    """Mean accuracy per method and level, with its standard error, and the best method per level."""
    p = results["protocol"]
    sp = results["settings"]["sparsities"]
    by = {(r["method"], r["requested_sparsity"]): r for r in results["rows"]}

    def cell(r: dict | None) -> str:
        if not r or r.get("mean_acc") is None:
            return "-"
        t = r["tasks"]
        se = math.sqrt(sum((v.get("stderr") or 0.0) ** 2 for v in t.values())) / len(t)
        return f"{r['mean_acc']:.3f} ± {se:.3f}"

    lines = ["## Accuracy", "",
             f"Mean over {', '.join(p['tasks'])} of each task's headline metric (acc for BoolQ/WinoGrande, "
             f"acc_norm otherwise; lm-eval 0.4 prompts, zero-shot), the first {p['limit']} held-out items of "
             "each task (split seed 0: items never used by the cmqa calibration of gisp-margin), "
             f"{p['eval_dtype']}; ± = standard error of the mean (per-task binomial errors combined).", "",
             f"Dense: {cell(results['dense'])}", "",
             "| method | " + " | ".join(f"{s:.0%}" for s in sp) + " |", "|" + "---|" * (len(sp) + 1)]
    for m in results["methods"]:
        lines.append(f"| {m} | " + " | ".join(cell(by.get((m, s))) for s in sp) + " |")
    lines += ["", "![mean accuracy against sparsity](results_accuracy.png)", ""]
    for s in sp:
        at = sorted(((r["mean_acc"], r["method"]) for r in results["rows"]
                     if r["requested_sparsity"] == s and r.get("mean_acc") is not None), reverse=True)
        if at:
            ranks = {m: i + 1 for i, (_, m) in enumerate(at)}
            lines.append(f"- {s:.0%}: best {at[0][1]} ({at[0][0]:.3f}); gisp-margin ranks "
                         f"{ranks.get('gisp-margin', '-')}, gisp ranks {ranks.get('gisp', '-')} of {len(at)}")
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default=str(ROOT / "runs" / "results"), help="comparison directory (resumable)")
    ap.add_argument("--docs", default=str(ROOT / "docs"), help="where results.md and its PNGs go")
    ap.add_argument("--methods", default=",".join(["gisp", "gisp-margin", *DEFAULT_METHODS[1:], "torch-pruning",
                                                   "torch-pruning-taylor"]))
    ap.add_argument("--sparsities", default="0.2,0.3,0.4,0.5")
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--tasks", default="boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa",
                    help="accuracy tasks ('' to skip)")
    ap.add_argument("--limit", type=int, default=20, help="held-out items per task")
    ap.add_argument("--task-calib", default="cmqa", help="calibration of gisp-margin")
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--max-windows", type=int, default=64)
    ap.add_argument("--autocast", default="bf16", help="mixed precision of the gradient passes only")
    ap.add_argument("--notes", default=None, help="a markdown file appended verbatim as the analysis")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default); 1 is faster "
                    "than 2 on a 2-core machine shared with other jobs")
    a = ap.parse_args()
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)

    cfg = CompareConfig(
        model=a.model, methods=a.methods.split(","), sparsities=[float(x) for x in a.sparsities.split(",")],
        out=a.out, calib=a.calib, calib_samples=a.calib_samples, seq_len=a.seq_len, steps=a.steps,
        window=a.window, max_windows=a.max_windows, autocast=a.autocast,
        tasks=[t for t in a.tasks.split(",") if t], limit=a.limit or None, task_calib=a.task_calib,
    )
    shown_out = os.path.relpath(a.out, ROOT) if Path(a.out).resolve().is_relative_to(ROOT) else a.out
    command = (f"gisp compare {a.model} --methods {a.methods} --sparsities {a.sparsities} --out {shown_out} "
               f"--calib {a.calib} --calib-samples {a.calib_samples} --seq-len {a.seq_len} --steps {a.steps} "
               f"--ppl wiki --window {a.window} --max-windows {a.max_windows} --autocast {a.autocast}"
               + (f" --tasks {a.tasks} --limit {a.limit} --task-calib {a.task_calib}" if a.tasks else ""))
    t0 = time.perf_counter()
    results = compare(cfg, command=command, progress=False, log=lambda m: print(f"[compare] {m}", flush=True))
    wall = time.perf_counter() - t0

    docs = Path(a.docs)
    docs.mkdir(parents=True, exist_ok=True)
    out = Path(a.out)
    shutil.copy(out / "perplexity.png", docs / "results_perplexity.png")
    if (out / "accuracy.png").is_file():
        shutil.copy(out / "accuracy.png", docs / "results_accuracy.png")
    layer_md = []
    if (out / "methods" / "gisp" / "trajectory.json").is_file():
        rep = write_layer_report(out / "methods" / "gisp", cfg.sparsities, out / "methods" / "gisp")
        for key in ("heatmap", "lines"):
            shutil.copy(rep.files[key], docs / f"results_gisp_layers_{key}.png")
        layer_md = ["## Where GISP pruned", ""] + [f"- {s}" for s in rep.statements()] + [
            "", "![GISP per-layer kept fractions (heatmap)](results_gisp_layers_heatmap.png)",
            "![GISP per-layer kept fractions (lines)](results_gisp_layers_lines.png)", ""]

    v, c, p, m = results["versions"], results["calibration"], results["protocol"], results["model"]
    lines = [
        f"# Structured pruning methods compared on {m.get('name')}",
        "",
        f"Generated by `python scripts/make_results.py {' '.join(sys.argv[1:])}` (do not edit by hand; the "
        "analysis comes from `--notes`).",
        "",
        f"- Command: `{command}`",
        f"- Machine: {machine()}; torch threads {threads()}. {cost(results)}",
        f"- Versions: gisp {v['gisp']}, torch {v['torch']}, transformers {v['transformers']}, torch-pruning "
        f"{v['torch_pruning']}, python {v['python']}.",
        f"- Model: `{m.get('name')}` ({m.get('model_type')}, fingerprint {m.get('fingerprint')}, "
        f"{m.get('dense_params', 0):,} decoder linear parameters).",
        f"- Calibration, shared by every method: `{c.get('name')}` {c.get('part')} part, {c.get('samples')} random "
        f"windows x {c.get('seq_len')} tokens, seed {c.get('seed')}; gradient passes in autocast "
        f"{p['autocast_of_gradient_passes']}.",
        f"- Evaluation: `{p['ppl_source']}` eval part (held out from calibration), first {p['windows']} "
        f"non-overlapping {p['window']}-token windows, each scored independently, {p['eval_dtype']}.",
        f"- Sparsity: {p['sparsity_definition']}.",
        "",
        "## Perplexity",
        "",
        markdown_table(results),
        "![perplexity against sparsity](results_perplexity.png)",
        "",
        *(accuracy_section(results) if p["tasks"] else []),
        "## Findings (computed)",
        "",
        *findings(results),
        "",
        "## Methods and their settings",
        "",
    ]
    for name, d in results["methods"].items():
        s = {k: val for k, val in d["settings"].items() if k not in ("method", "nested", "reference")}
        lines.append(f"- `{name}` ({'nested' if d['nested'] else 'one run per level'}): {d['reference']}. "
                     + ", ".join(f"{k}={val}" for k, val in s.items()))
    lines += ["", *layer_md]
    if a.notes:
        lines += [Path(a.notes).read_text().rstrip(), ""]
    atomic_write_text(docs / "results.md", "\n".join(lines))
    print(f"wrote {docs / 'results.md'} in {wall / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
