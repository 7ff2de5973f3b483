"""GISP: global iterative structured pruning, one verb.

``prune(model, config, calib) -> Trajectory`` is the paper's algorithm (see
docs/method.md). After preparing the run (or resuming it from its directory),
every step

1. **gradients**: accumulates the objective's gradient over the whole
   calibration set on the masked model (:mod:`gisp.run.gradients`);
2. **score**: scores every head and channel (first-order Taylor) and
   normalises per block type;
3. **select**: ranks all structures globally and picks the lowest until the
   step's target sparsity;
4. **remove**: masks the picks in the model (and slices them out of the
   working copy, when there is one);
5. **record**: writes the step into the trajectory and checkpoints the run
   directory atomically.

Removed structures stay removed, so the masks are nested and one run yields
every sparsity level; a run resumes exactly from its last saved step.

Scale (``docs/scaling.md``): gradients exist only for prunable weights;
``grad_checkpointing`` trades one extra forward for the stored activations;
``grad_accum_dtype`` says in which precision the calibration-set gradient is
summed; ``shrink_every`` runs later steps on a physically sliced copy
(:mod:`gisp.run.shrink`); under ``torchrun``/``accelerate launch`` every rank takes
a shard of the calibration set and the shard gradients are summed by one
all-reduce (:mod:`gisp.run.distributed`), so every rank picks what one process
would, and rank 0's picks are broadcast to make sure.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from gisp.architectures import Architecture, get_architecture, layout_of
from gisp.core.calibration import CalibrationSet
from gisp.core.importance import StructureScores, TaylorImportance, normalize
from gisp.core.objectives import Objective, get_objective
from gisp.core.ranking import Pick, apply_picks, select
from gisp.core.schedule import targets
from gisp.core.structures import Layout, Mask
from gisp.errors import GispError
from gisp.provenance import remove_stale_temporaries, versions
from gisp.run import distributed
from gisp.run.config import PruneConfig, check_seq_len, resume_conflicts
from gisp.run.gradients import (
    accumulate_gradients,
    activation_checkpointing,
    evaluate_objective,
    input_device,
    restore_grad_dtype,
    warn_if_emulated,
)
from gisp.run.shrink import ShrunkModel
from gisp.run.trajectory import CALIB_HASH, FILENAME, StepRecord, Trajectory

T = TypeVar("T")


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
    :mod:`gisp.run.distributed`) every rank must call this with the same model,
    config and calibration set: each computes gradients on its shard, all apply
    the same picks, and only rank 0 writes ``run_dir``.

    Each step's record carries ``seconds`` (the step without the file write),
    ``gradient_seconds`` (forward+backward over the calibration set, all-reduce
    included) and ``timing``: the rest split into scoring, selection, masking,
    bookkeeping, plus ``shrink`` (slicing the working copy), ``save`` (the
    trajectory write, known only after it: the file shows it from the next
    write on) and ``processes``.
    """
    run = _prepare(model, config, calib, model_info, run_dir)
    traj = _start_or_resume(run, resume)
    if traj.completed:
        return traj
    state = _LoopState(mask=traj.mask_at_step(traj.last_step), order=traj.next_order())
    first = traj.last_step + 1
    bar = tqdm(total=config.steps, initial=traj.last_step, desc="GISP steps", unit="step",
               disable=not (progress and distributed.is_main()))
    _only_prunable_weights_get_gradients(model, run.params)
    try:
        with activation_checkpointing(model, config.grad_checkpointing):
            for step in range(first, config.steps + 1):
                clock = _Clock()
                clock("shrink", _shrink_if_due(run, state, step))
                loss = clock("gradients", _gradients(run, state))
                traj.set_loss(step - 1, loss)  # the gradients ran on the previous step's mask
                scores = clock("scoring", _score_step(run, state))
                picks = clock("selection", _select(run, state, scores, step))
                clock("masking", _remove(run, state, picks))
                record = clock("bookkeeping", _measure(run, state, step))
                state.order = traj.record_step(clock.stamp(record, run.world), picks, state.order)
                if step == config.steps:
                    _finish(run, state, traj, step)
                _save(run, traj, step)
                bar.update(1)
                bar.set_postfix_str(_progress_text(traj, step))
                if stop_after is not None and step - first + 1 >= stop_after and not traj.completed:
                    break
    finally:
        bar.close()
        _release(model, state)
    return traj


# the run and its state -------------------------------------------------------------------------------


