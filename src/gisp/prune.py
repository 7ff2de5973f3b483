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
(:mod:`gisp.distributed`), so every rank picks what one process would.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from gisp import distributed
from gisp.architectures import apply_mask, get_architecture, layout_of
from gisp.core.calibration import CalibrationSet
from gisp.core.importance import NORMALIZATIONS, TaylorImportance, normalize
from gisp.core.objectives import Objective, get_objective
from gisp.core.ranking import UNITS, apply_picks, select
from gisp.core.schedule import SCHEDULES, targets
from gisp.core.structures import Layout
from gisp.errors import GispError
from gisp.provenance import versions
from gisp.shrink import ShrunkModel
from gisp.trajectory import FILENAME, Trajectory

AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
GRAD_ACCUM = ("fp32", "native", "fp64")
_ACCUM_DTYPE = {"fp32": torch.float32, "fp64": torch.float64}


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
    grad_checkpointing: bool = False
    """Recompute each decoder layer's activations during backward instead of keeping them: far less
    activation memory for about one extra forward pass; gradients and results are unchanged."""
    grad_accum_dtype: str = "fp32"
    """Precision the calibration-set gradient is summed in. Each micro-batch's gradient is computed in the
    weight dtype; fp32: summed into an fp32 gradient (bf16/fp16 weights: 4 bytes per prunable weight
    instead of 2; fp32 weights: as native); native: summed in the weight dtype (least memory, but a bf16
    sum of many micro-batches loses precision); fp64: summed in float64 (8 bytes), which makes the sum,
    hence the trajectory, independent of how micro-batches are split over processes."""
    shrink_every: int = 0
    """Every K steps, physically slice a working copy of the model (the export's slicing) so later steps'
    gradients run on a smaller network; 0: never. Same trajectory as the masked path up to ties of float
    rounding; costs a copy of the kept weights (see :mod:`gisp.shrink`)."""

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
            ("grad-accum-dtype", self.grad_accum_dtype, GRAD_ACCUM),
        ):
            if value not in allowed:
                raise GispError(f"unknown --{name} '{value}': use one of {', '.join(allowed)}")
        if self.calib_samples < 1:
            raise GispError(f"--calib-samples must be at least 1, got {self.calib_samples}")
        if self.batch_size < 1:
            raise GispError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.shrink_every < 0:
            raise GispError(f"--shrink-every must be 0 (off) or a number of steps, got {self.shrink_every}")
        get_objective(self.objective)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PruneConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# Settings that change memory or speed but not the trajectory may differ on resume.
_RESUME_FREE = {"batch_size", "grad_checkpointing", "shrink_every"}
# What a run saved before a setting existed did: compare old runs as if they had saved it.
_LEGACY = {"grad_checkpointing": False, "grad_accum_dtype": "native", "shrink_every": 0}


def _autocast(model: nn.Module, mode: str):
    dtype = AUTOCAST[mode]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(next(model.parameters()).device.type, dtype=dtype)


def input_device(model: nn.Module) -> torch.device:
    """Where inputs go: the embedding's device (with a device map, accelerate moves activations on)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return emb.weight.device if emb is not None else next(model.parameters()).device


def _local_batches(calib: CalibrationSet, batch_size: int) -> list[list[Any]]:
    """This rank's micro-batches: the single-process micro-batches, dealt to ranks in turn."""
    idx = list(range(len(calib)))
    if distributed.active():
        idx = distributed.shard_indices(len(calib), distributed.rank(), distributed.world_size(), "strided",
                                        block=batch_size)
    return [[calib.samples[i] for i in idx[s : s + batch_size]] for s in range(0, len(idx), batch_size)]


# torch >= 2.10 lets a bf16 parameter keep an fp32 .grad that autograd accumulates into directly.
_HAS_GRAD_DTYPE = hasattr(torch.Tensor, "grad_dtype")


