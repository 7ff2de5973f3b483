"""Step 1 of every GISP step: the objective's gradient over the whole calibration set.

``accumulate_gradients`` leaves the gradient of the mean per-sample loss in the
prunable weights' ``.grad``: micro-batches of ``batch_size`` samples, summed in
the precision ``grad_accum_dtype`` asks for, optionally under autocast and
activation checkpointing. Under ``torchrun``/``accelerate launch`` every rank
takes a shard of the calibration set and the shard gradients are summed by one
all-reduce (:mod:`gisp.run.distributed`), so every rank scores what one process
would.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from gisp.core.calibration import CalibrationSet
from gisp.core.objectives import Objective
from gisp.errors import GispError
from gisp.run import distributed

_ACCUM_DTYPE = {"fp32": torch.float32, "fp64": torch.float64}
_AUTOCAST_DTYPE = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _autocast(model: nn.Module, mode: str):
    dtype = _AUTOCAST_DTYPE[mode]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(next(model.parameters()).device.type, dtype=dtype)


def native_bf16(device: torch.device | str) -> bool:
    """Whether bf16 matmuls run in hardware on ``device``.

    CUDA: when the GPU supports bf16. CPU: when oneDNN has bf16 kernels (AVX-512 or AMX); on an AVX2-only CPU
    torch emulates bf16, and a bf16-autocast forward+backward of SmolLM2-135M measured about 25x slower than fp32
    (docs/bench_scale.md, "precision"), so ``--autocast bf16`` there costs time instead of saving it.
    """
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return True


def warn_if_emulated(autocast: str, device: torch.device | str) -> None:
    """One warning when ``autocast='bf16'`` would run emulated (see :func:`native_bf16`)."""
    if autocast == "bf16" and not native_bf16(device):
        warnings.warn(f"--autocast bf16 on this {torch.device(device).type.upper()} runs emulated (no native bf16): "
                      "expect it far slower than --autocast none (25x for SmolLM2 on an AVX2 CPU)", stacklevel=2)


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

    Distributed (:func:`gisp.run.distributed.active`): this rank runs its shard of
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
