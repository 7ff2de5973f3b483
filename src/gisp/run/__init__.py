"""The GISP run: settings, the pruning loop, its gradients and the trajectory it writes.

- :mod:`gisp.run.config`: :class:`PruneConfig`, the settings of one run;
- :mod:`gisp.run.loop`: :func:`prune`, the paper's algorithm step by step;
- :mod:`gisp.run.gradients`: the calibration-set gradient (precision, checkpointing, sharding);
- :mod:`gisp.run.trajectory`: :class:`Trajectory` and :class:`StepRecord`, the run file;
- :mod:`gisp.run.distributed`: data-parallel ranks (torchrun, accelerate launch);
- :mod:`gisp.run.memory`: peak-memory accounting of a step.
"""

from __future__ import annotations

import importlib
from typing import Any

# Loaded on first access: ``gisp.run.config`` must stay importable without torch.
_PUBLIC = {"PruneConfig": "gisp.run.config", "prune": "gisp.run.loop", "StepRecord": "gisp.run.trajectory",
           "Trajectory": "gisp.run.trajectory"}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'gisp.run' has no attribute '{name}'")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
