"""``gisp compare``: every method on the same model, calibration set and evaluation protocol.

One model load, one calibration set (seeded windows of one source) and one
evaluation protocol (perplexity in fixed non-overlapping windows, optionally
tasks) for all methods; GISP and the other nested methods run once for all
sparsities. Everything lands in ``OUT``:

- ``compare.json``: the settings (a later call with different protocol
  settings is refused; more methods or sparsities are added to the same run);
- ``model.json``, ``calibration.json``: the base model and calibration provenance;
- ``methods/NAME/``: each method's masks (``trajectory.json``; for GISP its
  resumable run directory), one ``sLEVEL/level.json`` pointer per level, FLAP's
  ``compensation.safetensors``;
- ``rows/*.json``: one evaluated row per method x sparsity, written atomically
  as it completes, so an interrupted comparison resumes where it stopped and a
  finished one is reassembled without any pruning or evaluation;
- ``results.json`` (every number with its provenance), ``results.md`` and
  ``perplexity.png`` (and ``accuracy.png`` with tasks).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gisp.architectures import apply_mask, layout_of
from gisp.baselines import METHODS, Level, Method, apply_compensation, get_method
from gisp.baselines.gisp_iterative import GISP
from gisp.compare.config import CompareConfig
from gisp.deploy.compensation import Compensation
from gisp.errors import GispError
from gisp.provenance import atomic_write_json, atomic_write_text, save_figure, versions
from gisp.run.trajectory import Trajectory

FORMAT = 1


def method_options(name: str, cfg: CompareConfig) -> dict[str, Any]:
    """The shared budgets each method takes (the rest are its paper's defaults)."""
    opts: dict[str, Any] = {}
    defaults = METHODS[name].defaults
    if "batch_size" in defaults:
        opts["batch_size"] = cfg.batch_size
    if "autocast" in defaults:
        opts["autocast"] = cfg.autocast
    if issubclass(METHODS[name], GISP):
        opts["steps"] = cfg.steps
    if name == "random":
        opts["seed"] = cfg.seed
    return opts


def _key(s: float) -> str:
    return f"s{s:.4f}".rstrip("0").rstrip(".")


class Store:
    """The comparison directory: rows, level pointers and method artifacts, all written atomically."""

    def __init__(self, out: str | Path) -> None:
        self.root = Path(out)

    def row_path(self, method: str, s: float | None) -> Path:
        return self.root / "rows" / ("dense.json" if method == "dense" else f"{method}@{_key(s)}.json")

    def row(self, method: str, s: float | None) -> dict[str, Any] | None:
        p = self.row_path(method, s)
        return json.loads(p.read_text()) if p.is_file() else None

    def save_row(self, method: str, s: float | None, row: dict[str, Any]) -> None:
        atomic_write_json(self.row_path(method, s), row)

    def method_dir(self, method: str) -> Path:
        return self.root / "methods" / method

    def level_dir(self, method: str, s: float) -> Path:
        return self.method_dir(method) / _key(s)

    def save_level(self, method: Method, level: Level) -> None:
        """Masks (trajectory), compensation, then the pointer file last."""
        ldir = self.level_dir(method.name, level.requested)
        ldir.mkdir(parents=True, exist_ok=True)
        pointer: dict[str, Any] = {
            "method": method.name, "requested_sparsity": level.requested, "sparsity": level.sparsity,
            "kept_params": level.kept_params, "step": level.step, "details": _jsonable(level.details),
            "trajectory": None, "compensation": None,
        }
        if level.trajectory is not None:
            tdir = self.method_dir(method.name) if method.nested else ldir
            if not isinstance(method, GISP):  # gisp.prune keeps its own run directory up to date
                level.trajectory.save(tdir)
            pointer["trajectory"] = str((tdir / "trajectory.json").relative_to(self.root))
        if level.compensation is not None:
            pointer["compensation"] = str(level.compensation.save(ldir).relative_to(self.root))
        atomic_write_json(ldir / "level.json", pointer)

    def load_level(self, method: str, s: float) -> Level | None:
        """A saved masked level, or None (physical levels are never reloaded: their rows are)."""
        p = self.level_dir(method, s) / "level.json"
        if not p.is_file():
            return None
        d = json.loads(p.read_text())
        if d["trajectory"] is None:
            return None
        traj = Trajectory.load(self.root / d["trajectory"])
        if d["step"] is None or d["step"] > traj.last_step:
            return None
        comp = Compensation.load(self.root / d["compensation"]) if d["compensation"] else None
        return Level(d["requested_sparsity"], d["sparsity"], d["kept_params"], traj.mask_at_step(d["step"]), traj,
                     d["step"], comp, details=d["details"])


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def mean_accuracy(tasks: dict[str, dict[str, Any]] | None) -> float | None:
    """Mean headline value over tasks whose headline metric is an accuracy (acc, acc_norm, exact match)."""
    if not tasks:
        return None
    vals = [t["value"] for t in tasks.values() if str(t.get("metric", "")).startswith(("acc", "exact"))]
    return sum(vals) / len(vals) if vals else None


def evaluate_model(model: nn.Module, tokenizer, cfg: CompareConfig, progress: bool) -> dict[str, Any]:
    """The one evaluation protocol of a comparison."""
    from gisp.evaluation.perplexity import perplexity

    t0 = time.perf_counter()
    row: dict[str, Any] = {"ppl": perplexity(model, tokenizer, cfg.ppl, window=cfg.window,
                                             max_windows=cfg.max_windows, batch_size=cfg.batch_size,
                                             progress=progress)}
    if cfg.tasks:
        from gisp.tasks import evaluate_tasks

        row["tasks"] = evaluate_tasks(model, tokenizer, cfg.tasks, limit=cfg.limit, progress=progress)
        row["mean_acc"] = mean_accuracy(row["tasks"])
    row["eval_seconds"] = time.perf_counter() - t0
    return row


def _check_settings(store: Store, cfg: CompareConfig) -> None:
    path = store.root / "compare.json"
    if path.is_file():
        old = CompareConfig.from_dict(json.loads(path.read_text())).protocol()
        new = cfg.protocol()
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise GispError(f"{store.root} holds a comparison with different settings ({', '.join(diff)}): "
                            "use another --out")
    atomic_write_json(path, asdict(cfg))


def compare(cfg: CompareConfig, *, progress: bool = True, command: str | None = None,
            log: Callable[[str], None] = print, loaded: Any = None) -> dict[str, Any]:
    """Run (or resume) a comparison and write its results; returns the results dict.

    ``loaded`` (a :class:`gisp.loading.LoadedModel`) skips loading ``cfg.model``:
    the demo and tests pass a model they already hold.
    """
    store = Store(cfg.out)
    fresh = not store.root.exists()
    if not fresh and not store.root.is_dir():
        raise GispError(f"--out {store.root} is a file: give a directory for the comparison")
    try:
        store.root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GispError(f"cannot create --out {store.root} ({e.strerror}): choose another directory") from e
    try:
        _check_settings(store, cfg)
        todo = [(m, s) for m in cfg.methods for s in cfg.sparsities if _missing(store, cfg, m, s)]
        if store.row("dense", None) is None or todo:
            _run(cfg, store, todo, progress, log, loaded)
    except GispError:
        if fresh and not any((store.root / d).exists() for d in ("rows", "methods")):
            shutil.rmtree(store.root, ignore_errors=True)  # failed before its first result: leave nothing behind
        raise
    results = assemble(cfg, store, command)
    write_outputs(results, store.root)
    return results


def _missing(store: Store, cfg: CompareConfig, method: str, s: float) -> bool:
    """Whether a row of ``method`` at ``s`` is still to be made (reconstructed rows need a masked level: a
    physically sliced one, saved with step None, has none)."""
    row = store.row(method, s)
    if row is None:
        return True
    return row.get("step") is not None and any(store.row(v, s) is None for v in cfg.variants(method)[1:])


def _run(cfg: CompareConfig, store: Store, todo: list[tuple[str, float]], progress: bool,
         log: Callable[[str], None], loaded: Any = None) -> None:
    from gisp.core.calibration import build_calibration
    from gisp.core.fingerprint import fingerprint
    from gisp.loading import load_model

    loaded = loaded or load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    model, tok = loaded.model, loaded.tokenizer
    layout = layout_of(model)
    info = {"name": cfg.model, "path": loaded.path, "fingerprint": fingerprint(model)}
    atomic_write_json(store.root / "model.json", {
        **info, "model_type": model.config.model_type, "dense_params": layout.dense_params,
        "weight_dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "layout": layout.to_dict(),
    })
    dense_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def restore() -> None:
        model.load_state_dict(dense_state)
        for p in model.parameters():
            p.requires_grad_(False)

    if store.row("dense", None) is None:
        log("evaluating the dense model")
        row = evaluate_model(model, tok, cfg, progress)
        row.update(method="dense", requested_sparsity=0.0, sparsity=0.0, linear_params=layout.dense_params)
        store.save_row("dense", None, row)
    if not todo:
        return
    calib = build_calibration("lm", cfg.calib, tok, cfg.calib_samples, cfg.seq_len, cfg.seed)
    atomic_write_json(store.root / "calibration.json", calib.provenance)
    calibs = {"lm": calib}
    for objective in sorted({METHODS[m].objective for m, _ in todo} - {"lm"}):
        calibs[objective] = build_calibration(objective, cfg.task_calib, tok, cfg.calib_samples, cfg.seq_len,
                                              cfg.seed)
        atomic_write_json(store.root / f"calibration_{objective}.json", calibs[objective].provenance)

    for name in cfg.methods:
        missing = [s for m, s in todo if m == name]
        if not missing:
            continue
        method = get_method(name, **method_options(name, cfg))
        restore()
        levels = {s: lv for s in missing if (lv := store.load_level(name, s)) is not None}
        to_run = [s for s in missing if s not in levels]
        if to_run:
            # nested methods (and GISP's resumable run) always produce every level from one run
            run_for = cfg.sparsities if method.nested else to_run
            log(f"{name}: pruning to {', '.join(f'{s:g}' for s in run_for)}")
            t0 = time.perf_counter()
            physical: list[Level] = []

            def on_level(level: Level, method: Method = method, physical: list[Level] = physical) -> None:
                store.save_level(method, level)
                if level.model is not None:  # sliced copy: evaluate it now, then let it go
                    _save_row(store, cfg, method, level, evaluate_model(level.model, tok, cfg, progress), None)
                    physical.append(level)

            run_dir = store.method_dir(name) if isinstance(method, GISP) else None
            produced = method.run(model, calibs[method.objective], run_for, model_info=info,
                                  run_dir=run_dir, progress=progress, on_level=on_level)
            seconds = time.perf_counter() - t0
            atomic_write_json(store.method_dir(name) / f"run-{int(time.time())}.json", {
                "sparsities": run_for, "seconds": seconds, "settings": _jsonable(method.settings())})
            for lv in produced:
                lv.details["run_seconds"] = seconds
                lv.details["run_levels"] = len(produced)
                if lv.requested in missing and lv.mask is not None:
                    levels[lv.requested] = lv
            # physical rows were saved (and evaluated) inside on_level: their pruning time is the
            # levels' own slicing time, without the evaluations that ran in between
            sliced = sum(lv.details.get("seconds", 0.0) for lv in physical)
            for lv in physical:
                row = store.row(name, lv.requested)
                if row is not None:
                    row.update(run_seconds=sliced, run_levels=len(physical))
                    store.save_row(name, lv.requested, row)
        for s in sorted(levels):
            lv = levels[s]
            if store.row(name, s) is None:
                restore()
                apply_mask(model, lv.mask)
                log(f"{name} @ {s:g}: evaluating (sparsity {lv.sparsity:.4f})")
                with apply_compensation(model, lv.compensation):
                    row = evaluate_model(model, tok, cfg, progress)
                _save_row(store, cfg, method, lv, row, lv.step)
            for r in cfg.reconstruct:
                if store.row(f"{name}+{r}", s) is None:
                    restore()
                    _reconstructed_row(store, cfg, method, lv, r, model, tok, calib, progress, log)
    restore()


def _reconstructed_row(store: Store, cfg: CompareConfig, method: Method, lv: Level, recon: str, model: nn.Module,
                       tok: Any, calib: Any, progress: bool, log: Callable[[str], None]) -> None:
    """Row ``METHOD+RECON``: the level reconstructed on the comparison's calibration windows (replacing any
    compensation of its own), then evaluated by the same protocol."""
    from gisp.deploy.reconstruct import reconstruct

    log(f"{method.name} @ {lv.requested:g}: reconstructing ({recon}) and evaluating")
    done = reconstruct(model, lv.mask, calib, recon)
    with apply_compensation(model, done.biases):
        row = evaluate_model(model, tok, cfg, progress)
    row["reconstruction"] = {k: v for k, v in done.record.items() if k != "details"} | {
        "relative_error_masked": done.record["details"].get("relative_error_masked"),
        "relative_error_refit": done.record["details"].get("relative_error_refit")}
    _save_row(store, cfg, method, lv, row, lv.step, name=f"{method.name}+{recon}")


def _save_row(store: Store, cfg: CompareConfig, method: Method, level: Level, row: dict[str, Any],
              step: int | None, name: str | None = None) -> None:
    row.update(
        method=name or method.name, requested_sparsity=level.requested, sparsity=level.sparsity,
        linear_params=level.kept_params, step=step,
        compensated=(level.compensation is not None) if name is None else bool(row["reconstruction"]["adds_bias"]),
        run_seconds=level.details.get("run_seconds"), run_levels=level.details.get("run_levels"),
        level=str((store.level_dir(method.name, level.requested) / "level.json").relative_to(store.root)),
        details=_jsonable({k: v for k, v in level.details.items() if k not in ("run_seconds", "run_levels")}),
    )
    store.save_row(name or method.name, level.requested, row)


def assemble(cfg: CompareConfig, store: Store, command: str | None = None) -> dict[str, Any]:
    """Collect the saved rows and their provenance into one results dict."""
    root = store.root

    def read(name: str) -> dict[str, Any]:
        p = root / name
        return json.loads(p.read_text()) if p.is_file() else {}

    dense = store.row("dense", None)
    rows = [r for m in cfg.methods for v in cfg.variants(m) for s in cfg.sparsities
            if (r := store.row(v, s)) is not None]
    methods = {}
    for m in cfg.methods:
        settings = _jsonable(get_method(m, **method_options(m, cfg)).settings())
        methods[m] = {"settings": settings, "nested": METHODS[m].nested, "reference": METHODS[m].reference}
        for r in cfg.reconstruct:
            if any(row["method"] == f"{m}+{r}" for row in rows):  # physical levels have no mask to refit
                methods[f"{m}+{r}"] = {**methods[m], "settings": {**settings, "reconstruct": r}}
    ppl_src = (dense or {}).get("ppl", {})
    return {
        "format": FORMAT,
        "command": command,
        "model": read("model.json"),
        "calibration": read("calibration.json"),
        "calibration_margin": read("calibration_margin.json") or None,
        "protocol": {
            "ppl_source": cfg.ppl, "source": ppl_src.get("source"), "window": cfg.window,
            "max_windows": cfg.max_windows, "windows": ppl_src.get("windows"),
            "tokens_scored": ppl_src.get("tokens_scored"), "eval_dtype": cfg.dtype, "tasks": cfg.tasks,
            "limit": cfg.limit, "autocast_of_gradient_passes": cfg.autocast,
            "sparsity_definition": "fraction of decoder-layer linear parameters (q,k,v,o,gate,up,down, biases "
            "included) removed; embeddings, norms and lm_head excluded; protected layers count",
            "ppl_protocol": ppl_src.get("protocol"),
        },
        "settings": asdict(cfg),
        "versions": {**versions(), "torch_pruning": _tp_version()},
        "methods": methods,
        "dense": dense,
        "rows": rows,
        "complete": dense is not None and not any(_missing(store, cfg, m, s) for m in cfg.methods
                                                  for s in cfg.sparsities),
    }


def _tp_version() -> str:
    from gisp.baselines.tp_external import torch_pruning_version

    return torch_pruning_version()


# outputs ---------------------------------------------------------------------------------------


def _ppl(row: dict[str, Any] | None) -> float | None:
    return row["ppl"]["ppl"] if row and "ppl" in row else None


def _cell(x: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def markdown_table(results: dict[str, Any]) -> str:
    """Perplexity (and mean accuracy) per method and sparsity, with measured sparsities and costs."""
    sp = results["settings"]["sparsities"]
    by = {(r["method"], r["requested_sparsity"]): r for r in results["rows"]}
    p = results["protocol"]
    head = "| method | nested | " + " | ".join(f"{s:.0%}" for s in sp) + " | pruning time (s) |"
    lines = [f"{p['ppl_source']} perplexity, {p['window']}-token windows ({p['windows']} windows); "
             f"dense {_cell(_ppl(results['dense']))}", "", head, "|" + "---|" * (len(sp) + 3)]
    for m in results["methods"]:
        cells, secs = [], None
        for s in sp:
            r = by.get((m, s))
            cells.append(_cell(_ppl(r)))
            if r and r.get("run_seconds") is not None:
                secs = r["run_seconds"] if secs is None else max(secs, r["run_seconds"])
        nested = "yes" if results["methods"][m]["nested"] else "no"
        lines.append(f"| {m} | {nested} | " + " | ".join(cells) + f" | {_cell(secs, '{:.0f}')} |")
    lines += ["", "Measured parameter sparsity of each cell:", "",
              "| method | " + " | ".join(f"{s:.0%}" for s in sp) + " |", "|" + "---|" * (len(sp) + 1)]
    for m in results["methods"]:
        lines.append(f"| {m} | " + " | ".join(_cell(by[(m, s)]["sparsity"], "{:.4f}") if (m, s) in by else "-"
                                              for s in sp) + " |")
    if results["protocol"]["tasks"]:
        lines += ["", f"Mean accuracy over {', '.join(results['protocol']['tasks'])} "
                  f"(dense {_cell((results['dense'] or {}).get('mean_acc'), '{:.4f}')}):", "",
                  "| method | " + " | ".join(f"{s:.0%}" for s in sp) + " |", "|" + "---|" * (len(sp) + 1)]
        for m in results["methods"]:
            lines.append(f"| {m} | " + " | ".join(_cell(by.get((m, s), {}).get("mean_acc"), "{:.4f}")
                                                  for s in sp) + " |")
    return "\n".join(lines) + "\n"


def describe_mc_calibration(prov: dict[str, Any]) -> str:
    """One line for a margin calibration set: questions and tokens per task."""
    per = ", ".join(f"{t} {d['questions']} q/{d['tokens']} tok" for t, d in prov.get("tasks", {}).items())
    return (f"`{prov.get('name', prov.get('source'))}`, {prov.get('samples')} questions with every option, "
            f"budget {prov.get('budget_tokens')} tokens, seed {prov.get('seed')}: {per}")


def markdown_report(results: dict[str, Any], plots: list[str]) -> str:
    """``results.md``: the table plus what was run, on what, with which versions."""
    m, c, p, v = results["model"], results["calibration"], results["protocol"], results["versions"]
    src = p.get("source") or {}
    lines = [f"# Structured pruning methods compared on {m.get('name')}", ""]
    if results.get("command"):
        lines += [f"Command: `{results['command']}`", ""]
    lines += [markdown_table(results), ""]
    lines += [
        f"- Model: `{m.get('name')}` ({m.get('model_type')}, fingerprint {m.get('fingerprint')}, "
        f"{m.get('dense_params', 0):,} decoder linear parameters, weights {m.get('weight_dtype')}).",
        f"- Calibration (all methods): `{c.get('name')}` {c.get('part')} part, {c.get('samples')} windows x "
        f"{c.get('seq_len')} tokens, seed {c.get('seed')}" + (" (except task-aligned methods)." if
                                                            results.get("calibration_margin") else "."),
        *([f"- Calibration of `gisp-margin`: {describe_mc_calibration(results['calibration_margin'])}."]
          if results.get("calibration_margin") else []),
        f"- Perplexity: `{p['ppl_source']}` {src.get('part', 'eval')} part ({src.get('documents')} documents), first "
        f"{p['windows']} non-overlapping {p['window']}-token windows, each scored independently, {p['eval_dtype']}.",
        f"- Sparsity: {p['sparsity_definition']}.",
        f"- Versions: gisp {v['gisp']}, torch {v['torch']}, transformers {v['transformers']}, torch-pruning "
        f"{v['torch_pruning']}, python {v['python']}; {v['platform']}, {v['cpu_count']} CPUs, CUDA {v['cuda']}.",
        "- Method settings (each method's paper/code defaults; see results.json `methods`):",
    ]
    for name, d in results["methods"].items():
        s = {k: v for k, v in d["settings"].items() if k not in ("method", "nested", "reference")}
        lines.append(f"  - `{name}`: {d['reference']}; " + ", ".join(f"{k}={v}" for k, v in s.items()))
    lines += [""] + [f"![{Path(x).stem}]({x})" for x in plots]
    return "\n".join(lines) + "\n"


def plot_results(results: dict[str, Any], path: str | Path, metric: str = "ppl") -> Path | None:
    """Perplexity (log scale) or mean accuracy against measured sparsity, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def value(r: dict[str, Any] | None) -> float | None:
        return _ppl(r) if metric == "ppl" else (r or {}).get("mean_acc")

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    drawn = False
    for m in results["methods"]:
        pts = sorted((100 * r["sparsity"], value(r)) for r in results["rows"]
                     if r["method"] == m and value(r) is not None)
        if not pts:
            continue
        style = dict(lw=2.6, color="black", zorder=5) if m == "gisp" else dict(lw=1.3)
        ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", ms=4, label=m, **style)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    dense = value(results["dense"])
    if dense is not None:
        ax.axhline(dense, ls="--", color="grey", lw=1, label="dense")
    p = results["protocol"]
    ax.set_xlabel("parameter sparsity of decoder layers (%)")
    if metric == "ppl":
        ax.set_yscale("log")
        ax.set_ylabel(f"{p['ppl_source']} perplexity ({p['window']}-token windows)")
    else:
        ax.set_ylabel(f"mean accuracy ({', '.join(p['tasks'])})")
    ax.set_title(f"{results['model'].get('name')}: same calibration and evaluation for every method", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def write_outputs(results: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """results.json, perplexity.png (accuracy.png with tasks) and results.md in ``out``."""
    out = Path(out)
    atomic_write_json(out / "results.json", results)
    files = {"json": out / "results.json"}
    plots = []
    if (png := plot_results(results, out / "perplexity.png", "ppl")) is not None:
        files["perplexity_png"] = png
        plots.append(png.name)
    if results["protocol"]["tasks"] and (png := plot_results(results, out / "accuracy.png", "acc")) is not None:
        files["accuracy_png"] = png
        plots.append(png.name)
    atomic_write_text(out / "results.md", markdown_report(results, plots))
    files["markdown"] = out / "results.md"
    return files
