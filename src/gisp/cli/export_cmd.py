"""``gisp export``: write one level of a run as a physically smaller model, or list the levels."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from gisp.cli.app import app
from gisp.cli.common import parse_floats, with_config
from gisp.cli.recon_options import ReconOptions
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
@with_config(ReconOptions, param="recon")
def export_command(
    run: Path = typer.Argument(..., help="A run directory written by gisp prune (gguf, vllm: or an export directory)."),
    out: Path = typer.Option(None, "--out", help="Directory to write (new or empty); a .gguf file for gguf."),
    sparsity: str = typer.Option(None, help="Export the last step at or below this sparsity (gguf: a list, 0.2,0.3)."),
    step: int = typer.Option(None, help="Export this step of the run."),
    max_params: str = typer.Option(None, help="Largest model with at most this many parameters, e.g. 90M."),
    max_size_gb: float = typer.Option(None, help="Largest model whose weights fit in this many GB (1e9 bytes)."),
    round_to: int = typer.Option(None, help="Per-layer widths made multiples of N, along the global order."),
    uniform: bool = typer.Option(False, help="One shape for every layer (a plain checkpoint that loads without gisp) "
                                 "keeping every structure of the level: the widest layer's widths, larger."),
    uniform_cut: bool = typer.Option(False, help="One shape for every layer at the level's size: cuts protected "
                                     "layers by weight magnitude; NOT the run's model, quality can collapse."),
    gqa: str = typer.Option("map", help="Uneven GQA groups: map (smallest, needs gisp) or duplicate (standard)."),
    dtype: str = typer.Option(None, help="Weight dtype of the export: fp32, bf16, fp16 (default: the base model's)."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
    list_levels: bool = typer.Option(False, "--list", help="List every step's sparsity, size, known ppl."),
    fmt: str = typer.Option("hf", "--format", help="hf (a Hugging Face directory), gguf (files for llama.cpp) or "
                            "vllm (for vLLM's DeciLMForCausalLM: vllm serve DIR, gisp installed next to it)."),
    outtype: str = typer.Option(None, help="gguf weight type: f32 (default), f16, bf16, q8_0."),
    *,
    recon: ReconOptions,
) -> None:
    """Slice a run's base model to one level: smaller, exact, loadable with from_pretrained."""
    if uniform and uniform_cut:
        raise GispError("give --uniform (keep every structure of the level) or --uniform-cut (the level's size), "
                        "not both")
    uniform = "cut" if uniform_cut else uniform
    if outtype is not None and fmt != "gguf":
        raise GispError(f"--outtype sets the weight type of --format gguf; for --format {fmt} give --dtype fp32, bf16 "
                        "or fp16")
    from gisp.deploy.export import export
    from gisp.deploy.levels import levels
    from gisp.loading import load_base_model, torch_dtype
    from gisp.run.trajectory import Trajectory

    if list_levels:
        traj = Trajectory.load(run)
        loaded = load_base_model(traj.model)
        traj.check_model(loaded.model)
        rows = levels(traj, loaded.model, round_to=round_to, uniform=uniform, gqa=gqa,
                      dtype=torch_dtype(dtype) if dtype else None, run_dir=run)
        extra = ((", uniform-cut" if uniform == "cut" else ", uniform" if uniform else "")
                 + (f", round_to {round_to}" if round_to else ""))
        Console().print(levels_table(rows, f"{traj.model.get('name')}: exportable levels "
                                           f"(params incl. embeddings{extra})"))
        return
    if fmt == "gguf" and not list_levels:
        if dtype is not None:
            raise GispError("--dtype sets the weights of --format hf; for gguf give --outtype f32, f16, bf16 or q8_0")
        return gguf_export_command(run, out, sparsity=sparsity, step=step, max_params=max_params,
                                   max_size_gb=max_size_gb, outtype="f32" if outtype is None else outtype, gqa=gqa,
                                   round_to=round_to, uniform=uniform, overwrite=overwrite, recon=recon)
    if out is None:
        raise GispError("give --out DIR to write the export (or --list to see the levels)")
    if fmt == "vllm":
        from gisp.deploy.vllm import export_vllm

        one = parse_floats(sparsity)[0] if sparsity is not None else None
        v = export_vllm(run, out, sparsity=one, step=step, max_params=max_params, max_size_gb=max_size_gb,
                        round_to=round_to, uniform=uniform, dtype=dtype, overwrite=overwrite,
                        **_recon_kwargs(recon))
        level = "" if v.step is None else f"step {v.step} (sparsity {v.sparsity:.4f}) "
        Console().print(f"exported {level}for vLLM to {v.path}: {v.params_true:,} params "
                        f"({v.params_written:,} written, {v.params_written - v.params_true:+,} padding; KV heads "
                        f"{v.kv_heads_true} -> {v.kv_heads_written}); serve with: vllm serve {v.path}")
        return
    if fmt != "hf":
        raise GispError(f"unknown --format '{fmt}': use hf, gguf or vllm")
    if sparsity is not None:
        values = parse_floats(sparsity)
        if len(values) != 1:
            raise GispError("--format hf exports one level: give one --sparsity (several work with --format gguf)")
        sparsity = values[0]
    res = export(run, out, sparsity=sparsity, step=step, max_params=max_params, max_size_gb=max_size_gb,
                 round_to=round_to, uniform=uniform, gqa=gqa, dtype=dtype, overwrite=overwrite,
                 **_recon_kwargs(recon))
    console = Console()
    fmt = f"plain {res.model_type}" if res.plain else f"{res.model_type} (per-layer widths; needs 'import gisp')"
    console.print(f"exported step {res.step} (sparsity {res.sparsity:.4f}) to {res.path}: {res.params:,} params, "
                  f"{res.size_bytes / 1e6:.1f} MB, {fmt}")
    if res.record.get("compensation"):
        console.print("bias compensation written as o/down projection biases "
                      f"(from {res.record['compensation']['file']})")
    if res.record.get("reconstruction"):
        console.print(recon_line(res.record["reconstruction"]))
    if res.adjustment:
        print_adjustment(res.adjustment, res.step)


