#!/usr/bin/env python
"""Experiment (issue #12): quality past the paper, side by side, from one command.

On SmolLM2-135M, at 20/30/40/50% parameter sparsity, with one calibration set
(c4, seeded windows) and one evaluation protocol (wiki perplexity in fixed
windows of the evaluation part; the 7-task mean accuracy on held-out items):

* training-free rows: GISP raw, +bias, +lsq; FLAP (its own compensation), +lsq;
  LLM-Pruner raw, +lsq: one ``gisp compare --reconstruct bias,lsq``;
* recovery rows: each method's +lsq level exported (``gisp.export``), then
  ``gisp recover`` with LoRA (every method, same token budget) and, for GISP,
  LoRA distilled from the dense model (``--teacher-from-run``);
* GISP alone with ``--more-steps`` (20) on the same calibration tokens: rows gisp/20;
* accuracy: every row above, cheapest to decide first (dense, then 30% and 50%).

Everything is cached under ``--out`` cell by cell (compare rows, exports,
recovery checkpoints, accuracy files), so a killed experiment, or one spread
over several sessions, continues where it stopped: rerun the same command.
``--max-hours`` starts no new cell after the limit; ``--only-summary`` writes the
report of what is done. The report (``--doc``) states the compute of every cell.

``--record`` is a JSON file kept in the repository with every finished number (not the
models): a cell found there is not computed again, so the report survives the loss of
``--out`` (a new machine, a cleaned ``runs/``) and grows across sessions. A number
computed again in ``--out`` replaces the recorded one.

    nohup python scripts/exp_quality.py --doc docs/exp_quality.md --plot docs/exp_quality.png \
        --notes docs/exp_quality_notes.md --record docs/exp_quality.json &
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_common import machine, refuse_emulated  # noqa: E402

from gisp.provenance import atomic_write_json, atomic_write_text, save_figure  # noqa: E402

TASKS = "boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa"
METHODS = ("gisp", "flap", "llm-pruner")
RECOVERY = (("gisp", "lora"), ("gisp", "lora-kd"), ("flap", "lora"), ("llm-pruner", "lora"))
ROWS = ["gisp", "gisp+bias", "gisp+lsq", "gisp+lsq+lora", "gisp+lsq+lora-kd",
        "flap", "flap+bias", "flap+lsq", "flap+lsq+lora",
        "llm-pruner", "llm-pruner+bias", "llm-pruner+lsq", "llm-pruner+lsq+lora"]
TREATMENTS = ("", "+bias", "+lsq", "+lsq+lora")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", default="runs/exp_quality")
    p.add_argument("--doc", default=None, help="write the markdown report here")
    p.add_argument("--plot", default=None, help="write the PNG (perplexity against sparsity) here")
    p.add_argument("--notes", default=None, help="markdown file with the analysis, included as it is")
    p.add_argument("--record", default=None, help="JSON of finished numbers, read first and rewritten after each cell")
    p.add_argument("--sparsities", default="0.2,0.3,0.4,0.5")
    p.add_argument("--steps", type=int, default=10, help="GISP steps (every sparsity must be a step)")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--autocast", default="bf16")
    p.add_argument("--max-windows", type=int, default=128)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--tasks", default=TASKS)
    p.add_argument("--limit", type=int, default=200, help="held-out items per task")
    p.add_argument("--recover-levels", default="0.3,0.5", help="levels that get recovery rows (first first)")
    p.add_argument("--recover-tokens", type=int, default=32768, help="training tokens of every recovery cell")
    p.add_argument("--recover-seq-len", type=int, default=256)
    p.add_argument("--more-steps", type=int, default=20,
                   help="also run GISP alone with this many steps (same calibration): rows gisp/N; 0: no")
    p.add_argument("--stages", default="compare,recover,steps,accuracy")
    p.add_argument("--max-hours", type=float, default=0.0, help="start no cell after this many hours; 0: none")
    p.add_argument("--allow-emulated", action="store_true",
                   help="compute cells under --autocast bf16 even where bf16 is emulated (about 25x slower)")
    p.add_argument("--only-summary", action="store_true", help="write the report of the cells done, run nothing")
    return p.parse_args()


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


class Clock:
    """Whether another cell may start (``--max-hours``)."""

    def __init__(self, hours: float) -> None:
        self.start, self.hours = time.time(), hours

    def open(self) -> bool:
        return not self.hours or time.time() - self.start < self.hours * 3600


def compare_config(args: argparse.Namespace, out: Path, steps: int | None = None) -> Any:
    """The shared comparison; with ``steps``, GISP alone with that many steps (its own directory)."""
    from gisp.compare import CompareConfig

    return CompareConfig(model=args.model, methods=["gisp"] if steps else list(METHODS),
                         sparsities=floats(args.sparsities),
                         out=str(out / (f"compare-steps{steps}" if steps else "compare")), calib="c4",
                         calib_samples=args.calib_samples, seq_len=args.seq_len, seed=0, steps=steps or args.steps,
                         ppl="wiki", window=args.window,
                         max_windows=args.max_windows, tasks=[], autocast=args.autocast, dtype="fp32",
                         device="cpu", reconstruct=["bias", "lsq"])


def recon_options(args: argparse.Namespace) -> dict[str, Any]:
    """The comparison's calibration windows: every +lsq level (compare row or export) is fitted on them."""
    return {"source": "c4", "samples": args.calib_samples, "seq_len": args.seq_len, "seed": 0}


