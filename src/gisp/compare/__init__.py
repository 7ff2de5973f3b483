"""``gisp compare``: every method on the same model, calibration set and evaluation protocol.

:mod:`gisp.compare.config` holds the settings (light to import), :mod:`gisp.compare.runner` the run.
"""

from __future__ import annotations

from typing import Any

from gisp.compare.config import DEFAULT_METHODS, CompareConfig

__all__ = ["DEFAULT_METHODS", "CompareConfig", "compare", "markdown_table"]


def __getattr__(name: str) -> Any:
    if name in ("compare", "markdown_table"):
        from gisp.compare import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'gisp.compare' has no attribute '{name}'")