@dataclass
class _Run:
    """What stays fixed for all steps of a run."""

    model: nn.Module
    config: PruneConfig
    calib: CalibrationSet
    layout: Layout
    arch: Architecture
    objective: Objective
    params: list[nn.Parameter]
    """The prunable weights: the only ones that get gradients."""
    schedule: list[float]
    """Target sparsity of each step (step ``k`` at index ``k - 1``)."""
    info: dict[str, Any]
    """The base-model record the trajectory carries (name, fingerprint, sizes, dtype)."""
    calibration: dict[str, Any]
    """The calibration record the trajectory carries: the set's provenance and ``tokens_sha256``."""
    path: Path | None
    model_params: int
    world: int


@dataclass
class _LoopState:
    """What changes from step to step."""

    mask: Mask
    """Structures kept so far (the base model carries it as zeros)."""
    order: int
    """Position in the global pruning order that the next removed structure takes."""
    shrunk: ShrunkModel | None = None
    """The physically sliced working copy (``shrink_every``), if one was made."""
    shrunk_ctx: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    """Activation checkpointing of the working copy."""

    def work(self, model: nn.Module) -> nn.Module:
        """The network the gradients run on: the sliced copy if there is one, else the masked model."""
        return model if self.shrunk is None else self.shrunk.model

    def drop_shrunk(self) -> None:
        self.shrunk_ctx.close()
        self.shrunk_ctx = contextlib.ExitStack()
        self.shrunk = None


class _Clock:
    """Seconds of a step's phases: ``clock(phase, value)`` ends ``phase`` (begun at the previous phase's end)
    after ``value`` was computed and passes ``value`` on."""

    def __init__(self) -> None:
        self.parts: dict[str, float] = {}
        self._t = time.perf_counter()

    def __call__(self, phase: str, value: T) -> T:
        now = time.perf_counter()
        self.parts[phase] = now - self._t
        self._t = now
        return value

    def stamp(self, record: StepRecord, processes: int) -> StepRecord:
        """``record`` with the step's seconds, gradient seconds and timing (``save`` follows the write)."""
        p = self.parts
        record.seconds = sum(p.values())
        record.gradient_seconds = p["gradients"]
        record.timing = {"processes": processes, "scoring": p["scoring"], "selection": p["selection"],
                         "masking": p["masking"], "bookkeeping": p["bookkeeping"], "shrink": p["shrink"],
                         "save": 0.0}
        return record


# preparing and resuming ------------------------------------------------------------------------------


def _prepare(model: nn.Module, config: PruneConfig, calib: CalibrationSet, model_info: dict[str, Any] | None,
             run_dir: str | Path | None) -> _Run:
    if len(calib) == 0:
        raise GispError("the calibration set is empty: give more calibration text or samples")
    longest = max((x.shape[-1] for x in calib.samples if isinstance(x, torch.Tensor)), default=0)
    check_seq_len(longest, model.config, "calibration samples of")
    arch = get_architecture(model)
    layout = layout_of(model, config.protect_first, config.protect_last)
    objective = get_objective(config.objective)
    params = get_architecture(model).prunable_parameters(model, layout)
    _check_placement(params)
    warn_if_emulated(config.autocast, input_device(model))
    return _Run(
        model=model, config=config, calib=calib, layout=layout, arch=arch, objective=objective,
        params=params, schedule=targets(config.schedule, config.target, config.steps),
        info=_model_info(model, layout, model_info),
        calibration={**calib.provenance, CALIB_HASH: calib.fingerprint()},
        path=Path(run_dir) if run_dir is not None else None,
        model_params=sum(p.numel() for p in model.parameters()), world=distributed.world_size(),
    )


