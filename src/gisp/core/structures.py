"""Prunable structures and nested masks.

A *structure* is one attention query head or one MLP intermediate channel of one
decoder layer (see ``docs/method.md``). A :class:`Layout` describes how many of
each every layer has and how many parameters they own; a :class:`Mask` says which
are kept. Both are plain data: reading them from a model and zeroing a mask's
removed structures in its weights is the job of :mod:`gisp.architectures`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gisp.errors import GispError


@dataclass(frozen=True)
class LayerShape:
    """Widths of one decoder layer and whether its projections carry biases."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def is_gqa(self) -> bool:
        return self.num_kv_heads != self.num_heads

    def params(self, heads: int, kv_heads: int, channels: int) -> int:
        """Linear parameters (weights and biases) of this layer at the given widths."""
        d, h = self.head_dim, self.hidden
        q = heads * d * h + (heads * d if self.qkv_bias else 0)
        kv = 2 * (kv_heads * d * h + (kv_heads * d if self.qkv_bias else 0))
        o = h * heads * d + (h if self.o_bias and heads else 0)
        mlp = 3 * channels * h + ((2 * channels + h) if self.mlp_bias and channels else 0)
        return q + kv + o + mlp

    @property
    def dense_params(self) -> int:
        return self.params(self.num_heads, self.num_kv_heads, self.intermediate)

    def head_scored_params(self) -> int:
        """Weights that define one head's score: q rows + o columns (+ k/v rows for MHA)."""
        return (2 if self.is_gqa else 4) * self.head_dim * self.hidden

    def channel_scored_params(self) -> int:
        return 3 * self.hidden


@dataclass(frozen=True)
class Layout:
    """The prunable structures of a whole model and which layers are protected."""

    layers: tuple[LayerShape, ...]
    protected: frozenset[int]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def prunable(self) -> list[int]:
        return [i for i in range(self.num_layers) if i not in self.protected]

    @property
    def dense_params(self) -> int:
        return sum(s.dense_params for s in self.layers)

    def num_structures(self, protected: bool = False) -> int:
        idx = range(self.num_layers) if protected else self.prunable
        return sum(self.layers[i].num_heads + self.layers[i].intermediate for i in idx)

    def to_dict(self) -> dict:
        return {
            "layers": [s.__dict__ for s in self.layers],
            "protected": sorted(self.protected),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Layout:
        return cls(tuple(LayerShape(**s) for s in d["layers"]), frozenset(d["protected"]))


def protected_layers(num_layers: int, protect_first: float, protect_last: int) -> frozenset[int]:
    """First ``protect_first`` fraction (floored) and last ``protect_last`` layers."""
    if not 0.0 <= protect_first < 1.0:
        raise GispError(f"--protect-first must be a fraction in [0, 1), got {protect_first}")
    if not 0 <= protect_last < num_layers:
        raise GispError(f"--protect-last must be in [0, {num_layers - 1}], got {protect_last}")
    first = int(protect_first * num_layers + 1e-9)
    last = set(range(num_layers - protect_last, num_layers))
    prot = frozenset(set(range(first)) | last)
    if len(prot) >= num_layers:
        raise GispError("every layer is protected: lower --protect-first / --protect-last")
    return prot


@dataclass
class Mask:
    """Kept heads and channels per layer (``True`` = kept)."""

    heads: list[torch.Tensor]
    channels: list[torch.Tensor]

    @classmethod
    def dense(cls, layout: Layout) -> Mask:
        return cls(
            [torch.ones(s.num_heads, dtype=torch.bool) for s in layout.layers],
            [torch.ones(s.intermediate, dtype=torch.bool) for s in layout.layers],
        )

    def clone(self) -> Mask:
        return Mask([h.clone() for h in self.heads], [c.clone() for c in self.channels])

    def kv_heads(self, layout: Layout, layer: int) -> torch.Tensor:
        """A KV head is kept while any query head of its group is kept."""
        s = layout.layers[layer]
        return self.heads[layer].view(s.num_kv_heads, s.group_size).any(dim=1)

    def kept_params(self, layout: Layout) -> int:
        total = 0
        for i, s in enumerate(layout.layers):
            total += s.params(
                int(self.heads[i].sum()),
                int(self.kv_heads(layout, i).sum()),
                int(self.channels[i].sum()),
            )
        return total

    def sparsity(self, layout: Layout) -> float:
        """Fraction of decoder-layer linear parameters removed (the paper's definition)."""
        return 1.0 - self.kept_params(layout) / layout.dense_params

    def is_subset_of(self, other: Mask) -> bool:
        """True when every structure kept here is also kept in ``other`` (nesting)."""
        return all(bool((a & ~b).sum() == 0) for a, b in zip(self.heads, other.heads)) and all(
            bool((a & ~b).sum() == 0) for a, b in zip(self.channels, other.channels)
        )


def block_rows(blocks: torch.Tensor | list[int], width: int) -> torch.Tensor:
    """Row indices of blocks ``blocks`` of ``width`` rows each (a head's rows in q/k/v, its columns in o)."""
    idx = torch.as_tensor(blocks, dtype=torch.long).cpu().flatten()
    return (idx[:, None] * width + torch.arange(width)).flatten()
