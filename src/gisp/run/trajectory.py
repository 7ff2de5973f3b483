"""The trajectory: one pruning run, from which every sparsity level is read.

For every structure it stores the step that removed it (0 = never) and its
position in the global pruning order, plus each step's measured sparsity,
calibration loss and time, the configuration, versions and the base model's
fingerprint. Masks are nested by construction: the mask of step ``k`` keeps
exactly the structures removed after ``k``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gisp.errors import GispError
from gisp.loading import fingerprint
from gisp.provenance import atomic_write_json
from gisp.structures import Layout, Mask

FILENAME = "trajectory.json"
FORMAT = 1


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
    completed: bool = False

    @classmethod
    def start(cls, layout: Layout, config: dict, model: dict, calibration: dict, versions: dict) -> Trajectory:
        return cls(
            layout=layout, config=config, model=model, calibration=calibration, versions=versions,
            head_step=[[0] * s.num_heads for s in layout.layers],
            channel_step=[[0] * s.intermediate for s in layout.layers],
            head_order=[[-1] * s.num_heads for s in layout.layers],
            channel_order=[[-1] * s.intermediate for s in layout.layers],
        )

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
        layout = Layout.from_model(model)
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
        self.mask_at_step(rec["step"]).apply(model)
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
