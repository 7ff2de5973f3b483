"""Small helpers shared by the command modules."""

from __future__ import annotations

from gisp.errors import GispError


def parse_floats(text: str, what: str = "sparsity") -> list[float]:
    """``"0,0.2,0.5"`` -> ``[0.0, 0.2, 0.5]`` with a clear error for bad items."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            out.append(float(item))
        except ValueError as e:
            raise GispError(f"--{what} takes comma-separated numbers like 0,0.2,0.5; got '{item}'") from e
    if not out:
        raise GispError(f"--{what} is empty")
    return out
