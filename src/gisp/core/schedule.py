"""Pruning schedules: the target after each of ``n`` steps, rising to ``target``.

- ``linear``: equal increments (the paper's schedule).
- ``cosine``: half a cosine, small steps at both ends.
- ``exp``: the same fraction of what is still kept removed at every step, so
  steps shrink as the model gets smaller.
"""

from __future__ import annotations

import math

from gisp.errors import GispError

SCHEDULES = ("linear", "cosine", "exp")


def targets(schedule: str, target: float, steps: int) -> list[float]:
    """Targets of steps 1..n; the last one is exactly ``target``."""
    if schedule not in SCHEDULES:
        raise GispError(f"unknown schedule '{schedule}': use one of {', '.join(SCHEDULES)}")
    if steps < 1:
        raise GispError(f"--steps must be at least 1, got {steps}")
    out = []
    for k in range(1, steps + 1):
        x = k / steps
        if schedule == "linear":
            t = target * x
        elif schedule == "cosine":
            t = target * (1 - math.cos(math.pi * x)) / 2
        else:
            t = 1 - (1 - target) ** x
        out.append(t)
    out[-1] = target
    return out
