"""Training-free reconstruction of one level: refit what a mask keeps so each block reproduces the dense one.

A run stays nested (its masks never change); reconstruction is computed per level when
a level is evaluated or exported, from a few calibration windows and no gradient step.
Every method starts from the dense base model and a mask and leaves the model masked,
with (possibly) new attention-output (o) and MLP-down weights, plus output biases that
the caller adds (:class:`~gisp.deploy.compensation.Compensation`: forward hooks in
evaluation, real o/down biases in an export):

- ``bias``: FLAP's bias compensation for any mask. Each removed input column ``j`` of an
  o/down projection is replaced by its mean input over the calibration tokens, so
  ``W[:, removed] @ mean[removed]`` becomes a bias; the means are the dense model's, as in
  FLAP (:meth:`Compensation.from_means`). Weights unchanged.
- ``lsq``: least-squares refit of the kept columns of every o/down projection, layer by
  layer, no bias (weights only: carries to every export format).
- ``lsq-bias``: the same with a free output bias (an appended ones column).

The least-squares problem of one projection, over calibration tokens ``t``::

    min_W  sum_t || W x_t - (y_t - b) ||^2 + lam * || W - W0 ||^2,    lam = damping * mean(diag(X^T X))

``x_t``: the kept input columns of the *pruned, already reconstructed* model (so a
layer's refit sees, and can absorb, what every earlier layer changed); ``y_t``: the
*dense* block's projection output on the same token (``target="local"``, the default: the dense
block fed the pruned model's inputs; ``"dense"``: the dense model's own activations), ``b``
the projection's existing bias, ``W0`` the plain masked weights. The dense target would also
absorb upstream drift, but measured on SmolLM2 it overfits the few calibration tokens more
than the local one (held-out ppl 85.5 vs 75.0 at 30%). The damping pulls toward the plain
masked weights, so ``damping -> inf`` is the masked model and a layer with nothing removed
and no upstream change is returned exactly.
``X^T X`` and ``X^T Y`` are accumulated in float64 with forward hooks, batch by batch
(never all activations); the solve is float64. Memory: the calibration set's hidden
states twice (dense and pruned stream) plus one layer's copy.
"""

from __future__ import annotations

import copy
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from gisp.architectures import apply_mask, get_architecture
from gisp.architectures.base import zero_structures
from gisp.core.calibration import CalibrationSet, build_calibration
from gisp.core.structures import Mask, block_rows
from gisp.deploy.compensation import Compensation
from gisp.errors import GispError

DEFAULT_DAMPING = 1.0  # measured on SmolLM2 (docs/reconstruction.md): 0.01 overfits 2048 calibration tokens
TARGETS = ("dense", "local")


@dataclass
class ReconSettings:
    """How a level is reconstructed (recorded next to every number it produces)."""

    method: str
    damping: float = DEFAULT_DAMPING
    """Ridge strength toward the plain masked weights, as a fraction of the mean diagonal of X^T X."""
    target: str = "local"
    """``local`` (measured better, docs/reconstruction.md): the dense block on the pruned model's inputs;
    ``dense``: the dense model's own projection outputs."""
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.method not in RECONSTRUCTORS:
            raise GispError(f"unknown --reconstruct '{self.method}': use {', '.join(RECONSTRUCTORS)}")
        if not self.damping >= 0:
            raise GispError(f"--recon-damping must be >= 0, got {self.damping}")
        if self.target not in TARGETS:
            raise GispError(f"unknown reconstruction target '{self.target}': use {', '.join(TARGETS)}")
        if self.batch_size < 1:
            raise GispError(f"batch size must be at least 1, got {self.batch_size}")


@dataclass
class Reconstruction:
    """What reconstructing one level did: output biases to add (or None) and its record."""

    biases: Compensation | None
    record: dict[str, Any] = field(default_factory=dict)


class Reconstructor(ABC):
    """One reconstruction method: dense model + mask -> masked, refit model (in place) and output biases."""

    name: ClassVar[str]
    changes_weights: ClassVar[bool]
    adds_bias: ClassVar[bool]

    @abstractmethod
    def __call__(self, model: nn.Module, mask: Mask, calib: CalibrationSet,
                 settings: ReconSettings) -> tuple[Compensation | None, dict[str, Any]]:
        """Reconstruct in place; return the biases to add and method-specific details."""