def print_adjustment(a: dict, step: int) -> None:
    """What --uniform/--round-to changed against the run's model, on stderr; loud when it cut the level."""
    err = Console(stderr=True)
    err.print(f"{a['kind']}: {a['params_delta']:+,} params ({a['params_change']:+.1%}) vs the run's model at step "
              f"{step} (sparsity {a['sparsity_before']:.4f} -> {a['sparsity_after']:.4f}); "
              f"{a['structures_added']} structures added back, {a['level_structures_removed']} of the level's cut")
    if a["level_structures_removed"]:
        err.print(f"[bold red]warning:[/] this export is NOT the run's model at step {step}: it cut "
                  f"{a['level_structures_removed']} structures the level keeps ({a['protected_structures_removed']} "
                  "in protected layers, chosen by weight magnitude); its quality can be far worse: measure it with "
                  "gisp eval, or export per-layer widths (no --uniform-cut)")


def gguf_export_command(run: Path, out: Path | None, *, sparsity: str | None, step: int | None, max_params: str | None,
               max_size_gb: float | None, outtype: str, gqa: str, round_to: int | None, uniform: bool,
               overwrite: bool, recon: ReconOptions | None = None) -> None:
    """``gisp export ... --format gguf``: write the files and print one line each."""
    from gisp.deploy.gguf import export_gguf

    if out is None:
        raise GispError("give --out FILE.gguf (or a directory / a name with {sparsity} for several levels)")
    values = parse_floats(sparsity) if sparsity is not None else None
    results = export_gguf(run, out, sparsity=values, step=step, max_params=max_params, max_size_gb=max_size_gb,
                          outtype=outtype, gqa=gqa, round_to=round_to, uniform=uniform, overwrite=overwrite,
                          **_recon_kwargs(recon))
    console = Console()
    for r in results:
        level = "" if r.step is None else f"step {r.step} (sparsity {r.sparsity:.4f}) "
        shape = "per-layer widths" if r.per_layer else "uniform widths"
        console.print(f"wrote {level}to {r.path}: {r.arch} ({shape}), {r.outtype}, {r.size_bytes / 1e6:.1f} MB")
        for note in r.notes:
            console.print(f"  note: {note}")


def _recon_kwargs(recon: ReconOptions | None) -> dict:
    """``reconstruct``/``recon_options`` for the export functions (nothing without --reconstruct)."""
    if recon is None or recon.reconstruct is None:
        return {}
    return {"reconstruct": recon.reconstruct, "recon_options": recon.options()}


def recon_line(r: dict) -> str:
    """One line saying how a level was reconstructed."""
    c = r.get("calibration") or {}
    return (f"reconstructed with {r['method']} (damping {r['damping']}) on {c.get('name')} {c.get('part')} part, "
            f"{c.get('samples')} x {c.get('seq_len')} tokens, seed {c.get('seed')}: {r['seconds']:.1f} s")