class Base:
    """The dense model, loaded once and copied per cell."""

    def __init__(self, name: str) -> None:
        self.name, self._loaded = name, None

    @property
    def loaded(self) -> Any:
        if self._loaded is None:
            from gisp.loading import load_model

            self._loaded = load_model(self.name, dtype="fp32", device="cpu")
        return self._loaded


def ppl_of(model: Any, tokenizer: Any, args: argparse.Namespace) -> dict[str, Any]:
    from gisp.evaluation.perplexity import perplexity

    return perplexity(model, tokenizer, "wiki", window=args.window, max_windows=args.max_windows, progress=False)


def level_pointer(out: Path, method: str, s: float) -> dict[str, Any]:
    from gisp.compare.runner import Store

    p = Store(out / "compare").level_dir(method, s) / "level.json"
    return json.loads(p.read_text())


# ------------------------------------------------------------------------------------------- recovery cells


def export_cell(args: argparse.Namespace, out: Path, base: Base, method: str, s: float) -> dict[str, Any]:
    """The +lsq level of ``method`` at ``s`` as a standalone export, and its perplexity (cached)."""
    import gisp

    edir = out / "exports" / f"{method}+lsq@{s:g}"
    done = edir.with_name(edir.name + ".json")
    if done.is_file():
        return json.loads(done.read_text())
    ptr = level_pointer(out, method, s)
    t0 = time.perf_counter()
    res = gisp.export((out / "compare" / ptr["trajectory"]).parent, edir, step=ptr["step"],
                      model=copy.deepcopy(base.loaded.model), tokenizer=base.loaded.tokenizer, overwrite=True,
                      reconstruct="lsq", recon_options=recon_options(args))
    seconds = time.perf_counter() - t0
    from gisp.loading import load_pretrained

    lm = load_pretrained(res.path, dtype="fp32", device="cpu")
    t1 = time.perf_counter()
    ppl = ppl_of(lm.model, lm.tokenizer, args)
    rec = {"method": method, "sparsity": s, "path": str(edir.relative_to(out)), "export_seconds": seconds,
           "ppl": ppl, "eval_seconds": time.perf_counter() - t1,
           "params": sum(p.numel() for p in lm.model.parameters())}
    atomic_write_json(done, rec)
    return rec