RECONSTRUCTORS: dict[str, type[Reconstructor]] = {}


def register(cls: type[Reconstructor]) -> type[Reconstructor]:
    RECONSTRUCTORS[cls.name] = cls
    return cls


def _batches(calib: CalibrationSet, batch_size: int) -> list[torch.Tensor]:
    if len(calib) == 0:
        raise GispError("the reconstruction calibration set is empty: give more --recon-samples")
    first = calib.samples[0]
    if not (isinstance(first, torch.Tensor) and first.dim() == 1):
        raise GispError("reconstruction calibrates on token windows (objective 'lm')")
    return [torch.stack(calib.samples[i:i + batch_size]) for i in range(0, len(calib), batch_size)]


def _out(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, tuple) else x


# bias compensation ------------------------------------------------------------------------------------


@register
class BiasCompensation(Reconstructor):
    """FLAP's closed form on any mask: removed columns at their dense calibration mean become a bias."""

    name = "bias"
    changes_weights = False
    adds_bias = True

    @torch.no_grad()
    def __call__(self, model, mask, calib, settings):
        arch = get_architecture(model)
        sums: dict[tuple[str, int], torch.Tensor] = {}
        counts: dict[tuple[str, int], int] = {}

        def hook(key: tuple[str, int]) -> Callable:
            def fn(_m, inp, _out):
                x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
                sums[key] = sums.get(key, 0) + x.sum(0)
                counts[key] = counts.get(key, 0) + x.shape[0]
            return fn

        handles = []
        for i, layer in enumerate(arch.layers(model)):
            if not bool(mask.heads[i].all()):
                handles.append(arch.attention(layer).o.register_forward_hook(hook(("o", i))))
            if not bool(mask.channels[i].all()):
                handles.append(arch.mlp(layer).down.register_forward_hook(hook(("down", i))))
        device = next(model.parameters()).device
        try:
            for ids in _batches(calib, settings.batch_size):
                model(input_ids=ids.to(device), use_cache=False)
        finally:
            for h in handles:
                h.remove()
        means = {k: (v / counts[k]).cpu() for k, v in sums.items()}
        comp = Compensation.from_means(model, mask.heads, mask.channels,
                                       {i: m for (w, i), m in means.items() if w == "o"},
                                       {i: m for (w, i), m in means.items() if w == "down"})
        apply_mask(model, mask)
        return comp, {"means_from": "dense model, calibration tokens"}


# least squares ------------------------------------------------------------------------------------------