@contextlib.contextmanager
def _accumulation_dtype(params: list[nn.Parameter], mode: str) -> Iterator[None]:
    """Sum gradients in ``mode``'s dtype while the block runs (see ``PruneConfig.grad_accum_dtype``).

    With ``Tensor.grad_dtype`` the ``.grad`` itself takes that dtype and keeps it
    for scoring (restore with :func:`restore_grad_dtype`). On older torch a
    post-accumulate hook moves each micro-batch's gradient into a buffer of that
    dtype; the sum is rounded once to the weight dtype at the end.
    """
    target = _ACCUM_DTYPE.get(mode)
    wider = [p for p in params if target is not None and p.dtype.itemsize < target.itemsize]
    widened = {id(p) for p in wider}
    if _HAS_GRAD_DTYPE:  # undo a gradient dtype left by an earlier pass of another mode
        for p in params:
            if p.grad is None and id(p) not in widened and p.grad_dtype != p.dtype:
                p.grad_dtype = p.dtype
    if not wider:
        yield
        return
    if _HAS_GRAD_DTYPE:
        for p in wider:
            if p.grad_dtype != target:
                g, p.grad = p.grad, None
                p.grad_dtype = target
                p.grad = None if g is None else g.to(target)
        yield
        return
    bufs: dict[int, torch.Tensor] = {}

    def hook(p: torch.Tensor) -> None:
        if id(p) in bufs:
            bufs[id(p)].add_(p.grad)
        else:
            bufs[id(p)] = p.grad.to(target)
        p.grad = None

    handles = [p.register_post_accumulate_grad_hook(hook) for p in wider]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
    for p in wider:
        buf = bufs.pop(id(p), None)
        if buf is not None:
            p.grad = buf.to(p.dtype) if p.grad is None else (buf + p.grad).to(p.dtype)


def restore_grad_dtype(model: nn.Module) -> None:
    """Give every parameter without a gradient its own dtype as gradient dtype again."""
    if _HAS_GRAD_DTYPE:
        for p in model.parameters():
            if p.grad is None and p.grad_dtype != p.dtype:
                p.grad_dtype = p.dtype


def accumulate_gradients(
    model: nn.Module, objective: Objective, calib: CalibrationSet, batch_size: int, autocast: str = "none",
    progress: tqdm | None = None, *, grad_accum_dtype: str = "fp32",
) -> float:
    """Leave the gradient of the mean per-sample loss in ``.grad``; return that mean loss.

    Distributed (:func:`gisp.distributed.active`): this rank runs its shard of
    the samples, each loss divided by the TOTAL sample count, and the gradients
    and the loss sum are all-reduced, so every rank ends with the gradient of the
    whole set's mean loss. With ``grad_accum_dtype='fp32'`` low-precision
    weights get fp32 gradients (see :class:`PruneConfig`); on torch with
    ``Tensor.grad_dtype`` those weights keep ``grad_dtype=float32`` until
    :func:`restore_grad_dtype` is called after their gradients are cleared
    (:func:`prune` does).
    """
    device = input_device(model)
    params = [p for p in model.parameters() if p.requires_grad]
    n = len(calib)
    total = 0.0
    with _accumulation_dtype(params, grad_accum_dtype):
        for samples in _local_batches(calib, batch_size):
            batch = objective.collate(samples)
            batch = {k: v.to(device) for k, v in batch.items()}
            with _autocast(model, autocast):
                losses = objective.sample_losses(model, batch)
            (losses.sum() / n).backward()
            total += float(losses.detach().float().sum())
            if progress is not None:
                progress.update(len(losses))
    if distributed.active():
        for p in params:  # a rank with no samples (or an unused weight) contributes zeros
            if p.grad is None:
                p.grad = torch.zeros_like(p, dtype=getattr(p, "grad_dtype", None) or p.dtype)
        distributed.all_reduce_sum_([p.grad for p in params])
        total = distributed.all_reduce_float(total)
    return total / n


@torch.no_grad()
def evaluate_objective(model: nn.Module, objective: Objective, calib: CalibrationSet, batch_size: int,
                       autocast: str = "none") -> float:
    """Mean per-sample loss over the calibration set (sharded and summed over ranks when distributed)."""
    device = input_device(model)
    total = 0.0
    for samples in _local_batches(calib, batch_size):
        batch = {k: v.to(device) for k, v in objective.collate(samples).items()}
        with _autocast(model, autocast):
            total += float(objective.sample_losses(model, batch).float().sum())
    return distributed.all_reduce_float(total) / len(calib)


