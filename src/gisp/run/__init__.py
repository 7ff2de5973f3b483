"""The GISP run: settings, the pruning loop, its gradients and the trajectory it writes.

- :mod:`gisp.run.config`: :class:`PruneConfig`, the settings of one run;
- :mod:`gisp.run.loop`: :func:`prune`, the paper's algorithm step by step;
- :mod:`gisp.run.gradients`: the calibration-set gradient (precision, checkpointing, sharding);
- :mod:`gisp.run.trajectory`: :class:`Trajectory` and :class:`StepRecord`, the run file;
- :mod:`gisp.run.distributed`: data-parallel ranks (torchrun, accelerate launch);
- :mod:`gisp.run.memory`: peak-memory accounting of a step.
"""

from gisp.run.config import PruneConfig
from gisp.run.loop import prune
from gisp.run.trajectory import StepRecord, Trajectory

__all__ = ["PruneConfig", "StepRecord", "Trajectory", "prune"]
