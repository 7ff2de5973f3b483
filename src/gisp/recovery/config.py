"""The settings of one recovery run, and which of them a resumed run may change.

As with :class:`gisp.run.config.PruneConfig`, every field's attribute docstring
is its ``gisp recover`` help line (:func:`gisp.cli.common.with_config`), so a
setting is declared once. Defaults are LLM-Pruner's LoRA recipe (rank 8,
alpha 16, dropout 0.05) with a learning rate for short budgets; distillation
follows Minitron (forward KL on logits at temperature 1, no LM loss).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from gisp.errors import GispError

# Names only: this module must not import torch (the CLI builds its options from it and starts fast).
AUTOCAST = ("none", "bf16", "fp16")


@dataclass
class RecoverConfig:
    """Settings of one recovery run (see docs/recovery.md)."""

    tokens: int
    """Training budget in tokens (required): steps = ceil(tokens / (batch_size * seq_len))."""
    data: str = "c4"
    """Training text: the calibration part (first 80% of documents) of c4, wiki, FILE.txt/.jsonl; the
    evaluation part that gisp eval reads is never used. hf:DS[:CFG]:SPLIT[:FIELD] trains on the named split."""
    seq_len: int = 256
    """Tokens per training sequence (non-overlapping windows of the text, shuffled per pass)."""
    batch_size: int = 8
    """Sequences per optimiser step."""
    rank: int = 8
    """LoRA rank of the adapters on every attention and MLP projection."""
    alpha: float = 16.0
    """LoRA alpha: the adapter's update is scaled by alpha / rank."""
    dropout: float = 0.05
    """Dropout on the adapters' input during training."""
    lr: float = 2e-4
    """Peak learning rate of AdamW (linear warm-up, then cosine decay to zero)."""
    warmup: float = 0.05
    """Fraction of the steps spent warming the learning rate up from zero."""
    weight_decay: float = 0.0
    """AdamW weight decay on the adapter weights."""
    max_grad_norm: float = 1.0
    """Clip the adapters' gradient to this global norm; 0: no clipping."""
    teacher: str | None = None
    """Distil from this dense model (hub id, directory, .gguf, alias): loss = KL(teacher || student) on logits.
    It must share the export's tokenizer."""
    teacher_from_run: bool = False
    """Distil from the model the export was cut from (its record's source model)."""
    temperature: float = 1.0
    """Distillation temperature T: KL between softmax(logits / T) of teacher and student, times T^2."""
    lm_weight: float = 0.0
    """With a teacher: loss = (1 - w) * KD + w * LM (next-token cross-entropy); 0 is pure distillation."""
    kd_chunk: int = 128
    """Positions (of the batch x sequence) whose logits are computed at once (memory, not results): logits
    over the vocabulary exist for one chunk at a time, for teacher and student."""
    autocast: str = "none"
    """Mixed precision of the forward/backward (none, bf16, fp16); adapters and optimiser stay fp32."""
    checkpoint_every: int = 20
    """Save adapters, optimiser, RNG and data position every K steps (for --resume); 0: only at the end."""
    seed: int = 0
    """Seed of the adapters' initialisation, the data order and dropout."""

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise GispError(f"--tokens must be a positive number of training tokens, got {self.tokens}")
        if self.seq_len < 2:
            raise GispError(f"--seq-len must be at least 2 tokens, got {self.seq_len}")
        for name in ("batch_size", "rank", "kd_chunk"):
            if getattr(self, name) < 1:
                raise GispError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.alpha <= 0 or self.lr <= 0:
            raise GispError(f"--alpha and --lr must be positive, got {self.alpha} and {self.lr}")
        for name in ("dropout", "warmup"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise GispError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.lm_weight <= 1.0:
            raise GispError(f"--lm-weight must be in [0, 1], got {self.lm_weight}")
        if self.temperature <= 0:
            raise GispError(f"--temperature must be positive, got {self.temperature}")
        if self.weight_decay < 0 or self.max_grad_norm < 0 or self.checkpoint_every < 0:
            raise GispError("--weight-decay, --max-grad-norm and --checkpoint-every cannot be negative")
        if self.autocast not in AUTOCAST:
            raise GispError(f"unknown --autocast '{self.autocast}': use one of {', '.join(AUTOCAST)}")
        if self.teacher is not None and self.teacher_from_run:
            raise GispError("give --teacher MODEL or --teacher-from-run, not both")
        if not self.distill and self.lm_weight not in (0.0, 1.0):
            raise GispError("--lm-weight mixes distillation with the LM loss: give --teacher or --teacher-from-run")

    @property
    def distill(self) -> bool:
        """Whether a teacher's logits are the target (``lora-kd``) rather than the text alone (``lora``)."""
        return self.teacher is not None or self.teacher_from_run

    @property
    def method(self) -> str:
        return "lora-kd" if self.distill else "lora"

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def steps(self) -> int:
        """Optimiser steps of the token budget (the last one may pass it by less than one step)."""
        return -(-self.tokens // self.tokens_per_step)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RecoverConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


RESUME_FREE = frozenset({"checkpoint_every", "kd_chunk"})
"""Settings that change speed, memory or files but not the weights: they may differ on resume."""


def resume_conflicts(saved: dict[str, Any], config: RecoverConfig) -> list[str]:
    """The settings (sorted names) in which a saved run's config and ``config`` train different weights."""
    new = config.to_dict()
    return sorted(k for k in set(saved) | set(new) if k not in RESUME_FREE and saved.get(k) != new.get(k))
