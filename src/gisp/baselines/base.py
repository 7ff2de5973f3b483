"""The interface every pruning method implements, and the record of what it produced.

A method turns a model, a calibration set and a list of target sparsities into
one :class:`Level` per sparsity. Masking methods produce :class:`gisp.Mask`\\ s
wrapped in :class:`gisp.Trajectory` objects (one multi-step trajectory for a
nested method, one single-step trajectory per level otherwise), so export,
evaluation and plots are shared with GISP. A method that slices the network
physically (an external library) returns the sliced model instead.

Sparsity is always :meth:`gisp.Mask.sparsity`: the fraction of decoder-layer
linear parameters removed, protected layers counted in the denominator.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from gisp.architectures import get_architecture, layout_of
from gisp.core.calibration import CalibrationSet
from gisp.core.ranking import Pick
from gisp.core.structures import Layout, Mask
from gisp.errors import GispError
from gisp.provenance import versions
from gisp.run.trajectory import StepRecord, Trajectory


@dataclass
class Level:
    """One pruned model at one requested sparsity."""

    requested: float
    sparsity: float
    kept_params: int
    mask: Mask | None = None
    trajectory: Trajectory | None = None
    step: int | None = None
    compensation: Any = None  # gisp.deploy.compensation.Compensation for FLAP
    model: nn.Module | None = None  # a physically sliced copy (external libraries)
    details: dict[str, Any] = field(default_factory=dict)


OnLevel = Callable[[Level], None]


class Method(ABC):
    """A structured-pruning method behind one interface.

    ``defaults`` lists every option with its default (the method's paper or
    code); unknown options are refused so a typo never silently changes a
    result. ``settings()`` is what gets recorded next to every number.
    """

    name: ClassVar[str]
    nested: ClassVar[bool] = False
    """True when the masks at rising sparsity are nested and come from one run."""
    reference: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    objective: ClassVar[str] = "lm"
    """The calibration objective the method's data must be built for: ``lm`` windows, or a task-aligned
    objective (``margin``) whose calibration set ``gisp compare`` builds from ``--task-calib``."""

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise GispError(
                f"method '{self.name}' has no option {', '.join(unknown)}: it takes {', '.join(sorted(self.defaults))}"
            )
        self.opts: dict[str, Any] = {**self.defaults, **options}

    def settings(self) -> dict[str, Any]:
        return {"method": self.name, "nested": self.nested, "reference": self.reference, **self.opts}

    def layout(self, model: nn.Module) -> Layout:
        return layout_of(model, self.opts.get("protect_first", 0.0), self.opts.get("protect_last", 0))

    @abstractmethod
    def run(
        self,
        model: nn.Module,
        calib: CalibrationSet,
        sparsities: list[float],
        *,
        model_info: dict[str, Any] | None = None,
        run_dir: str | None = None,
        progress: bool = False,
        on_level: OnLevel | None = None,
    ) -> list[Level]:
        """Prune ``model`` (its weights may be changed: callers restore them) to every sparsity."""


# helpers shared by the methods -------------------------------------------------------------------


def check_sparsities(sparsities: list[float], layout: Layout | None = None) -> list[float]:
    """Sorted unique targets in (0, 1); reachable with the layout's protected layers."""
    if not sparsities:
        raise GispError("no sparsities given: pass e.g. --sparsities 0.2,0.3,0.4,0.5")
    out = sorted(set(float(s) for s in sparsities))
    for s in out:
        if not 0.0 < s < 1.0:
            raise GispError(f"sparsity must be in (0, 1), got {s}")
    if layout is not None:
        reach = sum(layout.layers[i].dense_params for i in layout.prunable) / layout.dense_params
        if out[-1] >= reach:
            raise GispError(
                f"sparsity {out[-1]} is out of reach: unprotected layers hold only {reach:.1%} of the parameters "
                "(protect fewer layers)"
            )
    return out


def input_batches(calib: CalibrationSet, batch_size: int) -> Iterator[torch.Tensor]:
    """Token windows of an ``lm`` calibration set, ``batch_size`` at a time."""
    if len(calib) == 0:
        raise GispError("the calibration set is empty: give more calibration text or samples")
    first = calib.samples[0]
    if not (isinstance(first, torch.Tensor) and first.dim() == 1):
        raise GispError("baselines calibrate on token windows: build the calibration set with objective 'lm'")
    for start in range(0, len(calib), batch_size):
        yield torch.stack(calib.samples[start : start + batch_size])


