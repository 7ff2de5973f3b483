"""``gisp compare``: GISP and the field's baselines side by side, one calibration set, one protocol."""

from __future__ import annotations

import shlex
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from types import SimpleNamespace

import typer
from rich.console import Console
from rich.table import Table

from gisp.cli.app import app
from gisp.cli.common import parse_floats
from gisp.compare.config import DEFAULT_METHODS, CompareConfig
from gisp.loading import DEFAULT_MODEL

# The defaults without validating them (validation imports the baselines, and --help must start fast).
_D = SimpleNamespace(**{f.name: f.default if f.default is not MISSING else f.default_factory()
                        for f in fields(CompareConfig)})


def results_table(results: dict) -> Table:
    p = results["protocol"]
    sp = results["settings"]["sparsities"]
    dense = results["dense"]["ppl"]["ppl"] if results.get("dense") else float("nan")
    table = Table(title=f"{results['model'].get('name')}: {p['ppl_source']} perplexity, {p['window']}-token windows "
                        f"({p['windows']}); dense {dense:.2f}")
    table.add_column("method")
    for s in sp:
        table.add_column(f"{s:.0%}", justify="right")
    by = {(r["method"], r["requested_sparsity"]): r for r in results["rows"]}
    for m in results["methods"]:
        table.add_row(m, *[f"{by[(m, s)]['ppl']['ppl']:.2f}" if (m, s) in by else "-" for s in sp])
    return table


@app.command("compare")
def compare_command(
    model: str = typer.Argument(DEFAULT_MODEL, help="Hub id, local HF directory, .gguf file or 'smollm2-135m'."),
    methods: str = typer.Option(",".join(DEFAULT_METHODS), help="Comma-separated methods (add torch-pruning for "
                                "the external row)."),
    sparsities: str = typer.Option("0.2,0.3,0.4,0.5", help="Comma-separated parameter sparsities."),
    out: Path = typer.Option(..., "--out", help="Comparison directory (resumed when it exists)."),
    calib: str = typer.Option(_D.calib, help="Calibration source shared by every method."),
    calib_samples: int = typer.Option(_D.calib_samples, help="Calibration windows (the paper: 2000)."),
    seq_len: int = typer.Option(_D.seq_len, help="Tokens per calibration window (the paper: 256)."),
    seed: int = typer.Option(_D.seed, help="Seed of the calibration sampling (and of the random floor)."),
    steps: int = typer.Option(_D.steps, help="GISP steps; every sparsity must be a step (e.g. 10 or 20 for 0.2..0.5)."),
    ppl: str = typer.Option(_D.ppl, help="Perplexity source (eval part)."),
    window: int = typer.Option(_D.window, help="Tokens per non-overlapping evaluation window."),
    max_windows: int = typer.Option(_D.max_windows, help="Evaluation windows, from the start of the eval part."),
    tasks: str = typer.Option("", help="Comma-separated tasks for accuracy (e.g. piqa,arc_easy); '' to skip."),
    limit: int = typer.Option(0, help="Items per task (0 = all held-out items)."),
    autocast: str = typer.Option(_D.autocast, help="Mixed precision of gradient passes: none, bf16, fp16."),
    dtype: str = typer.Option(_D.dtype, help="Weight and evaluation dtype: fp32, bf16, fp16."),
    device: str = typer.Option(_D.device, help="auto, cpu, cuda, cuda:N."),
    batch_size: int = typer.Option(_D.batch_size, help="Windows per forward pass (memory only)."),
    task_calib: str = typer.Option(_D.task_calib, help="Calibration of task-aligned methods (gisp-margin): cmqa, "
                                   "a task name or a JSONL of {context, choices, answer}."),
    reconstruct: str = typer.Option("", help="Comma-separated training-free reconstructions applied to every "
                                    "masked level (bias, lsq, lsq-bias): rows METHOD+RECON next to the plain ones."),
) -> None:
    """Prune MODEL with every method to every sparsity and evaluate all of them the same way."""
    from gisp.compare.runner import compare
    from gisp.outputs import check_output_dir

    check_output_dir(out, resumable=True, inputs=[model])  # a bad --out fails before any model loads
    cfg = CompareConfig(
        model=model, methods=[m.strip() for m in methods.split(",") if m.strip()],
        sparsities=parse_floats(sparsities, "sparsities"), out=str(out), calib=calib, calib_samples=calib_samples,
        seq_len=seq_len, seed=seed, steps=steps, ppl=ppl, window=window, max_windows=max_windows,
        tasks=[t for t in tasks.split(",") if t], limit=limit or None, autocast=autocast, dtype=dtype,
        device=device, batch_size=batch_size, task_calib=task_calib,
        reconstruct=[r.strip() for r in reconstruct.split(",") if r.strip()],
    )
    err = Console(stderr=True, soft_wrap=True)  # one log line per message
    command = "gisp " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    results = compare(cfg, command=command, log=lambda msg: err.print(f"[bold]compare[/] {msg}"))
    Console().print(results_table(results))
    Console().print(f"results: {out / 'results.json'}, {out / 'results.md'}, {out / 'perplexity.png'}")
