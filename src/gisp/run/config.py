"""The settings of one GISP run, and which of them a resumed run may change.

Every field carries its documentation as an attribute docstring: the command
line builds its ``gisp prune`` options (name, type, default, help) from them
(:func:`gisp.cli.common.config_options`), so a new setting is declared once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from gisp.core.schedule import SCHEDULES
from gisp.errors import GispError

# Names only: this module must not import torch (the CLI builds its options from it and starts fast).
AUTOCAST = ("none", "bf16", "fp16")
GRAD_ACCUM = ("fp32", "native", "fp64")


@dataclass
class PruneConfig:
    """Settings of one GISP run. Defaults follow the paper (see docs/method.md)."""

    target: float = 0.5
    """Final sparsity in (0, 1), in schedule_unit (parameters by default)."""
    steps: int = 112
    """Pruning steps; the paper uses 112 for 7-8B models and finds 32 close. Kept: on SmolLM2 the budget curve
    (docs/exp_budget.md) still improves from 20 to 40 steps at 50%; at a fixed compute budget, though,
    calibration tokens buy more than steps."""
    schedule: str = "linear"
    """How targets rise: linear (paper), cosine or exp."""
    schedule_unit: str = "params"
    """params: targets are parameter sparsity; structures: fraction of structures (reference code)."""
    normalize: str = "params"
    """Block-wise normalisation: params (paper Eq. 9), reference (reference code), none."""
    objective: str = "lm"
    """Loss that defines importance: lm (next-token cross-entropy), margin or answer (task-aligned)."""
    calib: str = "c4"
    """Calibration source: c4, wiki, FILE.txt/.jsonl, hf:DS[:CFG]:SPLIT[:FIELD] (task objectives: their task)."""
    calib_samples: int = 2000
    """Calibration samples (windows for lm); the paper uses 2000. Kept: on SmolLM2 perplexity still falls
    from 16k to 32k calibration tokens (docs/exp_budget.md). Cost: every step is one forward+backward
    over all of them."""
    seq_len: int = 256
    """Tokens per calibration window; the paper uses 256."""
    batch_size: int = 8
    """Samples per forward/backward micro-batch (memory, not results)."""
    protect_first: float = 0.1
    """Fraction of leading layers never pruned."""
    protect_last: int = 1
    """Trailing layers never pruned."""
    autocast: str = "none"
    """Mixed precision for the forward/backward (none, bf16, fp16); weights keep their dtype. bf16 pays only
    where the hardware has it (CUDA, a CPU with AVX-512/AMX); elsewhere it is emulated, about 25x slower, and
    gisp warns."""
    seed: int = 0
    """Seed of the calibration sampling."""
    grad_checkpointing: bool = False
    """Recompute each decoder layer's activations during backward instead of keeping them: far less
    activation memory for about one extra forward pass; gradients and results are unchanged."""
    grad_accum_dtype: str = "fp32"
    """Precision the calibration-set gradient is summed in (fp32, native, fp64). Each micro-batch's gradient is
    computed in the weight dtype; fp32: summed into an fp32 gradient (bf16/fp16 weights: 4 bytes per prunable
    weight instead of 2; fp32 weights: as native); native: summed in the weight dtype (least memory, but a bf16
    sum of many micro-batches loses precision); fp64: summed in float64 (8 bytes), which makes the sum,
    hence the trajectory, independent of how micro-batches are split over processes."""
    shrink_every: int = 0
    """Every K steps, physically slice a working copy of the model (the export's slicing) so later steps'
    gradients run on a smaller network; 0: never. Same trajectory as the masked path up to ties of float
    rounding; costs a copy of the kept weights (see gisp.run.shrink)."""

    def __post_init__(self) -> None:
        from gisp.core.importance import NORMALIZATIONS  # here, not at the top: they import torch
        from gisp.core.objectives import get_objective
        from gisp.core.ranking import UNITS

        if not 0.0 < self.target < 1.0:
            raise GispError(f"target sparsity must be in (0, 1), got {self.target}")
        if self.steps < 1:
            raise GispError(f"--steps must be at least 1, got {self.steps}")
        for name, value, allowed in (
            ("schedule", self.schedule, SCHEDULES),
            ("schedule-unit", self.schedule_unit, UNITS),
            ("normalize", self.normalize, NORMALIZATIONS),
            ("autocast", self.autocast, AUTOCAST),
            ("grad-accum-dtype", self.grad_accum_dtype, GRAD_ACCUM),
        ):
            if value not in allowed:
                raise GispError(f"unknown --{name} '{value}': use one of {', '.join(allowed)}")
        if self.calib_samples < 1:
            raise GispError(f"--calib-samples must be at least 1, got {self.calib_samples}")
        if self.batch_size < 1:
            raise GispError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.shrink_every < 0:
            raise GispError(f"--shrink-every must be 0 (off) or a number of steps, got {self.shrink_every}")
        get_objective(self.objective)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PruneConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


RESUME_FREE = frozenset({"batch_size", "grad_checkpointing", "shrink_every"})
"""Settings that change memory or speed but not the trajectory: they may differ on resume."""
LEGACY = {"grad_checkpointing": False, "grad_accum_dtype": "native", "shrink_every": 0}
"""What a run saved before a setting existed did: old runs compare as if they had saved it."""


def check_seq_len(seq_len: int, model_config: Any, what: str = "--seq-len") -> None:
    """Refuse calibration windows longer than the model's context (``max_position_embeddings``) before any work:
    positions past it are untrained, and a huge ``--seq-len`` would only grind."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if isinstance(limit, int) and limit > 0 and seq_len > limit:
        raise GispError(f"{what} {seq_len} exceeds the model's context length of {limit} tokens: "
                        f"use --seq-len {limit} or less")


def resume_conflicts(saved: dict[str, Any], config: PruneConfig, weight_dtype: str | None) -> list[str]:
    """The settings (sorted names) in which a saved run's config and ``config`` give different trajectories."""

    def comparable(cfg: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in cfg.items() if k not in RESUME_FREE}
        if weight_dtype == "float32" and out.get("grad_accum_dtype") == "native":
            out["grad_accum_dtype"] = "fp32"  # the same thing for fp32 weights
        return out

    old, new = comparable({**LEGACY, **saved}), comparable(config.to_dict())
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
