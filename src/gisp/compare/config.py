"""Settings of ``gisp compare``: importable without torch, so the CLI starts fast."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from gisp.errors import GispError
from gisp.loading import DEFAULT_MODEL

DEFAULT_METHODS = ["gisp", "oneshot", "wanda-sp", "flap", "llm-pruner", "owl", "shortgpt", "magnitude", "random"]

# settings that change numbers; the rest (methods, sparsities, device, batch size) may differ on a later call
_FREE = {"methods", "sparsities", "device", "batch_size", "out", "reconstruct"}
RECONSTRUCT = ("bias", "lsq", "lsq-bias")  # gisp.deploy.reconstruct.RECONSTRUCTORS (kept light here)


@dataclass
class CompareConfig:
    """One comparison: model, methods, levels, and the budgets shared by all methods."""

    model: str = DEFAULT_MODEL
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    sparsities: list[float] = field(default_factory=lambda: [0.2, 0.3, 0.4, 0.5])
    out: str = "runs/compare"
    calib: str = "c4"
    """Calibration source shared by all methods (lm windows)."""
    calib_samples: int = 32
    seq_len: int = 128
    seed: int = 0
    steps: int = 20
    """GISP steps: must put every requested sparsity on the linear schedule."""
    ppl: str = "wiki"
    window: int = 128
    max_windows: int | None = 64
    tasks: list[str] = field(default_factory=list)
    limit: int | None = None
    autocast: str = "none"
    """Mixed precision of the gradient passes (gisp, oneshot, llm-pruner); evaluation runs in ``dtype``."""
    dtype: str = "fp32"
    device: str = "auto"
    batch_size: int = 8
    task_calib: str = "cmqa"
    """Calibration source of task-aligned methods (``gisp-margin``): multiple-choice questions with the
    same token budget (``calib_samples`` x ``seq_len``); every other method calibrates on ``calib`` windows."""
    reconstruct: list[str] = field(default_factory=list)
    """Training-free reconstructions (bias, lsq, lsq-bias) applied to every masked level: each gives the rows
    ``METHOD+RECON`` next to the plain ones, on the shared ``calib`` windows."""

    def __post_init__(self) -> None:
        if not self.methods:
            raise GispError("no methods given: pass e.g. --methods gisp,wanda-sp,flap")
        from gisp.baselines import METHODS
        from gisp.baselines.base import check_sparsities

        for m in self.methods:
            if m not in METHODS:
                raise GispError(f"unknown method '{m}': use any of {', '.join(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise GispError("--methods lists a method twice")
        self.sparsities = check_sparsities(self.sparsities)
        if self.window < 2:
            raise GispError(f"--window must be at least 2 tokens, got {self.window}")
        if self.max_windows is not None and self.max_windows < 1:
            raise GispError(f"--max-windows must be at least 1, got {self.max_windows}")
        if self.calib_samples < 1 or self.seq_len < 2:
            raise GispError("--calib-samples must be >= 1 and --seq-len >= 2")
        for r in self.reconstruct:
            if r not in RECONSTRUCT:
                raise GispError(f"unknown --reconstruct '{r}': use {', '.join(RECONSTRUCT)}")
        if len(set(self.reconstruct)) != len(self.reconstruct):
            raise GispError("--reconstruct lists a method twice")
        if self.limit is not None and self.limit < 1:
            raise GispError(f"--limit must be at least 1 item per task, got {self.limit}")

    def variants(self, method: str) -> list[str]:
        """The row names of one method: itself, then ``METHOD+RECON`` per reconstruction."""
        return [method] + [f"{method}+{r}" for r in self.reconstruct]

    def protocol(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in _FREE}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CompareConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