def _model_info(model: nn.Module, layout: Layout, given: dict[str, Any] | None) -> dict[str, Any]:
    from gisp.core.fingerprint import fingerprint

    info = dict(given or {})
    info.setdefault("name", getattr(model.config, "_name_or_path", "model"))
    info["model_type"] = model.config.model_type
    info.setdefault("fingerprint", fingerprint(model))
    info["dense_params"] = layout.dense_params
    info["weight_dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    return info


def _start_or_resume(run: _Run, resume: bool) -> Trajectory:
    """A new trajectory (dense step 0), or the run directory's, whose last mask is then applied to the model."""
    if run.path is not None and distributed.is_main():
        remove_stale_temporaries(run.path)  # what a kill during a write of an earlier run left behind
    traj = _existing_run_all_ranks(run.path, resume, run.config, run.info, run.layout, run.calibration)
    if traj is None:
        return Trajectory.start(run.layout, run.config.to_dict(), run.info, run.calibration, versions())
    run.arch.apply_mask(run.model, traj.mask_at_step(traj.last_step))
    return traj


def _check_placement(params: list[nn.Parameter]) -> None:
    """Refuse weights offloaded by accelerate: their gradients would vanish with the offload."""
    if any(p.device.type == "meta" for p in params):
        raise GispError(
            "some prunable weights are offloaded (device 'meta': device_map put them on cpu/disk beside a GPU); "
            "GISP needs their gradients resident: give the model more devices, bf16 weights, "
            "--grad-checkpointing or --grad-accum-dtype native"
        )


def _prepare_resume(run_dir: Path, config: PruneConfig, model_info: dict, layout: Layout,
                    calibration: dict[str, Any]) -> Trajectory | None:
    if not (run_dir / FILENAME).exists():
        return None
    traj = Trajectory.load(run_dir)
    diff = resume_conflicts(traj.config, config, model_info.get("weight_dtype"))
    if diff:
        raise GispError(f"{run_dir} holds a run with different settings ({', '.join(diff)}): use another --out")
    if traj.model.get("fingerprint") != model_info["fingerprint"] or traj.layout.layers != layout.layers:
        raise GispError(f"{run_dir} holds a run of a different model ('{traj.model.get('name')}'): use another --out")
    if traj.edited:  # continuing would stamp a fresh checksum on whatever was changed
        raise GispError(f"{run_dir / FILENAME} was changed after gisp wrote it (checksum mismatch): restore it "
                        "or use another --out")
    _check_calibration(run_dir, traj.calibration, calibration)
    return traj


def _check_calibration(run_dir: Path, saved: dict[str, Any], now: dict[str, Any]) -> None:
    """Refuse to continue a run on other calibration tokens; a run saved before they were hashed resumes with
    a warning (its data cannot be checked, and its record is left as it was)."""
    if CALIB_HASH not in saved:
        warnings.warn(f"{run_dir} was saved by a gisp that did not record its calibration tokens: resuming without "
                      "checking that the calibration data is unchanged", stacklevel=4)
        return
    if saved[CALIB_HASH] != now[CALIB_HASH]:
        raise GispError(
            f"{run_dir} holds a run calibrated on other data (calibration tokens {saved[CALIB_HASH][:12]}..., now "
            f"{now[CALIB_HASH][:12]}...: was the --calib source changed?): restore that data or use another --out"
        )


def _existing_run(run_path: Path | None, resume: bool, config: PruneConfig, info: dict, layout: Layout,
                  calibration: dict[str, Any]) -> Trajectory | None:
    if run_path is None or not (run_path / FILENAME).exists():
        return None
    if not resume:
        raise GispError(f"{run_path} already holds a pruning run: pass --resume to continue it or use another --out")
    return _prepare_resume(run_path, config, info, layout, calibration)


def _existing_run_all_ranks(run_path: Path | None, resume: bool, config: PruneConfig, info: dict,
                            layout: Layout, calibration: dict[str, Any]) -> Trajectory | None:
    """Rank 0 reads the run directory; every rank gets its trajectory, or raises its error.

    Only rank 0 touches files, and every rank must fail alike: a rank that
    raised alone would leave the others waiting in the first all-reduce.
    """
    if not distributed.active():
        return _existing_run(run_path, resume, config, info, layout, calibration)
    prints = distributed.all_gather_object(info["fingerprint"])
    if len(set(prints)) > 1:
        raise GispError(f"the ranks loaded different models (fingerprints {', '.join(prints)}): load the same one")
    state: tuple[str, Any] | None = None
    if distributed.is_main():
        try:
            state = ("ok", _existing_run(run_path, resume, config, info, layout, calibration))
        except GispError as e:
            state = ("error", str(e))
    state = distributed.broadcast_object(state)
    if state[0] == "error":
        raise GispError(state[1])
    return state[1]


def _only_prunable_weights_get_gradients(model: nn.Module, params: list[nn.Parameter]) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)


# the steps -------------------------------------------------------------------------------------------


def _shrink_due(step: int, every: int, have_copy: bool) -> bool:
    """Slice a new working copy before ``step``: every ``every`` steps (never before step 2), and at once in a
    resumed run that is past its first slicing."""
    if not every or step == 1:
        return False
    return (step - 1) % every == 0 or (not have_copy and step - 1 > every)


