"""``gisp report``: where a run was pruned, layer by layer, and whether the paper's observations hold."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from gisp.cli.app import app
from gisp.cli.common import parse_floats


@app.command("report")
def report_command(
    run: Path = typer.Argument(..., help="A run directory (trajectory.json): gisp prune, or a compare method's."),
    sparsity: str = typer.Option("", help="Comma-separated sparsities, e.g. 0.2,0.5 (default: 0.2-0.5 / its levels)."),
    out: Path = typer.Option(None, "--out", help="Where to write the plots and layers.md (default: the run)."),
) -> None:
    """Per-layer kept fractions of heads and channels (heatmap + line plot) and the paper's two observations."""
    from gisp.layer_report import write_layer_report

    rep = write_layer_report(run, parse_floats(sparsity) if sparsity else None, out)
    console = Console()
    for s in rep.statements():
        console.print(f"- {s}")
    console.print("files: " + ", ".join(rep.files.values()))
