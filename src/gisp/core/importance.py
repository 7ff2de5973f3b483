"""Importance criteria: one score per structure, behind one interface.

Criteria read the model through its architecture (anything with ``layers``,
``attention`` and ``mlp``, see :class:`gisp.architectures.Architecture`) and,
for first-order ones, the gradients already accumulated on it; they return
:class:`StructureScores` and never modify weights. Block-wise normalisation makes heads and channels comparable so they
can be ranked in one global list.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from gisp.core.structures import Layout
from gisp.errors import GispError

NORMALIZATIONS = ("params", "reference", "none")


@dataclass
class StructureScores:
    """Per-layer float64 scores of heads ``[num_heads]`` and channels ``[intermediate]``."""

    heads: list[torch.Tensor]
    channels: list[torch.Tensor]


class Importance(ABC):
    """Scores every head and channel of a model."""

    name: ClassVar[str]
    needs_gradients: ClassVar[bool] = False

    @abstractmethod
    def scores(self, model: nn.Module, layout: Layout, arch: Any) -> StructureScores:
        ...


def _elementwise(p: nn.Parameter, use_grad: bool) -> torch.Tensor:
    w = p.detach().float()
    if not use_grad:
        return w.abs()
    if p.grad is None:
        return torch.zeros_like(w)
    return (w * p.grad.detach().float()).abs()


def head_sums(att, num_heads: int, head_dim: int, mha: bool, use_grad: bool) -> torch.Tensor:
    """Per-head sum over its q rows and o columns (and k/v rows for MHA) of ``|w|`` or ``|w * grad|``."""
    hs = _elementwise(att.q.weight, use_grad).view(num_heads, head_dim, -1).sum(dim=(1, 2))
    hs += _elementwise(att.o.weight, use_grad).view(-1, num_heads, head_dim).sum(dim=(0, 2))
    if mha:  # k/v rows belong to the head too
        hs += _elementwise(att.k.weight, use_grad).view(num_heads, head_dim, -1).sum(dim=(1, 2))
        hs += _elementwise(att.v.weight, use_grad).view(num_heads, head_dim, -1).sum(dim=(1, 2))
    return hs.double().cpu()


def channel_sums(mlp, use_grad: bool) -> torch.Tensor:
    """Per-channel sum over its gate/up rows and down column of ``|w|`` or ``|w * grad|``."""
    cs = _elementwise(mlp.gate.weight, use_grad).sum(dim=1)
    cs += _elementwise(mlp.up.weight, use_grad).sum(dim=1)
    cs += _elementwise(mlp.down.weight, use_grad).sum(dim=0)
    return cs.double().cpu()


def structure_sums(model: nn.Module, layout: Layout, arch: Any, use_grad: bool) -> StructureScores:
    """Per-structure sums of ``|w|`` (``use_grad=False``) or ``|w * grad|`` over every layer."""
    heads, channels = [], []
    for i, layer in enumerate(arch.layers(model)):
        s = layout.layers[i]
        heads.append(head_sums(arch.attention(layer), s.num_heads, s.head_dim, not s.is_gqa, use_grad))
        channels.append(channel_sums(arch.mlp(layer), use_grad))
    return StructureScores(heads, channels)


class TaylorImportance(Importance):
    """First-order Taylor: ``sum |w * dL/dw|`` over a structure's weights.

    The gradient must already hold the mean over the calibration set
    (accumulate first, multiply once), as in the paper's reference code. For GQA
    a query head is scored by its q rows and o columns only; its k/v rows are
    shared with the rest of the group.
    """

    name = "taylor"
    needs_gradients = True

    def scores(self, model: nn.Module, layout: Layout, arch: Any) -> StructureScores:
        return structure_sums(model, layout, arch, use_grad=True)


class MagnitudeImportance(Importance):
    """``sum |w|`` over a structure's weights: a data-free floor."""

    name = "magnitude"

    def scores(self, model: nn.Module, layout: Layout, arch: Any) -> StructureScores:
        return structure_sums(model, layout, arch, use_grad=False)


def normalize(scores: StructureScores, layout: Layout, mode: str) -> StructureScores:
    """Block-wise normalisation so heads and channels rank in one list.

    - ``params`` (paper Eq. 9): divide by the structure's scored parameter count
      (mean importance per parameter).
    - ``reference``: the reference code's constants, heads by ``4*d_h*d_model``
      and channels by ``3*d_ff``.
    - ``none``: raw sums.
    """
    if mode not in NORMALIZATIONS:
        raise GispError(f"unknown normalisation '{mode}': use one of {', '.join(NORMALIZATIONS)}")
    if mode == "none":
        return scores
    heads, channels = [], []
    for s, h, c in zip(layout.layers, scores.heads, scores.channels):
        if mode == "params":
            heads.append(h / s.head_scored_params())
            channels.append(c / s.channel_scored_params())
        else:
            heads.append(h / (4 * s.head_dim * s.hidden))
            channels.append(c / (3 * s.intermediate))
    return StructureScores(heads, channels)
