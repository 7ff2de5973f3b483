"""The ``--reconstruct`` options shared by ``gisp eval``, ``gisp export`` and ``gisp compare`` (light: no torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class ReconOptions:
    """Training-free reconstruction of each level (see docs/reconstruction.md)."""

    reconstruct: str | None = None
    """Refit each level before evaluating/exporting it: bias (FLAP's compensation), lsq (least-squares refit of
    o/down, weights only) or lsq-bias (lsq with an output bias)."""
    recon_source: str | None = None
    """Calibration text of the reconstruction (its calibration part; default: the run's)."""
    recon_samples: int | None = None
    """Calibration windows of the reconstruction (default: the run's)."""
    recon_seq_len: int | None = None
    """Tokens per reconstruction window (default: the run's)."""
    recon_seed: int | None = None
    """Seed of the reconstruction windows (default: the run's)."""
    recon_damping: float | None = None
    """Ridge toward the plain masked weights, times the mean diagonal of X^T X (default 1.0)."""

    def options(self) -> dict[str, Any] | None:
        """What :class:`gisp.deploy.reconstruct.LevelReconstructor` takes (None without --reconstruct)."""
        if self.reconstruct is None:
            return None
        return {"source": self.recon_source, "samples": self.recon_samples, "seq_len": self.recon_seq_len,
                "seed": self.recon_seed, "damping": self.recon_damping}
