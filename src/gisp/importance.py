"""Importance criteria: one score per structure, behind one interface.

Criteria read the model (and, for first-order ones, the gradients already
accumulated on it) and return :class:`StructureScores`; they never modify
weights. Block-wise normalisation makes heads and channels comparable so they
can be ranked in one global list.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from gisp.adapters import ArchAdapter, get_adapter
from gisp.errors import GispError
from gisp.structures import Layout

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
    def scores(self, model: nn.Module, layout: Layout, adapter: ArchAdapter | None = None) -> StructureScores:
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


def _structure_sums(model: nn.Module, layout: Layout, adapter: ArchAdapter, use_grad: bool) -> StructureScores:
    heads, channels = [], []
    for i, layer in enumerate(adapter.layers(model)):
        s = layout.layers[i]
        heads.append(head_sums(adapter.attention(layer), s.num_heads, s.head_dim, not s.is_gqa, use_grad))
        channels.append(channel_sums(adapter.mlp(layer), use_grad))
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

    def scores(self, model: nn.Module, layout: Layout, adapter: ArchAdapter | None = None) -> StructureScores:
        return _structure_sums(model, layout, adapter or get_adapter(model), use_grad=True)


class MagnitudeImportance(Importance):
    """``sum |w|`` over a structure's weights: a data-free floor."""

    name = "magnitude"

    def scores(self, model: nn.Module, layout: Layout, adapter: ArchAdapter | None = None) -> StructureScores:
        return _structure_sums(model, layout, adapter or get_adapter(model), use_grad=False)


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


def prunable_parameters(model: nn.Module, layout: Layout, adapter: ArchAdapter | None = None) -> list[nn.Parameter]:
    """The projection weights of unprotected layers: the only tensors that need gradients."""
    adapter = adapter or get_adapter(model)
    params = []
    for i, layer in enumerate(adapter.layers(model)):
        if i in layout.protected:
            continue
        att, mlp = adapter.attention(layer), adapter.mlp(layer)
        params += [att.q.weight, att.k.weight, att.v.weight, att.o.weight]
        params += [mlp.gate.weight, mlp.up.weight, mlp.down.weight]
    return params
