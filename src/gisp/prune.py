"""GISP: global iterative structured pruning, one verb.

``prune(model, config, calib) -> Trajectory``: at every step, accumulate the
objective's gradient over the whole calibration set on the masked model, score
every head and channel (first-order Taylor), normalise per block type, rank
globally and remove the lowest until the step's target. Removed structures stay
removed, so the masks are nested and one run yields every sparsity level. The
run directory is checkpointed atomically after each step and resumes exactly.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from gisp.adapters import get_adapter
from gisp.calibration import CalibrationSet
from gisp.errors import GispError
from gisp.importance import NORMALIZATIONS, TaylorImportance, normalize, prunable_parameters
from gisp.objectives import Objective, get_objective
from gisp.provenance import versions
from gisp.ranking import UNITS, apply_picks, select
from gisp.schedule import SCHEDULES, targets
from gisp.structures import Layout
from gisp.trajectory import FILENAME, Trajectory

AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class PruneConfig:
    """Settings of one GISP run. Defaults follow the paper (``shared/GISP.md``)."""

    target: float = 0.5
    """Final sparsity, in ``schedule_unit`` (parameters by default)."""
    steps: int = 112
    """Pruning steps; the paper uses 112 for 7-8B models and finds 32 close."""
    schedule: str = "linear"
    """How targets rise: linear (paper), cosine or exp."""
    schedule_unit: str = "params"
    """params: targets are parameter sparsity; structures: fraction of structures (reference code)."""
    normalize: str = "params"
    """Block-wise normalisation: params (paper Eq. 9), reference (reference code), none."""
    objective: str = "lm"
    """Loss that defines importance."""
    calib: str = "c4"
    """Calibration source."""
    calib_samples: int = 2000
    """Calibration samples (windows for lm); the paper uses 2000."""
    seq_len: int = 256
    """Tokens per calibration window; the paper uses 256."""
    batch_size: int = 8
    """Samples per forward/backward micro-batch (memory, not results)."""
    protect_first: float = 0.1
    """Fraction of leading layers never pruned."""
    protect_last: int = 1
    """Trailing layers never pruned."""
    autocast: str = "none"
    """Mixed precision for the forward/backward (none, bf16, fp16); weights keep their dtype."""
    seed: int = 0
    """Seed of the calibration sampling."""

    def __post_init__(self) -> None:
        if not 0.0 < self.target < 1.0:
            raise GispError(f"target sparsity must be in (0, 1), got {self.target}")
        if self.steps < 1:
            raise GispError(f"--steps must be at least 1, got {self.steps}")
        for name, value, allowed in (
            ("schedule", self.schedule, SCHEDULES),
            ("schedule-unit", self.schedule_unit, UNITS),
            ("normalize", self.normalize, NORMALIZATIONS),
            ("autocast", self.autocast, tuple(AUTOCAST)),
        ):
            if value not in allowed:
                raise GispError(f"unknown --{name} '{value}': use one of {', '.join(allowed)}")
        if self.calib_samples < 1:
            raise GispError(f"--calib-samples must be at least 1, got {self.calib_samples}")
        if self.batch_size < 1:
            raise GispError(f"--batch-size must be at least 1, got {self.batch_size}")
        get_objective(self.objective)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PruneConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# Settings that change memory or speed but not the trajectory may differ on resume.
_RESUME_FREE = {"batch_size"}


def _autocast(model: nn.Module, mode: str):
    dtype = AUTOCAST[mode]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(next(model.parameters()).device.type, dtype=dtype)


def accumulate_gradients(
    model: nn.Module, objective: Objective, calib: CalibrationSet, batch_size: int, autocast: str = "none",
    progress: tqdm | None = None,
) -> float:
    """Leave the gradient of the mean per-sample loss in ``.grad``; return that mean loss."""
    device = next(model.parameters()).device
    n = len(calib)
    total = 0.0
    for start in range(0, n, batch_size):
        batch = objective.collate(calib.samples[start : start + batch_size])
        batch = {k: v.to(device) for k, v in batch.items()}
        with _autocast(model, autocast):
            losses = objective.sample_losses(model, batch)
        (losses.sum() / n).backward()
        total += float(losses.detach().float().sum())
        if progress is not None:
            progress.update(len(losses))
    return total / n


@torch.no_grad()
def evaluate_objective(model: nn.Module, objective: Objective, calib: CalibrationSet, batch_size: int,
                       autocast: str = "none") -> float:
    device = next(model.parameters()).device
    total = 0.0
    for start in range(0, len(calib), batch_size):
        batch = {k: v.to(device) for k, v in objective.collate(calib.samples[start : start + batch_size]).items()}
        with _autocast(model, autocast):
            total += float(objective.sample_losses(model, batch).float().sum())
    return total / len(calib)


def _prepare_resume(run_dir: Path, config: PruneConfig, model_info: dict, layout: Layout) -> Trajectory | None:
    if not (run_dir / FILENAME).exists():
        return None
    traj = Trajectory.load(run_dir)
    old = {k: v for k, v in traj.config.items() if k not in _RESUME_FREE}
    new = {k: v for k, v in config.to_dict().items() if k not in _RESUME_FREE}
    if old != new:
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise GispError(f"{run_dir} holds a run with different settings ({', '.join(diff)}): use another --out")
    if traj.model.get("fingerprint") != model_info["fingerprint"] or traj.layout.layers != layout.layers:
        raise GispError(f"{run_dir} holds a run of a different model ('{traj.model.get('name')}'): use another --out")
    return traj


def prune(
    model: nn.Module,
    config: PruneConfig,
    calib: CalibrationSet,
    *,
    run_dir: str | Path | None = None,
    resume: bool = False,
    model_info: dict[str, Any] | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> Trajectory:
    """Run GISP on ``model`` (masked in place) and return its trajectory.

    With ``run_dir`` the trajectory is saved after every step; ``resume=True``
    continues a run from its last completed step. ``stop_after`` ends the call
    after that many steps of this call (used to test resumption).
    """
    from gisp.loading import fingerprint

    if len(calib) == 0:
        raise GispError("the calibration set is empty: give more calibration text or samples")
    adapter = get_adapter(model)
    layout = Layout.from_model(model, config.protect_first, config.protect_last)
    objective = get_objective(config.objective)
    info = dict(model_info or {})
    info.setdefault("name", getattr(model.config, "_name_or_path", "model"))
    info["model_type"] = model.config.model_type
    info.setdefault("fingerprint", fingerprint(model))
    info["dense_params"] = layout.dense_params
    info["weight_dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")

    run_path = Path(run_dir) if run_dir is not None else None
    traj = None
    if run_path is not None and (run_path / FILENAME).exists():
        if not resume:
            raise GispError(
                f"{run_path} already holds a pruning run: pass --resume to continue it or use another --out"
            )
        traj = _prepare_resume(run_path, config, info, layout)
    if traj is None:
        traj = Trajectory.start(layout, config.to_dict(), info, calib.provenance, versions())
        traj.steps.append({"step": 0, "target": 0.0, "sparsity": 0.0, "kept_params": layout.dense_params,
                           "calib_loss": None, "heads_removed": 0, "channels_removed": 0, "seconds": 0.0})
    elif traj.completed:
        traj.mask_at_step(traj.last_step).apply(model, adapter)
        return traj
    else:
        traj.mask_at_step(traj.last_step).apply(model, adapter)

    mask = traj.mask_at_step(traj.last_step)
    schedule = targets(config.schedule, config.target, config.steps)
    importance = TaylorImportance()
    params = prunable_parameters(model, layout, adapter)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)

    order = 1 + max((max(o) for o in traj.head_order + traj.channel_order if o), default=-1)
    done_here = 0
    bar = tqdm(total=config.steps, initial=traj.last_step, desc="GISP steps", disable=not progress, unit="step")
    try:
        for step in range(traj.last_step + 1, config.steps + 1):
            t0 = time.perf_counter()
            model.zero_grad(set_to_none=True)
            loss = accumulate_gradients(model, objective, calib, config.batch_size, config.autocast)
            traj.steps[-1]["calib_loss"] = loss  # loss of the previous step's mask
            t_grad = time.perf_counter() - t0
            scores = normalize(importance.scores(model, layout, adapter), layout, config.normalize)
            picks = select(scores, mask, layout, schedule[step - 1], config.schedule_unit)
            model.zero_grad(set_to_none=True)
            mask = apply_picks(mask, picks)
            mask.apply(model, adapter)
            for p in picks:
                if p.kind == "head":
                    traj.head_step[p.layer][p.index] = step
                    traj.head_order[p.layer][p.index] = order
                else:
                    traj.channel_step[p.layer][p.index] = step
                    traj.channel_order[p.layer][p.index] = order
                order += 1
            traj.steps.append({
                "step": step,
                "target": schedule[step - 1],
                "sparsity": mask.sparsity(layout),
                "kept_params": mask.kept_params(layout),
                "calib_loss": None,
                "heads_removed": sum(int((~h).sum()) for h in mask.heads),
                "channels_removed": sum(int((~c).sum()) for c in mask.channels),
                "seconds": time.perf_counter() - t0,
                "gradient_seconds": t_grad,
            })
            if step == config.steps:  # the final mask's loss needs one more forward pass
                traj.steps[-1]["calib_loss"] = evaluate_objective(model, objective, calib, config.batch_size,
                                                                  config.autocast)
                traj.completed = True
            if run_path is not None:
                traj.save(run_path)
            bar.update(1)
            bar.set_postfix(sparsity=f"{traj.steps[-1]['sparsity']:.3f}", loss=f"{loss:.3f}")
            done_here += 1
            if stop_after is not None and done_here >= stop_after and not traj.completed:
                break
    finally:
        bar.close()
        for p in model.parameters():
            p.requires_grad_(False)
        model.zero_grad(set_to_none=True)
    return traj
