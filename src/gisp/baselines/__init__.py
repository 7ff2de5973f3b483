"""The field's structured-pruning methods in gisp's framework, behind one interface.

Every method takes the same model, calibration set and sparsity targets and
returns :class:`Level` records with the same masks/trajectories as GISP, so
``gisp compare`` evaluates them with one protocol. Each module's docstring
names the paper and public code it follows and where it deviates.

Nested methods (one run serves every sparsity, masks are nested):

- ``gisp``: iterative global first-order Taylor (this project);
- ``gisp-margin``: the same with the margin objective on multiple-choice calibration;
- ``oneshot``: GISP with one step;
- ``flap``: fluctuation metric, global adaptive widths, bias compensation
  (the compensation differs per level);
- ``shortgpt``: whole layers by lowest block influence;
- ``magnitude`` and ``random``: floors with GISP's structures and ranking.

One run per level:

- ``wanda-sp``: |W| x ||X|| on o/down columns, same ratio per layer;
- ``llm-pruner``: element-wise Taylor, same ratio per layer, layer range;
- ``owl``: outlier-weighted per-layer ratios on Wanda-sp;
- ``torch-pruning`` / ``torch-pruning-taylor``: the external library (physical
  slicing) with its LLM example's magnitude criterion / its Taylor criterion;
  optional (``pip install torch-pruning==1.6.1``).
"""

from __future__ import annotations

from typing import Any

from gisp.baselines.base import Level, Method, WeightSnapshot
from gisp.baselines.flap import FLAP
from gisp.baselines.gisp_iterative import GISP, GISPMargin
from gisp.baselines.llm_pruner import LLMPruner
from gisp.baselines.magnitude import Magnitude
from gisp.baselines.oneshot import OneShot
from gisp.baselines.owl import OWL
from gisp.baselines.random_mask import RandomFloor
from gisp.baselines.selection import uniform_mask
from gisp.baselines.shortgpt import ShortGPT
from gisp.baselines.tp_external import TorchPruning, TorchPruningTaylor
from gisp.baselines.wanda_sp import WandaSP
from gisp.deploy.compensation import Compensation, apply_compensation
from gisp.errors import GispError

METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (GISP, GISPMargin, OneShot, WandaSP, FLAP, LLMPruner, OWL, ShortGPT, Magnitude, RandomFloor,
                TorchPruning, TorchPruningTaylor)
}


def register_method(cls: type[Method]) -> type[Method]:
    """Make a method available to ``gisp compare`` under ``cls.name``."""
    METHODS[cls.name] = cls
    return cls


def get_method(name: str, **options: Any) -> Method:
    """An instance of the named method; a one-line error naming the choices otherwise."""
    if name not in METHODS:
        raise GispError(f"unknown method '{name}': use one of {', '.join(METHODS)}")
    return METHODS[name](**options)


__all__ = [
    "METHODS", "Compensation", "Level", "Method", "WeightSnapshot", "apply_compensation", "get_method",
    "register_method", "uniform_mask",
]