class _Normal:
    """Float64 sums of the normal equations of one projection: A^T A, A^T Y, ||Y||^2 (A = kept inputs [, 1])."""

    def __init__(self) -> None:
        self.ata: torch.Tensor | None = None
        self.aty: torch.Tensor | None = None
        self.yy = 0.0
        self.n = 0

    def add(self, a: torch.Tensor, y: torch.Tensor) -> None:
        a, y = a.reshape(-1, a.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double()
        if self.ata is None:
            self.ata, self.aty = a.T @ a, a.T @ y
        else:
            self.ata += a.T @ a
            self.aty += a.T @ y
        self.yy += float((y * y).sum())
        self.n += a.shape[0]

    def error(self, theta: torch.Tensor) -> float:
        """sum_t ||A theta - Y||^2 from the sums alone (theta: columns x outputs)."""
        return float((theta * (self.ata @ theta)).sum() - 2 * (theta * self.aty).sum()) + self.yy


def _solve(eq: _Normal, theta0: torch.Tensor, n_weights: int, damping: float) -> torch.Tensor:
    """argmin ||A theta - Y||^2 + lam ||theta_w - theta0_w||^2 (bias row, if any, undamped)."""
    ata = eq.ata
    diag = torch.diagonal(ata)[:n_weights]
    lam = damping * float(diag.mean()) if n_weights else 0.0
    if n_weights and lam <= 0:
        lam = 1e-10 * max(float(diag.max()), 1.0)
    reg = torch.zeros(ata.shape[0], dtype=ata.dtype, device=ata.device)
    reg[:n_weights] = lam
    lhs = ata + torch.diag(reg)
    rhs = eq.aty + reg[:, None] * theta0
    try:
        return torch.linalg.solve(lhs, rhs)
    except RuntimeError:  # singular (e.g. a bias column over all-zero inputs): least norm
        return torch.linalg.lstsq(lhs.cpu(), rhs.cpu()).solution.to(lhs.device)


class _Stream:
    """The calibration set's hidden states at one layer, and the keyword arguments every layer receives."""

    def __init__(self, model: nn.Module, batches: list[torch.Tensor]) -> None:
        layers = get_architecture(model).layers(model)
        self.hidden: list[torch.Tensor] = []
        self.kwargs: list[list[dict[str, Any]]] = [[] for _ in layers]

        def recorder(i: int) -> Callable:
            def hook(_m, args, kwargs):
                if i == 0:
                    self.hidden.append((args[0] if args else kwargs["hidden_states"]).detach())
                self.kwargs[i].append({k: v for k, v in kwargs.items() if k != "hidden_states"})
            return hook

        handles = [layer.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, layer in enumerate(layers)]
        device = next(model.parameters()).device
        try:
            with torch.no_grad():
                for ids in batches:
                    model(input_ids=ids.to(device), use_cache=False)
        finally:
            for h in handles:
                h.remove()


def _kept_columns(mask: Mask, i: int, head_dim: int, block: str) -> torch.Tensor:
    if block == "attention":
        return block_rows(mask.heads[i].nonzero().flatten(), head_dim)
    return mask.channels[i].nonzero().flatten()


@register
class LeastSquares(Reconstructor):
    """Sequential least-squares refit of the kept o/down columns (no bias): see the module docstring."""

    name = "lsq"
    changes_weights = True
    adds_bias = False

    @torch.no_grad()
    def __call__(self, model, mask, calib, settings):
        arch = get_architecture(model)
        layout = arch.layout(model)
        layers = arch.layers(model)
        stream = _Stream(model, _batches(calib, settings.batch_size))
        h_dense = stream.hidden
        h_pruned = list(h_dense)
        comp = Compensation()
        hooks: list = []
        blocks: list[dict[str, Any]] = []
        changed = False  # the pruned stream differs from the dense one from here on
        try:
            for i, layer in enumerate(layers):
                removed = not (bool(mask.heads[i].all()) and bool(mask.channels[i].all()))
                kw = stream.kwargs[i]
                if not changed and not removed:
                    h_dense = h_pruned = [_out(layer(h, **k)) for h, k in zip(h_dense, kw)]
                    continue
                changed = True
                dense = copy.deepcopy(layer)
                s = layout.layers[i]
                zero_structures(arch.attention(layer), arch.mlp(layer), s.head_dim,
                                (~mask.heads[i]).nonzero().flatten(), (~mask.kv_heads(layout, i)).nonzero().flatten(),
                                (~mask.channels[i]).nonzero().flatten())
                for block, module in (("attention", "o"), ("mlp", "down")):
                    get = arch.attention if block == "attention" else arch.mlp
                    proj, dense_proj = getattr(get(layer), module), getattr(get(dense), module)
                    cols = _kept_columns(mask, i, s.head_dim, block)
                    if not cols.numel() and not self.adds_bias:
                        continue  # a removed block: nothing left to refit
                    source = h_dense if settings.target == "dense" else h_pruned
                    info, bias = self._fit(layer, dense, proj, dense_proj, cols, source, h_pruned, kw, settings)
                    info.update(layer=i, block=block, kept_columns=int(cols.numel()), columns=proj.in_features)
                    blocks.append(info)
                    if bias is not None:
                        (comp.attn if module == "o" else comp.mlp)[i] = bias.float().cpu()
                        hooks.append(proj.register_forward_hook(_adder(bias)))
                h_dense = [_out(dense(h, **k)) for h, k in zip(h_dense, kw)]
                h_pruned = [_out(layer(h, **k)) for h, k in zip(h_pruned, kw)]
                del dense
        finally:
            for h in hooks:
                h.remove()
        apply_mask(model, mask)  # layers before the first change were never masked (nothing to remove there)
        before = sum(b["error_masked"] for b in blocks)
        after = sum(b["error_refit"] for b in blocks)
        details = {"blocks_refit": len(blocks), "tokens": sum(int(h.shape[0] * h.shape[1]) for h in stream.hidden),
                   "relative_error_masked": before / max(sum(b["target_energy"] for b in blocks), 1e-30),
                   "relative_error_refit": after / max(sum(b["target_energy"] for b in blocks), 1e-30),
                   "blocks": blocks}
        return (comp if (comp.attn or comp.mlp) else None), details

    def _fit(self, layer: nn.Module, dense: nn.Module, proj: nn.Linear, dense_proj: nn.Linear, cols: torch.Tensor,
             source: list[torch.Tensor], h_pruned: list[torch.Tensor], kw: list[dict[str, Any]],
             settings: ReconSettings) -> tuple[dict[str, Any], torch.Tensor | None]:
        """Accumulate the normal equations batch by batch, solve, write the kept columns of ``proj``."""
        eq = _Normal()
        captured: dict[str, torch.Tensor] = {}
        with_bias = self.adds_bias
        dev_cols = cols.to(proj.weight.device)
        b0 = proj.bias.detach().double() if proj.bias is not None else None

        def take_y(_m, _inp, out):
            captured["y"] = out.detach()

        def take_x(_m, inp, _out):
            x = inp[0].detach().index_select(-1, dev_cols).double()
            if with_bias:
                x = torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype, device=x.device)], -1)
            y = captured.pop("y").double().to(x.device)
            eq.add(x, y - b0.to(x.device) if b0 is not None else y)

        hy, hx = dense_proj.register_forward_hook(take_y), proj.register_forward_hook(take_x)
        try:
            for hd, hp, k in zip(source, h_pruned, kw):
                dense(hd, **k)
                layer(hp, **k)
        finally:
            hy.remove()
            hx.remove()
        w0 = proj.weight.detach().index_select(1, dev_cols).double().T  # kept columns x outputs
        theta0 = torch.cat([w0, torch.zeros(1, w0.shape[1], dtype=w0.dtype, device=w0.device)]) if with_bias else w0
        theta0 = theta0.to(eq.ata.device)
        theta = _solve(eq, theta0, int(cols.numel()), settings.damping)
        info = {"error_masked": eq.error(theta0), "error_refit": eq.error(theta), "target_energy": eq.yy,
                "tokens": eq.n}
        n = int(cols.numel())
        if n:
            proj.weight[:, dev_cols] = theta[:n].T.to(proj.weight.dtype).to(proj.weight.device)
        return info, (theta[n].to(proj.weight.dtype) if with_bias else None)


