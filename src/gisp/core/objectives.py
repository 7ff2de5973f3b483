"""Objectives: the loss whose gradient defines importance.

An objective turns a list of calibration samples into a batch and returns one
loss per sample; the pruning loop averages them over the whole calibration set.
``lm`` (next-token cross-entropy) lives here; task objectives plug in through
:func:`register_objective`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from gisp.errors import GispError


class Objective(ABC):
    """A loss over calibration samples, one value per sample."""

    name: ClassVar[str]

    @abstractmethod
    def collate(self, samples: list[Any]) -> dict[str, torch.Tensor]:
        """Stack samples into model inputs."""

    @abstractmethod
    def sample_losses(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """A 1-D tensor with each sample's loss."""


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood of ``labels[:, 1:]``; ``-100`` labels give 0."""
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=-100, reduction="none")
    return nll.view(target.shape)


class LanguageModelling(Objective):
    """Next-token cross-entropy on windows of text (the paper's default)."""

    name = "lm"

    def collate(self, samples: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.stack(samples)}

    def sample_losses(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids = batch["input_ids"]
        logits = model(input_ids=ids, use_cache=False).logits
        return token_nll(logits, ids).mean(dim=1)


_OBJECTIVES: dict[str, type[Objective]] = {}


def register_objective(cls: type[Objective]) -> type[Objective]:
    _OBJECTIVES[cls.name] = cls
    return cls


register_objective(LanguageModelling)


# Packages that define more objectives (and their calibration builders) by registering them on import.
# They sit above this layer, so they are found by name when a lookup misses, as plugins are.
PROVIDERS = ("gisp.tasks",)


def load_providers() -> None:
    """Import the packages in :data:`PROVIDERS` so their objectives are registered."""
    import importlib

    for module in PROVIDERS:
        importlib.import_module(module)


def get_objective(name: str) -> Objective:
    if name not in _OBJECTIVES:
        load_providers()
    if name not in _OBJECTIVES:
        raise GispError(f"unknown objective '{name}': use one of {', '.join(sorted(_OBJECTIVES))}")
    return _OBJECTIVES[name]()