@contextlib.contextmanager
def activation_checkpointing(model: nn.Module, on: bool = True) -> Iterator[None]:
    """Recompute decoder-layer activations in backward while the block runs (transformers' own).

    Non-reentrant, so it works with frozen inputs and embeddings. Transformers
    checkpoints only modules in training mode, so only the checkpointed layer
    modules themselves are flagged as training: their submodules (attention
    dropout) stay in eval mode and the computation is unchanged. Everything is
    restored afterwards.
    """
    if not on:
        yield
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise GispError(f"{type(model).__name__} does not support gradient checkpointing: drop --grad-checkpointing")
    was_on = any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    if not was_on:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    flagged = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    modes = [m.training for m in flagged]
    for m in flagged:
        m.training = True
    try:
        yield
    finally:
        for m, mode in zip(flagged, modes):
            m.training = mode
        if not was_on:
            if hasattr(model, "activation_checkpointing_disable"):
                model.activation_checkpointing_disable()
            else:
                model.gradient_checkpointing_disable()


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
    def comparable(cfg: dict) -> dict:
        out = {k: v for k, v in cfg.items() if k not in _RESUME_FREE}
        if model_info.get("weight_dtype") == "float32" and out.get("grad_accum_dtype") == "native":
            out["grad_accum_dtype"] = "fp32"  # the same thing for fp32 weights
        return out

    old, new = comparable({**_LEGACY, **traj.config}), comparable(config.to_dict())
    if old != new:
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
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
    from gisp.core.fingerprint import fingerprint

    if len(calib) == 0:
        raise GispError("the calibration set is empty: give more calibration text or samples")
    arch = get_architecture(model)
    layout = layout_of(model, config.protect_first, config.protect_last)
    objective = get_objective(config.objective)
    params = arch.prunable_parameters(model, layout)
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
        traj.steps.append({"step": 0, "target": 0.0, "sparsity": 0.0, "kept_params": layout.dense_params,
                           "calib_loss": None, "heads_removed": 0, "channels_removed": 0, "seconds": 0.0})
    elif traj.completed:
        apply_mask(model, traj.mask_at_step(traj.last_step))
        return traj
    else:
        apply_mask(model, traj.mask_at_step(traj.last_step))

    mask = traj.mask_at_step(traj.last_step)
    schedule = targets(config.schedule, config.target, config.steps)
    importance = TaylorImportance()
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)

    order = 1 + max((max(o) for o in traj.head_order + traj.channel_order if o), default=-1)
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
                traj.steps[-1]["calib_loss"] = loss  # loss of the previous step's mask
                t1 = time.perf_counter()
                raw = importance.scores(model, layout, arch) if shrunk is None else shrunk.taylor_scores()
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
                apply_mask(model, new_mask, since=mask)
                if shrunk is not None:
                    shrunk.remove(picks)
                mask = new_mask
                t4 = time.perf_counter()
                for p in picks:
                    if p.kind == "head":
                        traj.head_step[p.layer][p.index] = step
                        traj.head_order[p.layer][p.index] = order
                    else:
                        traj.channel_step[p.layer][p.index] = step
                        traj.channel_order[p.layer][p.index] = order
                    order += 1
                rec = {
                    "step": step,
                    "target": schedule[step - 1],
                    "sparsity": mask.sparsity(layout),
                    "kept_params": mask.kept_params(layout),
                    "calib_loss": None,
                    "heads_removed": sum(int((~h).sum()) for h in mask.heads),
                    "channels_removed": sum(int((~c).sum()) for c in mask.channels),
                }
                if every:
                    rec["work_params"] = model_params if shrunk is None else shrunk.params
                t5 = time.perf_counter()
                rec.update({"seconds": t5 - t0 + t_shrink, "gradient_seconds": t1 - t0, "timing": {
                    "processes": world, "scoring": t2 - t1, "selection": t3 - t2, "masking": t4 - t3,
                    "bookkeeping": t5 - t4, "shrink": t_shrink, "save": 0.0}})
                traj.steps.append(rec)
                if step == config.steps:  # the final mask's loss needs one more forward pass
                    rec["calib_loss"] = evaluate_objective(work, objective, calib, config.batch_size,
                                                           config.autocast)
                    traj.completed = True
                if run_path is not None and main:
                    t6 = time.perf_counter()
                    traj.save(run_path)
                    rec["timing"]["save"] = time.perf_counter() - t6
                bar.update(1)
                bar.set_postfix(sparsity=f"{rec['sparsity']:.3f}", loss=f"{loss:.3f}")
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
