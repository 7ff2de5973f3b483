"""GISP: global iterative structured pruning, one verb.

``prune(model, config, calib) -> Trajectory``: at every step, accumulate the
objective's gradient over the whole calibration set on the masked model, score
every head and channel (first-order Taylor), normalise per block type, rank
globally and remove the lowest until the step's target. Removed structures stay
removed, so the masks are nested and one run yields every sparsity level. The
run directory is checkpointed atomically after each step and resumes exactly.

Scale (``docs/scaling.md``): gradients exist only for prunable weights;
``grad_checkpointing`` trades one extra forward for the stored activations;
``grad_accum_dtype`` says in which precision the calibration-set gradient is
summed; under ``torchrun``/``accelerate launch`` every rank takes a shard of the
calibration set and the shard gradients are summed by one all-reduce
(:mod:`gisp.run.distributed`), so every rank picks what one process would.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from gisp.adapters import get_adapter
from gisp.calibration import CalibrationSet
from gisp.errors import GispError
from gisp.importance import TaylorImportance, normalize, prunable_parameters
from gisp.objectives import get_objective
from gisp.provenance import versions
from gisp.ranking import apply_picks, select
from gisp.run import distributed
from gisp.run.config import PruneConfig, resume_conflicts
from gisp.run.gradients import accumulate_gradients, activation_checkpointing, evaluate_objective, restore_grad_dtype
from gisp.run.trajectory import FILENAME, StepRecord, Trajectory
from gisp.schedule import targets
from gisp.shrink import ShrunkModel
from gisp.structures import Layout


def _check_placement(params: list[nn.Parameter]) -> None:
    """Refuse weights offloaded by accelerate: their gradients would vanish with the offload."""
    if any(p.device.type == "meta" for p in params):
        raise GispError(
            "some prunable weights are offloaded (device 'meta': device_map put them on cpu/disk beside a GPU); "
            "GISP needs their gradients resident: give the model more devices, bf16 weights, "
            "--grad-checkpointing or --grad-accum-dtype native"
        )


def _prepare_resume(run_dir: Path, config: PruneConfig, model_info: dict, layout: Layout) -> Trajectory | None:
    if not (run_dir / FILENAME).exists():
        return None
    traj = Trajectory.load(run_dir)
    diff = resume_conflicts(traj.config, config, model_info.get("weight_dtype"))
    if diff:
        raise GispError(f"{run_dir} holds a run with different settings ({', '.join(diff)}): use another --out")
    if traj.model.get("fingerprint") != model_info["fingerprint"] or traj.layout.layers != layout.layers:
        raise GispError(f"{run_dir} holds a run of a different model ('{traj.model.get('name')}'): use another --out")
    return traj


def _existing_run(run_path: Path | None, resume: bool, config: PruneConfig, info: dict, layout: Layout
                  ) -> Trajectory | None:
    if run_path is None or not (run_path / FILENAME).exists():
        return None
    if not resume:
        raise GispError(f"{run_path} already holds a pruning run: pass --resume to continue it or use another --out")
    return _prepare_resume(run_path, config, info, layout)


def _existing_run_all_ranks(run_path: Path | None, resume: bool, config: PruneConfig, info: dict,
                            layout: Layout) -> Trajectory | None:
    """Rank 0 reads the run directory; every rank gets its trajectory, or raises its error.

    Only rank 0 touches files, and every rank must fail alike: a rank that
    raised alone would leave the others waiting in the first all-reduce.
    """
    if not distributed.active():
        return _existing_run(run_path, resume, config, info, layout)
    prints = distributed.all_gather_object(info["fingerprint"])
    if len(set(prints)) > 1:
        raise GispError(f"the ranks loaded different models (fingerprints {', '.join(prints)}): load the same one")
    state: tuple[str, Any] | None = None
    if distributed.is_main():
        try:
            state = ("ok", _existing_run(run_path, resume, config, info, layout))
        except GispError as e:
            state = ("error", str(e))
    state = distributed.broadcast_object(state)
    if state[0] == "error":
        raise GispError(state[1])
    return state[1]


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

    Inside an initialised process group (``torchrun``; see
    :mod:`gisp.distributed`) every rank must call this with the same model,
    config and calibration set: each computes gradients on its shard, all apply
    the same picks, and only rank 0 writes ``run_dir``.

    Each step's record carries ``seconds`` (the step without the file write),
    ``gradient_seconds`` (forward+backward over the calibration set, all-reduce
    included) and ``timing``: the rest split into scoring, selection, masking,
    bookkeeping, plus ``save`` (the trajectory write, known only after it: the
    file shows it from the next write on) and ``processes``.
    """
    from gisp.loading import fingerprint

    if len(calib) == 0:
        raise GispError("the calibration set is empty: give more calibration text or samples")
    adapter = get_adapter(model)
    layout = Layout.from_model(model, config.protect_first, config.protect_last)
    objective = get_objective(config.objective)
    params = prunable_parameters(model, layout, adapter)
    _check_placement(params)
    info = dict(model_info or {})
    info.setdefault("name", getattr(model.config, "_name_or_path", "model"))
    info["model_type"] = model.config.model_type
    info.setdefault("fingerprint", fingerprint(model))
    info["dense_params"] = layout.dense_params
    info["weight_dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")

    main = distributed.is_main()
    world = distributed.world_size()
    run_path = Path(run_dir) if run_dir is not None else None
    traj = _existing_run_all_ranks(run_path, resume, config, info, layout)
    if traj is None:
        traj = Trajectory.start(layout, config.to_dict(), info, calib.provenance, versions())
    elif traj.completed:
        traj.mask_at_step(traj.last_step).apply(model, adapter)
        return traj
    else:
        traj.mask_at_step(traj.last_step).apply(model, adapter)

    mask = traj.mask_at_step(traj.last_step)
    schedule = targets(config.schedule, config.target, config.steps)
    importance = TaylorImportance()
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)

    order = traj.next_order()
    done_here = 0
    bar = tqdm(total=config.steps, initial=traj.last_step, desc="GISP steps", disable=not (progress and main),
               unit="step")
    every = config.shrink_every
    model_params = sum(p.numel() for p in model.parameters())
    shrunk: ShrunkModel | None = None
    work_ctx = contextlib.ExitStack()
    try:
        with activation_checkpointing(model, config.grad_checkpointing):
            for step in range(traj.last_step + 1, config.steps + 1):
                t0 = time.perf_counter()
                if every and step > 1 and ((step - 1) % every == 0 or (shrunk is None and step - 1 > every)):
                    work_ctx.close()
                    shrunk = None  # free the previous copy before slicing the next one
                    shrunk = ShrunkModel(model, mask, layout)
                    for p in (*model.parameters(), *shrunk.model.parameters()):
                        p.requires_grad_(False)
                    for p in shrunk.prunable:
                        p.requires_grad_(True)
                    work_ctx = contextlib.ExitStack()
                    work_ctx.enter_context(activation_checkpointing(shrunk.model, config.grad_checkpointing))
                work = model if shrunk is None else shrunk.model
                t_shrink = time.perf_counter() - t0
                work.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                if shrunk is None or shrunk.prunable:
                    loss = accumulate_gradients(work, objective, calib, config.batch_size, config.autocast,
                                                grad_accum_dtype=config.grad_accum_dtype)
                else:  # the sliced copy has no prunable block left: nothing to score, the loss still counts
                    loss = evaluate_objective(work, objective, calib, config.batch_size, config.autocast)
                traj.set_loss(step - 1, loss)  # loss of the previous step's mask
                t1 = time.perf_counter()
                raw = importance.scores(model, layout, adapter) if shrunk is None else shrunk.taylor_scores()
                scores = normalize(raw, layout, config.normalize)
                del raw
                work.zero_grad(set_to_none=True)  # free the gradients before anything else is allocated
                t2 = time.perf_counter()
                picks = select(scores, mask, layout, schedule[step - 1], config.schedule_unit)
                del scores
                if distributed.active():
                    picks, same = distributed.broadcast_picks(picks)
                    if not same:
                        warnings.warn(f"rank {distributed.rank()} selected other structures than rank 0 at step "
                                      f"{step}; using rank 0's (gradients were not bit-identical)", stacklevel=2)
                t3 = time.perf_counter()
                new_mask = apply_picks(mask, picks)
                new_mask.apply(model, adapter, since=mask)
                if shrunk is not None:
                    shrunk.remove(picks)
                mask = new_mask
                t4 = time.perf_counter()
                rec = StepRecord.of_mask(step, schedule[step - 1], mask, layout,
                                         work_params=(model_params if shrunk is None else shrunk.params) if every
                                         else None)
                t5 = time.perf_counter()
                rec.seconds, rec.gradient_seconds, rec.timing = t5 - t0 + t_shrink, t1 - t0, {
                    "processes": world, "scoring": t2 - t1, "selection": t3 - t2, "masking": t4 - t3,
                    "bookkeeping": t5 - t4, "shrink": t_shrink, "save": 0.0}
                order = traj.record_step(rec, picks, order)
                if step == config.steps:  # the final mask's loss needs one more forward pass
                    traj.set_loss(step, evaluate_objective(work, objective, calib, config.batch_size,
                                                           config.autocast))
                    traj.completed = True
                if run_path is not None and main:
                    t6 = time.perf_counter()
                    traj.save(run_path)
                    traj.set_timing(step, "save", time.perf_counter() - t6)
                bar.update(1)
                bar.set_postfix(sparsity=f"{rec.sparsity:.3f}", loss=f"{loss:.3f}")
                done_here += 1
                if stop_after is not None and done_here >= stop_after and not traj.completed:
                    break
    finally:
        bar.close()
        work_ctx.close()
        shrunk = None
        for p in model.parameters():
            p.requires_grad_(False)
        model.zero_grad(set_to_none=True)
        restore_grad_dtype(model)
    return traj
