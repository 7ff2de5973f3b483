"""GISP itself behind the baseline interface: one iterative global run serves every sparsity.

Follows the paper (see docs/method.md) through :func:`gisp.prune` unchanged. The schedule
must put every requested sparsity on a step (e.g. 20 linear steps to 0.5 hit
0.2, 0.3, 0.4 and 0.5); otherwise a level would be read at a lower sparsity
than its neighbours in the comparison, so such a request is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from gisp.baselines.base import Level, Method, OnLevel, check_sparsities
from gisp.core.calibration import CalibrationSet
from gisp.core.schedule import targets
from gisp.errors import GispError
from gisp.run import PruneConfig, prune


class GISP(Method):
    name = "gisp"
    nested = True
    reference = "arXiv 2510.18030 (GISP), github uncc-efficient-ai/GISP; implemented by gisp.prune"
    defaults = {"steps": 20, "schedule": "linear", "schedule_unit": "params", "normalize": "params",
                "objective": "lm", "protect_first": 0.1, "protect_last": 1, "autocast": "none", "batch_size": 8}

    def config(self, calib: CalibrationSet, target: float) -> PruneConfig:
        prov = calib.provenance
        first = calib.samples[0] if len(calib) else None
        seq_len = prov.get("seq_len") or (int(first.numel()) if hasattr(first, "numel") else 1)
        o = self.opts
        source = str(prov.get("name", prov.get("source", "custom")))
        return PruneConfig(
            target=target, steps=o["steps"], schedule=o["schedule"], schedule_unit=o["schedule_unit"],
            normalize=o["normalize"], objective=o["objective"], calib=source,
            calib_samples=max(1, len(calib)), seq_len=max(2, int(seq_len)), batch_size=o["batch_size"],
            protect_first=o["protect_first"], protect_last=o["protect_last"], autocast=o["autocast"],
            seed=int(prov.get("seed", 0)),
        )

    def check_schedule(self, sparsities: list[float]) -> None:
        """Every requested sparsity must be one of the schedule's step targets."""
        o = self.opts
        if o["schedule_unit"] != "params":
            return
        grid = targets(o["schedule"], max(sparsities), o["steps"])
        missing = [s for s in sparsities if min(abs(t - s) for t in grid) > 1e-9]
        if missing:
            raise GispError(
                f"{o['steps']} {o['schedule']} GISP steps to {max(sparsities)} do not stop at sparsity "
                f"{', '.join(f'{s:g}' for s in missing)}: choose --steps so every level is a step "
                "(e.g. 10 or 20 for 0.2,0.3,0.4,0.5)"
            )

    def run(self, model: nn.Module, calib: CalibrationSet, sparsities: list[float], *,
            model_info: dict[str, Any] | None = None, run_dir: str | Path | None = None, progress: bool = False,
            on_level: OnLevel | None = None) -> list[Level]:
        sparsities = check_sparsities(sparsities, self.layout(model))
        self.check_schedule(sparsities)
        traj = prune(model, self.config(calib, max(sparsities)), calib, run_dir=run_dir, resume=run_dir is not None,
                     model_info=model_info, progress=progress)
        levels = []
        for s in sparsities:
            rec = traj.step_at(s)
            level = Level(s, rec["sparsity"], rec["kept_params"], traj.mask_at_step(rec["step"]), traj, rec["step"])
            levels.append(level)
            if on_level:
                on_level(level)
        return levels


class GISPMargin(GISP):
    """GISP with the task-aligned ``margin`` objective (the paper, see docs/method.md): calibrated on multiple-choice
    questions (``cmqa`` by default in ``gisp compare``), read next to the lm-objective row."""

    name = "gisp-margin"
    objective = "margin"
    defaults = {**GISP.defaults, "objective": "margin"}
