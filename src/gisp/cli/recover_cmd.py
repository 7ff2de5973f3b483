"""``gisp recover``: LoRA recovery training of an exported level, written back as an export of the same shape."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from gisp.cli.app import app
from gisp.cli.common import with_config
from gisp.recovery.config import RecoverConfig


def _loss(losses: dict) -> str:
    text = f"{losses['total']:.4f}"
    return text if losses.get("kd") is None else f"{text} (kd {losses['kd']:.4f}, lm {losses['lm']:.4f})"


@app.command("recover")
@with_config(RecoverConfig, defaults={"tokens": ...})
def recover_command(
    export: Path = typer.Argument(..., help="An export directory written by gisp export (per-layer or --uniform)."),
    out: Path = typer.Option(..., "--out", help="Directory for the recovered export (new; holds the checkpoint "
                             "while training)."),
    resume: bool = typer.Option(False, help="Continue the unfinished recovery in --out from its last checkpoint."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    *,
    config: RecoverConfig,
) -> None:
    """Recovery-train EXPORT with LoRA (distilled from the dense model with --teacher/--teacher-from-run), merge
    the adapters and write an export of the same shape."""
    from gisp.recovery.train import recover

    console = Console(stderr=True)
    console.print(f"[bold]gisp recover[/] {export}: {config.method}, {config.steps} steps of "
                  f"{config.batch_size} x {config.seq_len} tokens from the calibration part of {config.data}")
    res = recover(export, out, config, resume=resume, device=device)
    r = res.record["recovery"]
    speed = "" if r["tokens_per_second"] is None else f", {r['tokens_per_second']:.0f} tokens/s"
    Console().print(f"recovered {export} -> {res.path}: {r['method']}, {res.steps} steps, {res.tokens:,} tokens, "
                    f"loss {_loss(res.first)} -> {_loss(res.final)}, {res.train_seconds:.0f} s training{speed}")