@register
class LeastSquaresBias(LeastSquares):
    """:class:`LeastSquares` with a free output bias per projection (written as o/down biases)."""

    name = "lsq-bias"
    adds_bias = True


def _adder(bias: torch.Tensor) -> Callable:
    def hook(_m, _inp, out):
        return out + bias.to(device=out.device, dtype=out.dtype)
    return hook


# entry points ----------------------------------------------------------------------------------------


def reconstruct(model: nn.Module, mask: Mask, calib: CalibrationSet, settings: ReconSettings | str,
                calibration: dict[str, Any] | None = None) -> Reconstruction:
    """Mask the dense ``model`` in place and reconstruct it; returns the biases to add and the record.

    ``model`` must hold the dense weights (the structures ``mask`` removes are still there):
    every method reads the dense model's activations. ``calibration``: how ``calib`` was
    built (recorded; default ``calib.provenance``).
    """
    if isinstance(settings, str):
        settings = ReconSettings(settings)
    method = RECONSTRUCTORS[settings.method]()
    t0 = time.perf_counter()
    biases, details = method(model, mask, calib, settings)
    seconds = time.perf_counter() - t0
    record = {
        "method": settings.method, **{k: v for k, v in asdict(settings).items() if k != "method"},
        "changes_weights": method.changes_weights, "adds_bias": biases is not None,
        "calibration": dict(calibration if calibration is not None else calib.provenance),
        "seconds": seconds, "details": details,
        "what": {"bias": "FLAP bias compensation from the dense model's mean inputs of the removed columns",
                 "lsq": "sequential least-squares refit of the kept o/down columns to the dense blocks' outputs",
                 "lsq-bias": "sequential least-squares refit of the kept o/down columns and an output bias to "
                             "the dense blocks' outputs"}[settings.method],
    }
    return Reconstruction(biases, record)


