"""Prunable structures and nested masks.

A *structure* is one attention query head or one MLP intermediate channel of one
decoder layer (see ``shared/GISP.md``). A :class:`Layout` describes how many of
each every layer has and how many parameters they own; a :class:`Mask` says which
are kept. Applying a mask zeroes the removed structures' weights, so the masked
model computes exactly what the physically slimmer model computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gisp.adapters import ArchAdapter, get_adapter
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

    @classmethod
    def from_model(
        cls, model: nn.Module, protect_first: float = 0.0, protect_last: int = 0
    ) -> Layout:
        adapter = get_adapter(model)
        shapes = []
        for layer in adapter.layers(model):
            att, mlp = adapter.attention(layer), adapter.mlp(layer)
            d = adapter.head_dim
            shapes.append(
                LayerShape(
                    num_heads=att.q.out_features // d,
                    num_kv_heads=att.k.out_features // d,
                    head_dim=d,
                    hidden=att.q.in_features,
                    intermediate=mlp.gate.out_features,
                    qkv_bias=att.q.bias is not None,
                    o_bias=att.o.bias is not None,
                    mlp_bias=mlp.gate.bias is not None,
                )
            )
        return cls(tuple(shapes), protected_layers(len(shapes), protect_first, protect_last))

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

    @torch.no_grad()
    def apply(self, model: nn.Module, adapter: ArchAdapter | None = None, *, since: Mask | None = None) -> None:
        """Zero the weights of removed structures in place.

        A removed head loses its q rows and o columns (k/v rows too once its
        whole KV group is gone); a removed channel loses its gate/up rows and its
        down column. Zero o/down columns alone already make the structure's
        output vanish exactly; zeroing the rest makes its Taylor score zero too.

        ``since``: a mask already applied to this model; only the structures
        removed since then are zeroed (the pruning loop's per-step update, which
        touches a few rows instead of rewriting every weight). The result is the
        same as a full apply.
        """
        adapter = adapter or get_adapter(model)
        layout = Layout.from_model(model)
        for i, layer in enumerate(adapter.layers(model)):
            s = layout.layers[i]
            att, mlp = adapter.attention(layer), adapter.mlp(layer)
            heads_gone, kv_gone, ch_gone = ~self.heads[i], ~self.kv_heads(layout, i), ~self.channels[i]
            if since is not None:
                heads_gone &= since.heads[i]
                kv_gone &= since.kv_heads(layout, i)
                ch_gone &= since.channels[i]
            rows = _rows(heads_gone, s.head_dim)
            if len(rows):
                _zero(att.q.weight, 0, rows)
                _zero(att.q.bias, 0, rows)
                _zero(att.o.weight, 1, rows)
            rows = _rows(kv_gone, s.head_dim)
            if len(rows):
                for p in (att.k, att.v):
                    _zero(p.weight, 0, rows)
                    _zero(p.bias, 0, rows)
            ch = ch_gone.cpu().nonzero().flatten()
            if len(ch):
                _zero(mlp.gate.weight, 0, ch)
                _zero(mlp.up.weight, 0, ch)
                _zero(mlp.down.weight, 1, ch)
                _zero(mlp.gate.bias, 0, ch)
                _zero(mlp.up.bias, 0, ch)


def _rows(gone: torch.Tensor, width: int) -> torch.Tensor:
    """Row indices of the removed blocks of ``width`` rows each."""
    blocks = gone.cpu().nonzero().flatten()
    return (blocks[:, None] * width + torch.arange(width)).flatten()


def _zero(t: torch.Tensor | None, dim: int, index: torch.Tensor) -> None:
    """Zero slices along ``dim`` (index_fill_: plain tensor indexing is slow on CPU)."""
    if t is not None:
        t.index_fill_(dim, index.to(t.device), 0)