def recovery_cell(args: argparse.Namespace, out: Path, base: Base, method: str, mode: str,
                  s: float) -> dict[str, Any]:
    """LoRA (or LoRA-KD) on the +lsq export of ``method`` at ``s``, then its perplexity (cached, resumable)."""
    from gisp.loading import load_pretrained
    from gisp.recovery.config import RecoverConfig
    from gisp.recovery.train import recover

    name = f"{method}+lsq+{mode}@{s:g}"
    cfile = out / "recovery" / f"{name}.json"
    if cfile.is_file():
        return json.loads(cfile.read_text())
    exp = export_cell(args, out, base, method, s)
    cfg = RecoverConfig(tokens=args.recover_tokens, seq_len=args.recover_seq_len, data="c4",
                        teacher_from_run=(mode == "lora-kd"), autocast="none")
    t0 = time.perf_counter()
    res = recover(out / exp["path"], out / "recovery" / name, cfg, resume=True, device="cpu", progress=True)
    wall = time.perf_counter() - t0
    lm = load_pretrained(res.path, dtype="fp32", device="cpu")
    t1 = time.perf_counter()
    rec = {"row": f"{method}+lsq+{mode}", "sparsity": s, "path": str(res.path.relative_to(out)),
           "config": cfg.to_dict(), "steps": res.steps, "tokens": res.tokens, "train_seconds": res.train_seconds,
           "wall_seconds_this_session": wall, "loss_first": res.first, "loss_final": res.final,
           "ppl": ppl_of(lm.model, lm.tokenizer, args), "eval_seconds": time.perf_counter() - t1,
           "start_ppl": exp["ppl"]["ppl"]}
    atomic_write_json(cfile, rec)
    return rec


# ------------------------------------------------------------------------------------------- accuracy cells


def model_of(args: argparse.Namespace, out: Path, base: Base, row: str, s: float | None) -> Any:
    """The model a table row stands for, built exactly as its perplexity cell built it and then physically
    sliced (biases folded into o_proj/down_proj), so that accuracy runs at the pruned model's cost."""
    from gisp.loading import load_pretrained

    if row == "dense":
        return base.loaded.model
    if row.count("+") == 2:  # a recovery row: already a sliced export
        return load_pretrained(out / "recovery" / f"{row}@{s:g}", dtype="fp32", device="cpu").model
    from gisp.architectures import apply_mask
    from gisp.architectures.slicing import slim_model
    from gisp.compare.runner import Store
    from gisp.core.calibration import build_calibration
    from gisp.deploy.reconstruct import reconstruct

    method, _, recon = row.partition("+")
    lv = Store(out / "compare").load_level(method, s)
    model = copy.deepcopy(base.loaded.model)
    if recon:
        calib = build_calibration("lm", "c4", base.loaded.tokenizer, args.calib_samples, args.seq_len, 0)
        biases = reconstruct(model, lv.mask, calib, recon).biases
    else:
        apply_mask(model, lv.mask)
        biases = lv.compensation
    return slim_model(model, lv.mask, biases=biases)


def accuracy_cell(args: argparse.Namespace, out: Path, base: Base, row: str, s: float | None) -> dict[str, Any]:
    from gisp.compare.runner import mean_accuracy
    from gisp.tasks import evaluate_tasks

    cfile = out / "accuracy" / (f"{row}.json" if s is None else f"{row}@{s:g}.json")
    if cfile.is_file():
        return json.loads(cfile.read_text())
    t0 = time.perf_counter()
    model = model_of(args, out, base, row, s)
    t1 = time.perf_counter()
    tasks = evaluate_tasks(model, base.loaded.tokenizer, args.tasks.split(","), limit=args.limit, progress=True)
    rec = {"row": row, "sparsity": s, "tasks": tasks, "mean_acc": mean_accuracy(tasks),
           "mean_acc_se": math.sqrt(sum(t["stderr"] ** 2 for t in tasks.values())) / len(tasks),
           "model": "physically sliced (biases folded into o_proj/down_proj)" if s is not None else "dense",
           "build_seconds": t1 - t0, "eval_seconds": time.perf_counter() - t1}
    atomic_write_json(cfile, rec)
    return rec