def calibration_settings(traj_config: dict[str, Any], traj_calibration: dict[str, Any], *,
                         source: str | None = None, samples: int | None = None, seq_len: int | None = None,
                         seed: int | None = None) -> dict[str, Any]:
    """The calibration windows a level is reconstructed on: the run's own (its source, samples, window
    length and seed, from ``trajectory.json``) unless overridden. A run calibrated on a task objective
    (no text windows) falls back to ``c4`` windows of its token budget."""
    cal = traj_calibration or {}
    lm = (traj_config or {}).get("objective", "lm") == "lm" and "seq_len" in cal
    run = {"source": cal.get("name") if lm else "c4",
           "samples": cal.get("samples") or (traj_config or {}).get("calib_samples") or 32,
           "seq_len": cal.get("seq_len") or (traj_config or {}).get("seq_len") or 128,
           "seed": cal.get("seed", (traj_config or {}).get("seed", 0))}
    given = {"source": source, "samples": samples, "seq_len": seq_len, "seed": seed}
    out = {k: (given[k] if given[k] is not None else run[k]) for k in run}
    if int(out["samples"]) < 1 or int(out["seq_len"]) < 2:
        raise GispError("--recon-samples must be >= 1 and --recon-seq-len >= 2")
    out["from"] = {k: ("option" if given[k] is not None else "run") for k in run}
    return out


def reconstruction_calibration(tokenizer: Any, settings: dict[str, Any]) -> CalibrationSet:
    """Seeded windows from the calibration part of the source (disjoint from every evaluation part)."""
    if tokenizer is None:
        raise GispError("reconstruction needs the base model's tokenizer to build its calibration windows")
    return build_calibration("lm", settings["source"], tokenizer, int(settings["samples"]), int(settings["seq_len"]),
                             int(settings["seed"]))


class LevelReconstructor:
    """Reconstruction of a run's levels with one calibration set: built once, applied per level.

    ``options``: ``source``, ``samples``, ``seq_len``, ``seed`` of the calibration windows
    (default: the run's, see :func:`calibration_settings`), ``damping``, ``target``,
    ``batch_size`` (``None`` values are ignored).
    """

    def __init__(self, traj_config: dict[str, Any], traj_calibration: dict[str, Any], tokenizer: Any, method: str,
                 options: dict[str, Any] | None = None) -> None:
        opts = {k: v for k, v in (options or {}).items() if v is not None}
        unknown = set(opts) - {"source", "samples", "seq_len", "seed", "damping", "target", "batch_size"}
        if unknown:
            raise GispError(f"unknown reconstruction option(s) {', '.join(sorted(unknown))}")
        self.settings = ReconSettings(method, **{k: opts.pop(k) for k in ("damping", "target", "batch_size")
                                                 if k in opts})
        cal = calibration_settings(traj_config, traj_calibration, **opts)
        self.calib = reconstruction_calibration(tokenizer, cal)
        self.provenance = {**self.calib.provenance, "from": cal["from"]}

    def describe(self) -> dict[str, Any]:
        """The settings and calibration (what an evaluation protocol records)."""
        return {"method": self.settings.method, "damping": self.settings.damping, "target": self.settings.target,
                "calibration": {k: self.provenance.get(k) for k in ("name", "part", "samples", "seq_len", "seed")}}

    def __call__(self, model: nn.Module, mask: Mask) -> Reconstruction:
        """Mask the dense ``model`` in place and reconstruct it (see :func:`reconstruct`)."""
        return reconstruct(model, mask, self.calib, self.settings, self.provenance)
