"""``gisp prune``: run GISP on a model and write the run directory."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from gisp.calibration import build_calibration
from gisp.cli.app import app
from gisp.errors import GispError
from gisp.loading import DEFAULT_MODEL, fingerprint, load_model
from gisp.run import PruneConfig, distributed, prune
from gisp.run.config import GRAD_ACCUM
from gisp.run.trajectory import Trajectory

_DEFAULTS = PruneConfig()


def run_prune(model_name: str, out: Path, config: PruneConfig, *, dtype: str, device: str, resume: bool,
              device_map: str | None = None) -> Trajectory:
    """Load, build calibration data, prune; the shared path of ``prune`` and ``demo``.

    Under torchrun / accelerate launch (WORLD_SIZE > 1) every rank runs this; see gisp.distributed.
    """
    if distributed.init_from_env() and device_map is not None:
        raise GispError("--device-map and several processes cannot be combined yet: use one or the other")
    console = Console(stderr=True, quiet=not distributed.is_main())
    console.print(f"[bold]gisp prune[/] {model_name}: target {config.target} ({config.schedule_unit}), "
                  f"{config.steps} steps, objective {config.objective} on {config.calib}"
                  + (f", {distributed.world_size()} processes" if distributed.active() else ""))
    loaded = load_model(model_name, dtype=dtype, device=device, device_map=device_map)
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
def prune_command(
    model: str = typer.Argument(DEFAULT_MODEL, help="Hub id, local HF directory, .gguf file or 'smollm2-135m'."),
    out: Path = typer.Option(..., "--out", help="Run directory (trajectory.json is written there after every step)."),
    calib: str = typer.Option(
        _DEFAULTS.calib, help="Calibration source: c4, wiki, FILE.txt/.jsonl, hf:DS[:CFG]:SPLIT[:FIELD]."
    ),
    calib_samples: int = typer.Option(_DEFAULTS.calib_samples, help="Calibration samples (paper: 2000)."),
    seq_len: int = typer.Option(_DEFAULTS.seq_len, help="Tokens per calibration window (paper: 256)."),
    target: float = typer.Option(_DEFAULTS.target, help="Final sparsity in (0, 1)."),
    steps: int = typer.Option(_DEFAULTS.steps, help="Pruning steps (paper: 112; 32 is close)."),
    schedule: str = typer.Option(_DEFAULTS.schedule, help="linear, cosine or exp."),
    schedule_unit: str = typer.Option(_DEFAULTS.schedule_unit, help="params (parameter sparsity) or structures."),
    normalize: str = typer.Option(_DEFAULTS.normalize, help="params (paper Eq. 9), reference or none."),
    objective: str = typer.Option(_DEFAULTS.objective, help="Loss that defines importance (lm, ...)."),
    protect_first: float = typer.Option(_DEFAULTS.protect_first, help="Fraction of leading layers never pruned."),
    protect_last: int = typer.Option(_DEFAULTS.protect_last, help="Trailing layers never pruned."),
    batch_size: int = typer.Option(_DEFAULTS.batch_size, help="Micro-batch size (memory only)."),
    dtype: str = typer.Option("auto", help="Weight dtype: auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16."),
    autocast: str = typer.Option(_DEFAULTS.autocast, help="Mixed precision for forward/backward: none, bf16, fp16."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    seed: int = typer.Option(_DEFAULTS.seed, help="Seed of the calibration sampling."),
    resume: bool = typer.Option(False, help="Continue the run in --out from its last completed step."),
    grad_checkpointing: bool = typer.Option(_DEFAULTS.grad_checkpointing,
                                            help="Recompute activations in backward: less memory, ~1 more forward."),
    grad_accum_dtype: str = typer.Option(_DEFAULTS.grad_accum_dtype,
                                         help=f"Gradient sum precision, bf16/fp16 weights: {', '.join(GRAD_ACCUM)}."),
    device_map: str | None = typer.Option(None, help="Spread a model too big for one device: auto (accelerate)."),
    shrink_every: int = typer.Option(_DEFAULTS.shrink_every, help="Physically slice a working copy every K steps "
                                     "so later steps run faster (0: off; costs a copy of the kept weights)."),
) -> None:
    """Prune MODEL with GISP; one run holds every sparsity level up to --target."""
    config = PruneConfig(
        target=target, steps=steps, schedule=schedule, schedule_unit=schedule_unit, normalize=normalize,
        objective=objective, calib=calib, calib_samples=calib_samples, seq_len=seq_len, batch_size=batch_size,
        protect_first=protect_first, protect_last=protect_last, autocast=autocast, seed=seed,
        grad_checkpointing=grad_checkpointing, grad_accum_dtype=grad_accum_dtype, shrink_every=shrink_every,
    )
    traj = run_prune(model, out, config, dtype=dtype, device=device, resume=resume, device_map=device_map)
    main = distributed.is_main()
    distributed.shutdown()
    if not main:
        return
    Console().print(steps_table(traj))
    Console().print(f"trajectory: {out / 'trajectory.json'}  (evaluate with: gisp eval {out} --sparsity 0,0.2,0.5)")