def _shrink_if_due(run: _Run, state: _LoopState, step: int) -> None:
    """``shrink_every``: replace the working copy by one sliced to the current mask (:mod:`gisp.run.shrink`)."""
    if not _shrink_due(step, run.config.shrink_every, state.shrunk is not None):
        return
    state.drop_shrunk()  # free the previous copy before slicing the next one
    state.shrunk = ShrunkModel(run.model, state.mask, run.layout)
    for p in (*run.model.parameters(), *state.shrunk.model.parameters()):
        p.requires_grad_(False)
    for p in state.shrunk.prunable:
        p.requires_grad_(True)
    state.shrunk_ctx.enter_context(activation_checkpointing(state.shrunk.model, run.config.grad_checkpointing))


def _gradients(run: _Run, state: _LoopState) -> float:
    """Step 1: the objective's gradient over the calibration set, left in ``.grad``; returns the mean loss of
    the current mask."""
    c, work = run.config, state.work(run.model)
    work.zero_grad(set_to_none=True)
    if state.shrunk is not None and not state.shrunk.prunable:
        # the sliced copy has no prunable block left: nothing to score, the loss still counts
        return evaluate_objective(work, run.objective, run.calib, c.batch_size, c.autocast)
    return accumulate_gradients(work, run.objective, run.calib, c.batch_size, c.autocast,
                                grad_accum_dtype=c.grad_accum_dtype)


def _score_step(run: _Run, state: _LoopState) -> StructureScores:
    """Step 2: first-order Taylor score of every head and channel (base-model indices), normalised per block
    type; the gradients are freed."""
    raw = (TaylorImportance().scores(run.model, run.layout, run.arch) if state.shrunk is None
           else state.shrunk.taylor_scores())
    scores = normalize(raw, run.layout, run.config.normalize)
    del raw
    state.work(run.model).zero_grad(set_to_none=True)  # free the gradients before anything else is allocated
    return scores


def _select(run: _Run, state: _LoopState, scores: StructureScores, step: int) -> list[Pick]:
    """Step 3: rank every kept structure globally; the lowest go until the step's target is reached. With
    several processes, rank 0's picks are used by all."""
    picks = select(scores, state.mask, run.layout, run.schedule[step - 1], run.config.schedule_unit)
    if distributed.active():
        picks, same = distributed.broadcast_picks(picks)
        if not same:
            warnings.warn(f"rank {distributed.rank()} selected other structures than rank 0 at step {step}; "
                          "using rank 0's (gradients were not bit-identical)", stacklevel=3)
    return picks


def _remove(run: _Run, state: _LoopState, picks: list[Pick]) -> None:
    """Step 4: mask the picks in the model (only what changed) and slice them out of the working copy."""
    mask = apply_picks(state.mask, picks)
    run.arch.apply_mask(run.model, mask, since=state.mask)
    if state.shrunk is not None:
        state.shrunk.remove(picks)
    state.mask = mask


def _measure(run: _Run, state: _LoopState, step: int) -> StepRecord:
    """Step 5: the step's record (sparsity, kept parameters, removed structures) of the new mask."""
    work_params = None
    if run.config.shrink_every:
        work_params = run.model_params if state.shrunk is None else state.shrunk.params
    return StepRecord.of_mask(step, run.schedule[step - 1], state.mask, run.layout, work_params=work_params)


def _finish(run: _Run, state: _LoopState, traj: Trajectory, step: int) -> None:
    """The last step: its mask's loss needs one more forward pass; the run is complete."""
    c = run.config
    traj.set_loss(step, evaluate_objective(state.work(run.model), run.objective, run.calib, c.batch_size,
                                           c.autocast))
    traj.completed = True


def _save(run: _Run, traj: Trajectory, step: int) -> None:
    """Checkpoint the run directory (rank 0 only); the write's own time shows from the next write on."""
    if run.path is None or not distributed.is_main():
        return
    t0 = time.perf_counter()
    traj.save(run.path)
    traj.set_timing(step, "save", time.perf_counter() - t0)


def _progress_text(traj: Trajectory, step: int) -> str:
    """The progress bar's postfix: the step's sparsity, and the latest calibration loss next to the sparsity of
    the mask it was measured on (a step's gradient pass measures the previous step's mask)."""
    rec = traj.record(step)
    measured = rec if rec.calib_loss is not None else traj.record(step - 1)
    return f"sparsity={rec.sparsity:.3f}, loss={measured.calib_loss:.3f} at sparsity {measured.sparsity:.3f}"


def _release(model: nn.Module, state: _LoopState) -> None:
    """Whatever happened: no working copy, no gradients, no ``requires_grad``, gradient dtypes restored."""
    state.drop_shrunk()
    for p in model.parameters():
        p.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    restore_grad_dtype(model)
