"""``gisp export``: write one level of a run as a physically smaller model, or list the levels."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from gisp.cli.app import app
from gisp.errors import GispError


def levels_table(rows: list, title: str) -> Table:
    table = Table(title=title)
    for col in ("step", "sparsity", "params", "size (MB)", "ppl"):
        table.add_column(col, justify="right")
    for lv in rows:
        ppl = "-" if lv.ppl is None else f"{lv.ppl:.3f} ({lv.ppl_protocol})"
        table.add_row(str(lv.step), f"{lv.sparsity:.4f}", f"{lv.params:,}", f"{lv.size_bytes / 1e6:.1f}", ppl)
    return table


@app.command("export")
def export_command(
    run: Path = typer.Argument(..., help="A run directory written by gisp prune (or, with --format vllm, an export)."),
    out: Path = typer.Option(None, "--out", help="Directory to write (must not exist or be empty)."),
    sparsity: float = typer.Option(None, help="Export the last step at or below this sparsity."),
    step: int = typer.Option(None, help="Export this step of the run."),
    max_params: str = typer.Option(None, help="Largest model with at most this many parameters, e.g. 90M."),
    max_size_gb: float = typer.Option(None, help="Largest model whose weights fit in this many GB (1e9 bytes)."),
    round_to: int = typer.Option(None, help="Per-layer widths made multiples of N, along the global order."),
    uniform: bool = typer.Option(False, help="One shape for every layer: a plain checkpoint that loads without gisp."),
    gqa: str = typer.Option("map", help="Uneven GQA groups: map (smallest, needs gisp) or duplicate (standard)."),
    dtype: str = typer.Option(None, help="Weight dtype of the export: fp32, bf16, fp16 (default: the base model's)."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
    fmt: str = typer.Option("hf", "--format", help="hf: Hugging Face directory; vllm: for vLLM's DeciLMForCausalLM "
                            "(vllm serve DIR, with gisp installed next to vLLM)."),
    list_levels: bool = typer.Option(False, "--list", help="List every step's sparsity, size, known ppl."),
) -> None:
    """Slice a run's base model to one level: smaller, exact, loadable with from_pretrained."""
    from gisp.export import export, levels
    from gisp.loading import DTYPES, load_model
    from gisp.trajectory import Trajectory

    if list_levels:
        traj = Trajectory.load(run)
        name = traj.model.get("path") or traj.model.get("name")
        loaded = load_model(name, dtype="fp32", device="cpu")
        traj.check_model(loaded.model)
        if dtype is not None and dtype not in DTYPES:
            raise GispError(f"unknown dtype '{dtype}': use one of {', '.join(DTYPES)}")
        rows = levels(traj, loaded.model, round_to=round_to, uniform=uniform, gqa=gqa,
                      dtype=DTYPES[dtype] if dtype else None, run_dir=run)
        extra = (", uniform" if uniform else "") + (f", round_to {round_to}" if round_to else "")
        Console().print(levels_table(rows, f"{traj.model.get('name')}: exportable levels "
                                           f"(params incl. embeddings{extra})"))
        return
    if out is None:
        raise GispError("give --out DIR to write the export (or --list to see the levels)")
    if fmt == "vllm":
        from gisp.vllm_export import export_vllm

        v = export_vllm(run, out, sparsity=sparsity, step=step, max_params=max_params, max_size_gb=max_size_gb,
                        round_to=round_to, uniform=uniform, dtype=dtype, overwrite=overwrite)
        level = "" if v.step is None else f"step {v.step} (sparsity {v.sparsity:.4f}) "
        Console().print(f"exported {level}for vLLM to {v.path}: {v.params_true:,} params "
                        f"({v.params_written:,} written, {v.params_written - v.params_true:+,} padding; KV heads "
                        f"{v.kv_heads_true} -> {v.kv_heads_written}); serve with: vllm serve {v.path}")
        return
    if fmt != "hf":
        raise GispError(f"unknown --format '{fmt}': use hf or vllm")
    res = export(run, out, sparsity=sparsity, step=step, max_params=max_params, max_size_gb=max_size_gb,
                 round_to=round_to, uniform=uniform, gqa=gqa, dtype=dtype, overwrite=overwrite)
    console = Console()
    fmt = f"plain {res.model_type}" if res.plain else f"{res.model_type} (per-layer widths; needs 'import gisp')"
    console.print(f"exported step {res.step} (sparsity {res.sparsity:.4f}) to {res.path}: {res.params:,} params, "
                  f"{res.size_bytes / 1e6:.1f} MB, {fmt}")
    if res.record.get("compensation"):
        console.print("bias compensation written as o_proj/down_proj biases "
                      f"(from {res.record['compensation']['file']})")
    if res.adjustment:
        a = res.adjustment
        console.print(f"{a['kind']}: {a['params_delta']:+,} params vs step {res.step} "
                      f"(sparsity {a['sparsity_before']:.4f} -> {a['sparsity_after']:.4f}); "
                      f"structures removed from protected layers: {a['protected_structures_removed']}")
