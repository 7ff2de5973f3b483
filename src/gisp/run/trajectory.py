"""The trajectory: one pruning run, from which every sparsity level is read.

For every structure it stores the step that removed it (0 = never) and its
position in the global pruning order, plus each step's :class:`StepRecord`
(measured sparsity, calibration loss and time), the configuration, versions and
the base model's fingerprint. Masks are nested by construction: the mask of
step ``k`` keeps exactly the structures removed after ``k``.

Only :meth:`Trajectory.start`, :meth:`Trajectory.record_step`,
:meth:`Trajectory.set_loss` and :meth:`Trajectory.set_timing` write a
trajectory; ``steps`` holds each record as the plain dict saved in the file
(:meth:`StepRecord.to_dict`), which is what every reader indexes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gisp.architectures import apply_mask, layout_of
from gisp.core.fingerprint import fingerprint
from gisp.core.ranking import Pick
from gisp.core.structures import Layout, Mask
from gisp.errors import GispError
from gisp.provenance import atomic_write_json

FILENAME = "trajectory.json"
FORMAT = 1


@dataclass
class StepRecord:
    """What one step of a run measured; step 0 is the dense model.

    Saved as a dict with the keys in this order (:meth:`to_dict`); the optional
    fields are left out when unset, as runs and methods that do not measure them
    always did.
    """

    step: int
    target: float
    """The schedule's target sparsity of this step."""
    sparsity: float
    """Measured sparsity of the step's mask (:meth:`gisp.Mask.sparsity`)."""
    kept_params: int
    calib_loss: float | None = None
    """Calibration loss of the step's mask: filled in by the next step's gradient pass (:meth:`Trajectory.set_loss`)."""
    heads_removed: int = 0
    channels_removed: int = 0
    seconds: float = 0.0
    """Wall-clock seconds of the step, without the trajectory write."""
    gradient_seconds: float | None = None
    """Forward+backward over the calibration set (all-reduce included)."""
    timing: dict[str, float] | None = None
    """The rest of ``seconds`` by phase, plus ``processes`` and ``save`` (the previous write of the file)."""
    work_params: int | None = None
    """Parameters of the network the gradients ran on (``shrink_every`` runs only)."""

    @classmethod
    def of_mask(cls, step: int, target: float, mask: Mask, layout: Layout, **measured: Any) -> StepRecord:
        """The record of ``mask``: sparsity, kept parameters and removed structures counted from it."""
        return cls(step=step, target=target, sparsity=mask.sparsity(layout), kept_params=mask.kept_params(layout),
                   heads_removed=sum(int((~h).sum()) for h in mask.heads),
                   channels_removed=sum(int((~c).sum()) for c in mask.channels), **measured)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "step": self.step, "target": self.target, "sparsity": self.sparsity, "kept_params": self.kept_params,
            "calib_loss": self.calib_loss, "heads_removed": self.heads_removed,
            "channels_removed": self.channels_removed,
        }
        if self.work_params is not None:
            d["work_params"] = self.work_params
        d["seconds"] = self.seconds
        if self.gradient_seconds is not None:
            d["gradient_seconds"] = self.gradient_seconds
        if self.timing is not None:
            d["timing"] = dict(self.timing)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StepRecord:
        """A saved record; keys this version does not know are ignored, missing optional ones left unset."""
        return cls(
            step=d["step"], target=d["target"], sparsity=d["sparsity"], kept_params=d["kept_params"],
            calib_loss=d.get("calib_loss"), heads_removed=d.get("heads_removed", 0),
            channels_removed=d.get("channels_removed", 0), seconds=d.get("seconds", 0.0),
            gradient_seconds=d.get("gradient_seconds"),
            timing=dict(d["timing"]) if d.get("timing") is not None else None, work_params=d.get("work_params"),
        )


