"""gisp: Global Iterative Structured Pruning for Llama-family language models.

``import gisp`` is light (no torch, no transformers): the public names below are
imported on first access, and gisp's per-layer export classes are registered
with transformers' Auto classes as soon as transformers' auto module is loaded,
so ``AutoModelForCausalLM.from_pretrained(export_dir)`` works after ``import gisp``.
"""

from __future__ import annotations

import importlib
from typing import Any

from gisp.architectures import install_auto_registration
from gisp.version import __version__  # noqa: F401  (the package version)

# public name -> module that defines it
_PUBLIC = {
    "Architecture": "gisp.architectures.base",
    "get_architecture": "gisp.architectures",
    "CalibrationSet": "gisp.core.calibration",
    "build_calibration": "gisp.core.calibration",
    "Layout": "gisp.core.structures",
    "Mask": "gisp.core.structures",
    "fingerprint": "gisp.core.fingerprint",
    "GispError": "gisp.errors",
    "load_model": "gisp.loading",
    "load_pretrained": "gisp.loading",
    "PruneConfig": "gisp.run.config",
    "prune": "gisp.run.loop",
    "Trajectory": "gisp.run.trajectory",
    "export": "gisp.deploy.export",
    "ElasticModel": "gisp.deploy.elastic",
    "RecoverConfig": "gisp.recovery.config",
    "recover": "gisp.recovery.train",
    "evaluate": "gisp.evaluation.evaluate",
    "perplexity": "gisp.evaluation.perplexity",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'gisp' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


install_auto_registration()