def accuracy_plan(args: argparse.Namespace) -> list[tuple[str, float | None]]:
    """Accuracy cells, cheapest to decide first: dense, the 30%/50% rows, recovery, then the rest."""
    levels = floats(args.sparsities)
    first = [s for s in floats(args.recover_levels) if s in levels]
    plan: list[tuple[str, float | None]] = [("dense", None)]
    core = ["gisp+lsq", "flap", "llm-pruner+lsq", "gisp", "flap+lsq", "llm-pruner"]
    plan += [(r, s) for s in first for r in core]
    plan += [(f"{m}+lsq+{mode}", s) for s in first for m, mode in RECOVERY]
    plan += [(r, s) for s in levels if s not in first for r in core]
    plan += [("gisp+bias", s) for s in levels]
    return plan


# ------------------------------------------------------------------------------------------------- report


RECORD_ABOUT = ("Every finished number of scripts/exp_quality.py: ppl[row][sparsity], acc[row][sparsity] = "
                "[mean, standard error, eval seconds], compute[row][sparsity]. Models stay in --out.")


def _level(key: str) -> float | None:
    return None if key == "None" else round(float(key), 4)


def recorded(args: argparse.Namespace) -> dict[str, Any]:
    """The numbers kept in ``--record`` (same shape as :func:`collect`); empty without one."""
    empty: dict[str, Any] = {"ppl": {}, "acc": {}, "compute": {}}
    if not args.record or not Path(args.record).is_file():
        return empty
    rec = json.loads(Path(args.record).read_text())
    for part in empty:
        for row, cells in rec.get(part, {}).items():
            empty[part][row] = dict(cells) if row == "exports" else {_level(k): v for k, v in cells.items()}
    return empty


