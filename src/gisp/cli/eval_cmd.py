"""``gisp eval``: perplexity (and tasks) of a run at chosen sparsities, or of a model."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from gisp.cli.app import app
from gisp.cli.common import parse_floats, with_config
from gisp.cli.recon_options import ReconOptions
from gisp.provenance import atomic_write_json


def results_table(result: dict) -> Table:
    p = result["protocol"]
    title = f"{result['model']['name']}: "
    if p["ppl_source"]:
        title += f"{p['ppl_source']} perplexity, {p['window']}-token windows (eval part), {p['eval_dtype']}"
    table = Table(title=title)
    for col in ("requested", "step", "sparsity", "linear params"):
        table.add_column(col, justify="right")
    if p["ppl_source"]:
        table.add_column("ppl", justify="right")
    task_names = list(result["rows"][0].get("tasks", {}))
    for t in task_names:
        table.add_column(t, justify="right")
    for r in result["rows"]:
        cells = [
            "-" if r.get("requested_sparsity") is None else f"{r['requested_sparsity']:.2f}",
            str(r.get("step", "-")),
            "-" if r["sparsity"] is None else f"{r['sparsity']:.4f}",
            f"{r['linear_params']:,}",
        ]
        if p["ppl_source"]:
            cells.append(f"{r['ppl']['ppl']:.3f}")
        for t in task_names:
            m = r["tasks"][t]
            cells.append(f"{m.get('value', float('nan')):.4f} ({m.get('metric', '?')})")
        table.add_row(*cells)
    return table


@app.command("eval")
@with_config(ReconOptions, param="recon")
def eval_command(
    target: str = typer.Argument(..., help="A run directory (from gisp prune) or a model (directory, hub id, "
                                 ".gguf, alias) of any causal LM architecture transformers loads."),
    sparsity: str = typer.Option("0", help="Comma-separated sparsities to evaluate a run at, e.g. 0,0.2,0.5."),
    ppl: str = typer.Option("wiki", help="Perplexity source (eval part): wiki, c4, FILE, hf:...; '' to skip."),
    window: int = typer.Option(128, help="Tokens per non-overlapping window (peers' protocol: 128)."),
    max_windows: int = typer.Option(256, help="Number of windows (fixed, from the start of the eval part)."),
    tasks: str = typer.Option("", help="Comma-separated tasks (piqa,arc_easy,...), evaluated on held-out items."),
    limit: int = typer.Option(0, help="Items per task (0 = all held-out items)."),
    dtype: str = typer.Option("fp32", help="Evaluation dtype: fp32, bf16, fp16."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    batch_size: int = typer.Option(8, help="Windows per forward pass."),
    json_out: Path = typer.Option(None, "--json", help="Also write the full result (with provenance) here."),
    *,
    recon: ReconOptions,
) -> None:
    """Evaluate a pruning run at several sparsities from its one trajectory, or a model as it is."""
    from gisp.evaluation.evaluate import evaluate
    from gisp.outputs import check_output_file

    if json_out:  # before the model loads; never over a run's or a model's own files
        check_output_file(json_out, option="--json", ours="eval", inputs=[])
    result = evaluate(
        target, parse_floats(sparsity), ppl=ppl or None, window=window, max_windows=max_windows,
        tasks=[t for t in tasks.split(",") if t] or None, limit=limit or None, dtype=dtype, device=device,
        batch_size=batch_size, reconstruct=recon.reconstruct, recon_options=recon.options(),
    )
    Console().print(results_table(result))
    if recon.reconstruct:
        from gisp.cli.export_cmd import recon_line

        for r in result["rows"]:
            Console().print(f"step {r['step']}: {recon_line(r['reconstruction'])}")
    if json_out:
        atomic_write_json(json_out, result)
        Console().print(f"results with provenance: {json_out}")