@dataclass
class Trajectory:
    layout: Layout
    config: dict[str, Any]
    model: dict[str, Any]
    calibration: dict[str, Any]
    versions: dict[str, str]
    head_step: list[list[int]]
    channel_step: list[list[int]]
    head_order: list[list[int]]
    channel_order: list[list[int]]
    steps: list[dict[str, Any]] = field(default_factory=list)
    """One :meth:`StepRecord.to_dict` per step, step ``k`` at index ``k`` (read-only outside this class)."""
    completed: bool = False

    @classmethod
    def start(cls, layout: Layout, config: dict, model: dict, calibration: dict, versions: dict) -> Trajectory:
        """A new run: nothing removed yet, and the dense model recorded as step 0."""
        traj = cls(
            layout=layout, config=config, model=model, calibration=calibration, versions=versions,
            head_step=[[0] * s.num_heads for s in layout.layers],
            channel_step=[[0] * s.intermediate for s in layout.layers],
            head_order=[[-1] * s.num_heads for s in layout.layers],
            channel_order=[[-1] * s.intermediate for s in layout.layers],
        )
        traj.steps.append(StepRecord(0, 0.0, 0.0, layout.dense_params).to_dict())
        return traj

    # recording ----------------------------------------------------------------
    def record_step(self, record: StepRecord, picks: Sequence[Pick], first_order: int) -> int:
        """Append the next step: ``picks`` (in removal order) were removed by ``record.step`` and take
        positions ``first_order, first_order + 1, ...`` of the global pruning order. Returns the position
        the next removed structure takes."""
        if record.step != self.last_step + 1 or not self.steps:
            raise GispError(f"internal error: step {record.step} recorded after step {self.last_step}")
        order = first_order
        for p in picks:
            steps, orders = (self.head_step, self.head_order) if p.kind == "head" else \
                (self.channel_step, self.channel_order)
            if steps[p.layer][p.index] != 0:
                raise GispError(f"internal error: {p.kind} {p.layer}.{p.index} removed twice")
            steps[p.layer][p.index] = record.step
            orders[p.layer][p.index] = order
            order += 1
        self.steps.append(record.to_dict())
        return order

    def set_loss(self, step: int, loss: float) -> None:
        """The calibration loss of ``step``'s mask, measured after the step was recorded."""
        self._record(step)["calib_loss"] = loss

    def set_timing(self, step: int, part: str, seconds: float) -> None:
        """One timing part of ``step`` measured after it was recorded (the trajectory write: ``save``)."""
        rec = self._record(step)
        if rec.get("timing") is None:
            raise GispError(f"internal error: step {step} has no timing")
        rec["timing"][part] = seconds

    def next_order(self) -> int:
        """The position in the global pruning order that the next removed structure takes."""
        return 1 + max((max(o) for o in self.head_order + self.channel_order if o), default=-1)

    def record(self, step: int) -> StepRecord:
        """Step ``step``'s record, typed."""
        return StepRecord.from_dict(self._record(step))

    def _record(self, step: int) -> dict[str, Any]:
        if not 0 <= step < len(self.steps) or self.steps[step]["step"] != step:
            raise GispError(f"step {step} is outside this run's steps 0..{self.last_step}")
        return self.steps[step]

    # masks ------------------------------------------------------------------
    @property
    def last_step(self) -> int:
        return self.steps[-1]["step"] if self.steps else 0

    def mask_at_step(self, step: int) -> Mask:
        """Structures kept after ``step`` (step 0 = dense)."""
        if not 0 <= step <= self.last_step:
            raise GispError(f"step {step} is outside this run's steps 0..{self.last_step}")

        def kept(arr: list[int]) -> torch.Tensor:
            t = torch.tensor(arr, dtype=torch.long)
            return (t == 0) | (t > step)

        return Mask([kept(h) for h in self.head_step], [kept(c) for c in self.channel_step])

    def step_at(self, sparsity: float) -> dict[str, Any]:
        """The last step whose measured sparsity is at or below ``sparsity``."""
        if not 0.0 <= sparsity < 1.0:
            raise GispError(f"sparsity must be in [0, 1), got {sparsity}")
        best = self.steps[0]
        for rec in self.steps:
            if rec["sparsity"] <= sparsity + 1e-9:
                best = rec
        return best

    def mask_at(self, sparsity: float) -> Mask:
        """The nested mask of the last step at or below ``sparsity``."""
        return self.mask_at_step(self.step_at(sparsity)["step"])

    def check_model(self, model: nn.Module) -> None:
        """Refuse a model that is not this run's base model."""
        layout = layout_of(model)
        if layout.layers != self.layout.layers:
            raise GispError(
                f"this trajectory was made for '{self.model.get('name')}' and does not fit this model's "
                "layer shapes: load the run's base model"
            )
        fp = fingerprint(model)
        if fp != self.model.get("fingerprint"):
            raise GispError(
                f"model fingerprint {fp} differs from the run's base model {self.model.get('fingerprint')} "
                f"('{self.model.get('name')}'): apply the trajectory to a freshly loaded base model"
            )

    def apply(self, model: nn.Module, sparsity: float | None = None, *, step: int | None = None) -> dict[str, Any]:
        """Mask a freshly loaded base model in place; returns the chosen step's record."""
        self.check_model(model)
        rec = self.steps[step] if step is not None else self.step_at(sparsity if sparsity is not None else 0.0)
        apply_mask(model, self.mask_at_step(rec["step"]))
        return rec

    # persistence --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "completed": self.completed,
            "model": self.model,
            "config": self.config,
            "calibration": self.calibration,
            "versions": self.versions,
            "sparsity_definition": "fraction of decoder-layer linear parameters (q,k,v,o,gate,up,down, "
            "biases included) removed; embeddings, norms and lm_head excluded; protected layers count",
            "layout": self.layout.to_dict(),
            "steps": self.steps,
            "head_step": self.head_step,
            "channel_step": self.channel_step,
            "head_order": self.head_order,
            "channel_order": self.channel_order,
        }

    def save(self, run_dir: str | Path) -> Path:
        path = Path(run_dir) / FILENAME
        atomic_write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, run: str | Path) -> Trajectory:
        path = Path(run)
        if path.is_dir():
            path = path / FILENAME
        if not path.is_file():
            raise GispError(f"no pruning run at {run} (expected {FILENAME}): run 'gisp prune' first")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise GispError(f"{path} is not a valid trajectory file ({e.msg})") from e
        if d.get("format") != FORMAT:
            raise GispError(f"{path} has trajectory format {d.get('format')}, this gisp reads {FORMAT}")
        return cls(
            layout=Layout.from_dict(d["layout"]), config=d["config"], model=d["model"],
            calibration=d["calibration"], versions=d["versions"], head_step=d["head_step"],
            channel_step=d["channel_step"], head_order=d["head_order"], channel_order=d["channel_order"],
            steps=d["steps"], completed=d["completed"],
        )