def collect(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Every finished number: ppl[row][s], acc[row][s], compute[row][s]; those in ``--out`` over the record's."""
    kept = recorded(args)
    ppl: dict[str, dict[Any, Any]] = kept["ppl"]
    acc: dict[str, dict[Any, Any]] = kept["acc"]
    compute: dict[str, dict[Any, Any]] = kept["compute"]
    more = out / f"compare-steps{args.more_steps}" / "rows"
    for rows_dir, tag in ((out / "compare" / "rows", ""), (more, f"/{args.more_steps}")):
        for f in sorted(rows_dir.glob("*.json")) if rows_dir.is_dir() else []:
            r = json.loads(f.read_text())
            if r["method"] == "dense" and tag:
                continue
            name = r["method"].replace("gisp", f"gisp{tag}", 1)
            s = None if r["method"] == "dense" else round(float(r["requested_sparsity"]), 4)
            ppl.setdefault(name, {})[s] = r["ppl"]["ppl"]
            compute.setdefault(name, {})[s] = {
                "prune_s": r.get("run_seconds"), "run_levels": r.get("run_levels"),
                "recon_s": (r.get("reconstruction") or {}).get("seconds"), "eval_s": r.get("eval_seconds"),
                "sparsity": r.get("sparsity")}
    for f in sorted((out / "recovery").glob("*.json")) if (out / "recovery").is_dir() else []:
        r = json.loads(f.read_text())
        s = round(float(r["sparsity"]), 4)
        ppl.setdefault(r["row"], {})[s] = r["ppl"]["ppl"]
        compute.setdefault(r["row"], {})[s] = {"train_s": r["train_seconds"], "tokens": r["tokens"],
                                               "steps": r["steps"], "eval_s": r["eval_seconds"]}
    for f in sorted((out / "exports").glob("*.json")) if (out / "exports").is_dir() else []:
        r = json.loads(f.read_text())
        compute.setdefault("exports", {})[f"{r['method']}@{r['sparsity']:g}"] = {
            "export_s": r["export_seconds"], "ppl": r["ppl"]["ppl"]}
    for f in sorted((out / "accuracy").glob("*.json")) if (out / "accuracy").is_dir() else []:
        r = json.loads(f.read_text())
        s = None if r["sparsity"] is None else round(float(r["sparsity"]), 4)
        acc.setdefault(r["row"], {})[s] = (r["mean_acc"], r["mean_acc_se"], r["eval_seconds"])
    return {"ppl": ppl, "acc": acc, "compute": compute}


def rows_of(args: argparse.Namespace) -> list[str]:
    """The table's rows: the comparison's, the recovery rows, then GISP with ``--more-steps``."""
    more = [f"gisp/{args.more_steps}{t}" for t in ("", "+bias", "+lsq")] if args.more_steps else []
    return ROWS + more


def _fmt(x: float | None, spec: str = "{:.2f}") -> str:
    return "—" if x is None else spec.format(x)


def goals(data: dict[str, Any], levels: list[float], rows: list[str]) -> list[str]:
    """The issue's goals, each checked against what is measured (or said to be unmeasured)."""
    ppl = data["ppl"]
    lines = []
    free = [r for r in rows if r.count("+") < 2]
    for s in levels:
        have = {r: ppl[r][s] for r in free if s in ppl.get(r, {})}
        if not have:
            continue
        best = min(have, key=have.get)
        lines.append(f"- {s:.0%}: best training-free row **{best}** ({have[best]:.2f}); "
                     f"gisp+lsq {_fmt(have.get('gisp+lsq'))}.")
    gisps = sorted({r.split("+")[0] for r in rows if r.startswith("gisp")})  # gisp, gisp/N
    for gisp, t in [(g, t) for g in gisps for t in TREATMENTS if f"{g}{t}" in rows]:
        ratios = []
        for s in levels:
            g = ppl.get(f"{gisp}{t}", {}).get(s)
            others = {f"{m}{t}": ppl[f"{m}{t}"][s] for m in METHODS[1:] if s in ppl.get(f"{m}{t}", {})}
            if g is not None and others:
                best = min(others, key=others.get)
                ratios.append(f"{s:.0%}: {g / others[best]:.3f} (vs {best})")
        if ratios:
            lines.append(f"- same treatment ({t[1:] or 'raw'}): {gisp}{t} / best other = " + "; ".join(ratios) +
                         " (goal at 40-50%: at most 0.75).")
    dense = ppl.get("dense", {}).get(None)
    for s in levels:
        start = ppl.get("gisp+lsq", {}).get(s)
        for row in ("gisp+lsq+lora", "gisp+lsq+lora-kd"):
            end = ppl.get(row, {}).get(s)
            if dense and start and end:
                lines.append(f"- {s:.0%}: {row} narrows the gap to dense (ppl {dense:.2f}) from "
                             f"{start - dense:.2f} to {end - dense:.2f} ({1 - (end - dense) / (start - dense):.0%} "
                             "of it closed).")
    return lines


def report(args: argparse.Namespace, out: Path) -> str:
    data = collect(args, out)
    levels = floats(args.sparsities)
    ppl, acc, compute = data["ppl"], data["acc"], data["compute"]
    rows = rows_of(args)
    shown = [a for a in sys.argv[1:] if a != "--only-summary"]  # the command that computes it all
    cmd = shlex.join(["python", "scripts/exp_quality.py", *shown])
    head = " | ".join(f"{s:.0%}" for s in levels)
    lines = [
        "# Quality past the paper: reconstruction and recovery, side by side (SmolLM2-135M)", "",
        f"Generated by `{cmd}` (do not edit by hand; rerun to continue or refresh).", "",
        f"- Model: `{args.model}`. Sparsity: fraction of decoder-layer linear parameters removed (embeddings, "
        "norms and lm_head excluded; protected layers count).",
        f"- Pruning and reconstruction calibration, shared by every method: c4 calibration part, "
        f"{args.calib_samples} windows x {args.seq_len} tokens, seed 0; GISP {args.steps} steps to "
        f"{max(levels):.0%} (one nested run read at every level), gradient passes in autocast {args.autocast}.",
        "- +bias: FLAP-style bias compensation; +lsq: sequential least-squares refit of the kept o_proj/down_proj "
        "columns so that each pruned block reproduces the dense block on the pruned model's own inputs "
        "(local target, damping 1.0, see docs/reconstruction.md). FLAP's plain row keeps "
        "its own compensation; its +lsq row replaces it.",
        f"- Recovery: the +lsq level exported, then `gisp recover` with LoRA (rank 8, alpha 16, lr 2e-4, "
        f"{args.recover_tokens:,} c4 training tokens in {args.recover_seq_len}-token windows, calibration part "
        "only); +lora-kd distils from the dense model (logit KL, T=1). Same budget for every method.",
        f"- Perplexity: wiki evaluation part, first {args.max_windows} non-overlapping {args.window}-token "
        "windows, each scored on its own, fp32.",
        f"- Accuracy: mean over {args.tasks.replace(',', ', ')} of each task's headline metric (acc for "
        "BoolQ/WinoGrande, acc_norm otherwise; zero-shot, lm-eval 0.4 prompts), the first "
        f"{args.limit} held-out items of each task (split seed 0), fp32; ± = standard error of the mean "
        "(per-task binomial errors combined).", "",
        "## Wiki perplexity", "",
        f"Dense: {_fmt(ppl.get('dense', {}).get(None))}.", "",
        f"| row | {head} |", "|---|" + "---|" * len(levels)]
    for r in rows:
        lines.append(f"| {r} | " + " | ".join(_fmt(ppl.get(r, {}).get(s)) for s in levels) + " |")
    if args.plot and args.doc:
        rel = os.path.relpath(Path(args.plot).resolve(), Path(args.doc).resolve().parent)
        lines += ["", f"![wiki perplexity against sparsity]({rel})"]
    lines += ["", f"## Mean accuracy ({len(args.tasks.split(','))} tasks)", ""]
    dense_acc = acc.get("dense", {}).get(None)
    lines += [f"Dense: {_fmt(dense_acc[0], '{:.3f}') if dense_acc else '—'}"
              f"{' ± ' + format(dense_acc[1], '.3f') if dense_acc else ''}.", "",
              f"| row | {head} |", "|---|" + "---|" * len(levels)]
    planned = set(accuracy_plan(args))
    for r in [r for r in rows if any((r, s) in planned for s in levels)]:
        cells = []
        for s in levels:
            a = acc.get(r, {}).get(s)
            cells.append(("—" if (r, s) in planned else "n/p") if a is None else f"{a[0]:.3f} ± {a[1]:.3f}")
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    lines += ["", "— : planned, not measured yet (rerun the command to continue); n/p: not in the accuracy plan "
              "(recovery rows are trained at 30% and 50% only). Rows without any planned cell are left out.", "",
              "## Against the goals", ""]
    lines += goals(data, levels, rows) or ["- nothing measured yet"]
    lines += ["", "## Compute of every cell (seconds, this machine)", "",
              "Pruning time is the whole run of the method (GISP and FLAP: one nested run for every level); "
              "reconstruction and evaluation are per cell; recovery is training time only.", "",
              "| row | level | prune | reconstruct | train | ppl eval | accuracy eval |",
              "|---|---|---|---|---|---|---|"]
    for r in ["dense", *rows]:
        for s in ([None] if r == "dense" else levels):
            c = compute.get(r, {}).get(s)
            a = acc.get(r, {}).get(s)
            if c is None and a is None:
                continue
            c = c or {}
            lines.append(f"| {r} | {'—' if s is None else f'{s:.0%}'} | {_fmt(c.get('prune_s'), '{:.0f}')} | "
                         f"{_fmt(c.get('recon_s'), '{:.0f}')} | {_fmt(c.get('train_s'), '{:.0f}')} | "
                         f"{_fmt(c.get('eval_s'), '{:.0f}')} | {_fmt(a[2] if a else None, '{:.0f}')} |")
    if compute.get("exports"):
        lines += ["", "Exports of the +lsq levels (the recovery inputs): the export's own perplexity against the "
                  "comparison's +lsq row (the same reconstruction, computed at export):", ""]
        for k, v in compute["exports"].items():
            m, _, s = k.partition("@")
            row = ppl.get(f"{m}+lsq", {}).get(round(float(s), 4))
            lines.append(f"- {k}: export {v['ppl']:.4f} vs compare row {_fmt(row, '{:.4f}')} "
                         f"({v['export_s']:.0f} s to export)")
    if args.notes:
        lines += ["", Path(args.notes).read_text().strip()]
    info = machine()
    lines += ["", "Machine and versions: " + ", ".join(f"{k} {v}" for k, v in info.items()) + "."]
    text = "\n".join(lines) + "\n"
    atomic_write_json(out / "summary.json", {**{k: _keys(v) for k, v in data.items()}, "machine": info})
    if args.record:
        old = json.loads(Path(args.record).read_text()) if Path(args.record).is_file() else {}
        kept = {"recovered_from": old["recovered_from"]} if "recovered_from" in old else {}
        atomic_write_json(args.record, {"about": RECORD_ABOUT, **kept, **{k: _keys(v) for k, v in data.items()},
                                        "machine": info})
    if args.doc:
        atomic_write_text(args.doc, text)
    if args.plot and ppl:
        plot(args, ppl, levels)
    return text


def _keys(d: dict[str, Any]) -> dict[str, Any]:
    return {k: {str(s): v for s, v in row.items()} for k, row in d.items()}


def plot(args: argparse.Namespace, ppl: dict[str, dict[Any, float]], levels: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    style = {"gisp": "C0", "flap": "C1", "llm-pruner": "C2", f"gisp/{args.more_steps}": "C3"}
    marks = {0: "o-", 1: "s--", 2: "^:"}
    for r in rows_of(args):
        xs = [s for s in levels if s in ppl.get(r, {})]
        if xs:
            ax.plot([100 * s for s in xs], [ppl[r][s] for s in xs], "v:" if r.endswith("kd") else marks[r.count("+")],
                    color=style[r.split("+")[0]], alpha=1.0 if "lsq" in r or "+" not in r else 0.5, label=r)
    if ppl.get("dense", {}).get(None):
        ax.axhline(ppl["dense"][None], color="k", lw=0.8, label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("parameter sparsity (%)")
    ax.set_ylabel(f"wiki perplexity ({args.window}-token windows)")
    ax.set_title(f"{args.model}: raw (solid), +reconstruction (dashed), +recovery (dotted)")
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, args.plot)


# --------------------------------------------------------------------------------------------------- main


def main() -> None:
    args = parse()
    refuse_emulated(args)
    out = ROOT / args.out if not Path(args.out).is_absolute() else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = set(args.stages.split(","))
    clock, base = Clock(args.max_hours), Base(args.model)
    kept = recorded(args)
    levels = floats(args.sparsities)
    compare_rows = [r for r in ROWS if r.count("+") < 2]
    todo_acc = [(r, s) for r, s in accuracy_plan(args) if s not in kept["acc"].get(r, {})]
    todo_rec = [(m, mode, s) for s in floats(args.recover_levels) for m, mode in RECOVERY
                if s not in kept["ppl"].get(f"{m}+lsq+{mode}", {})]
    # the comparison's levels are the input of every other cell: computed again when any of them is pending
    need_compare = (todo_rec or any(r != "dense" and r.count("+") < 2 for r, _ in todo_acc)
                    or any(s not in kept["ppl"].get(r, {}) for r in compare_rows for s in levels))
    need_steps = any(s not in kept["ppl"].get(r, {}) for r in rows_of(args) if r.startswith("gisp/")
                     for s in levels)
    if not args.only_summary:
        if "compare" in stages and need_compare and clock.open():
            from gisp.compare import compare

            compare(compare_config(args, out), progress=True, command=shlex.join(sys.argv),
                    loaded=base.loaded)
            print(report(args, out))
        if "steps" in stages and args.more_steps and need_steps and clock.open():
            from gisp.compare import compare

            compare(compare_config(args, out, args.more_steps), progress=True, command=shlex.join(sys.argv),
                    loaded=base.loaded)
            print(report(args, out))
        if "recover" in stages:
            for method, mode, s in todo_rec:
                if clock.open():
                    recovery_cell(args, out, base, method, mode, s)
                    print(report(args, out))
        if "accuracy" in stages:
            for row, s in todo_acc:
                if clock.open():
                    accuracy_cell(args, out, base, row, s)
                    print(report(args, out))
    print(report(args, out))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
