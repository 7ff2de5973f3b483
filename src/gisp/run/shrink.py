"""Progressive physical shrinking: later pruning steps run on a physically smaller network.

A masked model costs as much per step as the dense one: removed heads and
channels are zeros that still go through every matmul. Every ``K`` steps
(``PruneConfig.shrink_every``) the pruning loop slices a working copy with the
slicing code (:func:`gisp.architectures.slicing.slim_model`, the modules rebuilt from a
per-layer config), computes the gradients on that copy, and maps each kept
structure's score back to its index in the base model. The base model keeps
the mask (zeros), so the trajectory, masks and every later tool see the base
model's indices.

Exactness: a removed structure contributes exactly zero to the masked model's
output and its Taylor score is zero, so the sliced copy computes the same loss
and the same scores for the kept structures; only float rounding of shorter
matmuls differs, which can swap structures whose scores tie to rounding.

Cost: the working copy holds the kept weights next to the base model (at most
one more copy of the prunable weights, shrinking as pruning goes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gisp.architectures import get_architecture
from gisp.architectures.base import zero_structures
from gisp.architectures.slicing import plan_layers, slim_model
from gisp.core.importance import StructureScores, channel_sums, head_sums
from gisp.core.ranking import Pick
from gisp.core.structures import Layout, Mask
from gisp.errors import GispError


@dataclass
class _Slot:
    """Where one base layer's kept structures sit in the working copy."""

    attn: object | None  # AttentionProjections of the sliced layer, None when the block is gone
    mlp: object | None
    heads: torch.Tensor  # base index of the working copy's head j
    channels: torch.Tensor
    head_pos: dict[int, int]  # base index -> working index
    channel_pos: dict[int, int]


class ShrunkModel:
    """A physically sliced working copy of ``base`` (masked by ``mask``) that scores in base indices."""

    def __init__(self, base: nn.Module, mask: Mask, layout: Layout) -> None:
        if len({p.device for p in base.parameters()}) > 1:
            raise GispError("--shrink-every needs the model on one device (it is spread by --device-map): "
                            "drop --shrink-every")
        arch = get_architecture(base)
        self.layout = layout
        self.model = slim_model(base, mask, gqa="map").to(next(base.parameters()).device)
        self.model.eval()
        self.slots: list[_Slot] = []
        for layer, plan in zip(arch.layers(self.model), plan_layers(mask, layout, "map"), strict=True):
            self.slots.append(_Slot(arch.attention(layer), arch.mlp(layer), torch.tensor(plan.heads, dtype=torch.long),
                                    torch.tensor(plan.channels, dtype=torch.long),
                                    {h: j for j, h in enumerate(plan.heads)},
                                    {c: j for j, c in enumerate(plan.channels)}))
        self.params = sum(p.numel() for p in self.model.parameters())
        self.prunable = self._prunable()
        """The working copy's projection weights of unprotected layers (empty once all are sliced away)."""

    def _prunable(self) -> list[nn.Parameter]:
        out: list[nn.Parameter] = []
        for i, slot in enumerate(self.slots):
            if i in self.layout.protected:
                continue
            if slot.attn is not None:
                out += [slot.attn.q.weight, slot.attn.k.weight, slot.attn.v.weight, slot.attn.o.weight]
            if slot.mlp is not None:
                out += [slot.mlp.gate.weight, slot.mlp.up.weight, slot.mlp.down.weight]
        return out

    @torch.no_grad()
    def taylor_scores(self) -> StructureScores:
        """``sum |w * grad|`` per structure (as :class:`gisp.core.importance.TaylorImportance`), in base indices;
        removed structures score zero, as they do on the masked model."""
        heads, channels = [], []
        for s, slot in zip(self.layout.layers, self.slots, strict=True):
            hs = torch.zeros(s.num_heads, dtype=torch.float64)
            cs = torch.zeros(s.intermediate, dtype=torch.float64)
            if slot.attn is not None and len(slot.heads):  # MHA: kept heads are their own KV heads, same order
                hs[slot.heads] = head_sums(slot.attn, len(slot.heads), s.head_dim, not s.is_gqa, use_grad=True)
            if slot.mlp is not None and len(slot.channels):
                cs[slot.channels] = channel_sums(slot.mlp, use_grad=True)
            heads.append(hs)
            channels.append(cs)
        return StructureScores(heads, channels)

    @torch.no_grad()
    def remove(self, picks: list[Pick]) -> None:
        """Zero the picked structures in the working copy (as the mask does on the base model)."""
        for p in picks:
            slot, s = self.slots[p.layer], self.layout.layers[p.layer]
            one = torch.tensor([slot.head_pos[p.index] if p.kind == "head" else slot.channel_pos[p.index]])
            none = one[:0]
            if p.kind == "head":  # MHA: a head is its own KV head
                zero_structures(slot.attn, None, s.head_dim, one, none if s.is_gqa else one, none)
            else:
                zero_structures(None, slot.mlp, s.head_dim, none, none, one)
