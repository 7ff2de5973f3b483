"""``gisp prune``: run GISP on a model and write the run directory."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from gisp.cli.app import app
from gisp.cli.common import with_config
from gisp.errors import GispError
from gisp.loading import DEFAULT_MODEL
from gisp.run.config import PruneConfig, check_seq_len

if TYPE_CHECKING:
    from gisp.run.trajectory import Trajectory


def run_prune(model_name: str, out: Path, config: PruneConfig, *, dtype: str, device: str, resume: bool,
              device_map: str | None = None) -> Trajectory:
    """Load, build calibration data, prune; the shared path of ``prune`` and ``demo``.

    Under torchrun / accelerate launch (WORLD_SIZE > 1) every rank runs this; see gisp.run.distributed.
    """
    from gisp.core.calibration import build_calibration
    from gisp.core.fingerprint import fingerprint
    from gisp.loading import load_model
    from gisp.run import distributed
    from gisp.run.loop import prune
    from gisp.run.trajectory import FILENAME

    if distributed.init_from_env() and device_map is not None:
        raise GispError("--device-map and several processes cannot be combined yet: use one or the other")
    if not resume and not distributed.active() and (out / FILENAME).exists():  # before loading anything
        raise GispError(f"{out} already holds a pruning run: pass --resume to continue it or use another --out")
    console = Console(stderr=True, quiet=not distributed.is_main(), soft_wrap=True)  # log lines stay whole
    console.print(f"[bold]gisp prune[/] {model_name}: target {config.target} ({config.schedule_unit}), "
                  f"{config.steps} steps, objective {config.objective} on {config.calib}"
                  + (f", {distributed.world_size()} processes" if distributed.active() else ""))
    loaded = load_model(model_name, dtype=dtype, device=device, device_map=device_map)
    check_seq_len(config.seq_len, loaded.model.config)  # before the calibration set is built
    calib = build_calibration(config.objective, config.calib, loaded.tokenizer, config.calib_samples,
                              config.seq_len, config.seed)
    info = {"name": model_name, "path": loaded.path, "fingerprint": fingerprint(loaded.model)}
    return prune(loaded.model, config, calib, run_dir=out, resume=resume, model_info=info)


def steps_table(traj: Trajectory, max_rows: int = 12) -> Table:
    table = Table(title=f"GISP run: {traj.model['name']} (sparsity = fraction of decoder linear params removed)")
    for col in ("step", "target", "sparsity", "kept params", f"calib loss ({traj.config['objective']})", "s"):
        table.add_column(col, justify="right")
    steps = traj.steps
    stride = max(1, len(steps) // max_rows)
    shown = steps[::stride] + ([steps[-1]] if (len(steps) - 1) % stride else [])
    for r in shown:
        loss = "-" if r["calib_loss"] is None else f"{r['calib_loss']:.4f}"
        table.add_row(str(r["step"]), f"{r['target']:.3f}", f"{r['sparsity']:.4f}", f"{r['kept_params']:,}",
                      loss, f"{r['seconds']:.1f}")
    return table


@app.command("prune")
@with_config(PruneConfig)
def prune_command(
    model: str = typer.Argument(DEFAULT_MODEL, help="Hub id, local HF directory, .gguf file or 'smollm2-135m'."),
    out: Path = typer.Option(..., "--out", help="Run directory (trajectory.json is written there after every step)."),
    dtype: str = typer.Option("auto", help="Weight dtype: auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    resume: bool = typer.Option(False, help="Continue the run in --out from its last completed step."),
    device_map: str | None = typer.Option(None, help="Spread a model too big for one device: auto (accelerate)."),
    *,
    config: PruneConfig,
) -> None:
    """Prune MODEL with GISP; one run holds every sparsity level up to --target."""
    from gisp.outputs import check_output_dir
    from gisp.run import distributed

    check_output_dir(out, resumable=True, inputs=[model])  # a bad --out fails before the model loads
    traj = run_prune(model, out, config, dtype=dtype, device=device, resume=resume, device_map=device_map)
    main = distributed.is_main()
    distributed.shutdown()
    if not main:
        return
    Console().print(steps_table(traj))
    Console().print(f"trajectory: {out / 'trajectory.json'}  (evaluate with: gisp eval {out} --sparsity 0,0.2,0.5)")