def model_info_of(model: nn.Module, info: dict[str, Any] | None, layout: Layout) -> dict[str, Any]:
    """The base-model record every trajectory carries (name, fingerprint, sizes)."""
    from gisp.core.fingerprint import fingerprint

    out = dict(info or {})
    out.setdefault("name", getattr(model.config, "_name_or_path", "model"))
    out.setdefault("fingerprint", fingerprint(model))
    out["model_type"] = model.config.model_type
    out["dense_params"] = layout.dense_params
    out["weight_dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    return out


def trajectory_of(
    method: Method,
    layout: Layout,
    masks: list[tuple[float, Mask]],
    *,
    model_info: dict[str, Any],
    calib: CalibrationSet | None,
    seconds: float = 0.0,
) -> Trajectory:
    """A trajectory whose step ``k`` is the ``k``-th (target, mask): nested masks required.

    The pruning order within a step follows (layer, kind, index); only the
    step that removed a structure carries meaning for these one-shot methods.
    """
    traj = Trajectory.start(layout, method.settings(), model_info, dict(calib.provenance) if calib else {},
                            versions())
    prev, order = Mask.dense(layout), 0
    for k, (target, mask) in enumerate(masks, start=1):
        if not mask.is_subset_of(prev):
            raise GispError(f"internal error: {method.name} masks are not nested at sparsity {target}")
        picks = [Pick(kind, i, int(j))
                 for i in range(layout.num_layers)
                 for kind, gone in (("head", prev.heads[i] & ~mask.heads[i]),
                                    ("channel", prev.channels[i] & ~mask.channels[i]))
                 for j in gone.nonzero().flatten().tolist()]
        record = StepRecord.of_mask(k, target, mask, layout, seconds=seconds if k == len(masks) else 0.0)
        order = traj.record_step(record, picks, order)
        prev = mask
    traj.completed = True
    return traj


def masked_levels(
    method: Method,
    layout: Layout,
    masks: list[tuple[float, Mask]],
    *,
    model_info: dict[str, Any],
    calib: CalibrationSet | None,
    seconds: float,
    compensations: dict[float, Any] | None = None,
    details: dict[float, dict[str, Any]] | None = None,
) -> list[Level]:
    """Wrap masks into levels: one shared trajectory if nested, else one per level."""
    comps, extra = compensations or {}, details or {}
    levels = []
    if method.nested:
        traj = trajectory_of(method, layout, masks, model_info=model_info, calib=calib, seconds=seconds)
        for k, (target, mask) in enumerate(masks, start=1):
            levels.append(Level(target, mask.sparsity(layout), mask.kept_params(layout), mask, traj, k,
                                comps.get(target), details=dict(extra.get(target, {}))))
    else:
        for target, mask in masks:
            traj = trajectory_of(method, layout, [(target, mask)], model_info=model_info, calib=calib,
                                 seconds=seconds / max(1, len(masks)))
            levels.append(Level(target, mask.sparsity(layout), mask.kept_params(layout), mask, traj, 1,
                                comps.get(target), details=dict(extra.get(target, {}))))
    return levels


@dataclass
class Masks:
    """What a masking method computes: one nested-or-not mask per target, with optional per-target
    compensation (FLAP) and details recorded next to the level."""

    masks: list[tuple[float, Mask]]
    compensations: dict[float, Any] = field(default_factory=dict)
    details: dict[float, dict[str, Any]] = field(default_factory=dict)


class MaskingMethod(Method):
    """A method that reads the model once and returns masks: subclasses implement :meth:`masks`; the
    validation, timing, trajectories and level callbacks are shared here."""

    @abstractmethod
    def masks(self, model: nn.Module, calib: CalibrationSet | None, layout: Layout,
              sparsities: list[float]) -> Masks:
        """Masks at every (validated, sorted) sparsity, computed on the unpruned ``model``."""

    def run(self, model: nn.Module, calib: CalibrationSet | None, sparsities: list[float], *,
            model_info: dict[str, Any] | None = None, run_dir: str | None = None, progress: bool = False,
            on_level: OnLevel | None = None) -> list[Level]:
        timer = Timer()
        layout = self.layout(model)
        sparsities = check_sparsities(sparsities, layout)
        info = model_info_of(model, model_info, layout)
        out = self.masks(model, calib, layout, sparsities)
        levels = masked_levels(self, layout, out.masks, model_info=info, calib=calib, seconds=timer.seconds,
                               compensations=out.compensations, details=out.details)
        for level in levels:
            if on_level:
                on_level(level)
        return levels


class Timer:
    """Wall-clock seconds since creation (pruning cost recorded with every level)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0


class WeightSnapshot:
    """A copy of the prunable projections' weights and biases, to undo masking between levels."""

    def __init__(self, model: nn.Module) -> None:

        arch = get_architecture(model)
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        for layer in arch.layers(model):
            att, mlp = arch.attention(layer), arch.mlp(layer)
            for lin in (att.q, att.k, att.v, att.o, mlp.gate, mlp.up, mlp.down):
                for p in (lin.weight, lin.bias):
                    if p is not None:
                        self.saved.append((p, p.detach().clone()))

    @torch.no_grad()
    def restore(self) -> None:
        for p, v in self.saved:
            p.copy_(v)
