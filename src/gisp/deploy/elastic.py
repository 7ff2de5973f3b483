"""One model, every sparsity: switch levels of a GISP run without copying weights.

GISP's masks are nested, so if each layer's heads, KV heads and channels are
stored in reverse pruning order (the structure removed last first), the model
at any step keeps a *prefix* of every projection: the first ``h`` query heads,
the first ``kv`` KV heads and the first ``c`` channels. :class:`ElasticModel`
reorders the base model's weights once, in place, and then runs each layer on
prefix views of them; :meth:`ElasticModel.set_sparsity` only changes three
integers per layer. Its logits equal those of :func:`gisp.deploy.export.export` at the
same level (to float rounding).

Query heads keep their KV head through an explicit per-layer map, so uneven
GQA groups are exact here too. Switching level in the middle of a generation
(with a KV cache built at another level) is not supported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from gisp.architectures import get_architecture
from gisp.architectures.base import AttentionProjections, MLPProjections
from gisp.architectures.perlayer import attend_mapped, release_kv_slot
from gisp.architectures.slicing import count_params, plan_layers
from gisp.core.structures import Layout, block_rows
from gisp.errors import GispError
from gisp.loading import load_base_model
from gisp.run.trajectory import Trajectory

_NEVER = 1 << 62  # removal step of a structure the run never removed


def _keep_order(steps: list[int], orders: list[int]) -> torch.Tensor:
    """Indices sorted so every step's kept set is a prefix: latest removal (or never) first."""
    key = [(_NEVER if s == 0 else s, o) for s, o in zip(steps, orders)]
    return torch.tensor(sorted(range(len(key)), key=lambda i: key[i], reverse=True), dtype=torch.long)


@torch.no_grad()
def _permute(p: nn.Parameter | None, index: torch.Tensor, dim: int) -> None:
    if p is not None:
        p.data = p.data.index_select(dim, index.to(p.device))


class _Wrapper(nn.Module):
    """Anything not elastic (projections, activation, ...) is the wrapped module's, so architectures still
    find it."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("inner")
            if inner is None:
                raise
            return getattr(inner, name)


class ElasticAttention(_Wrapper):
    """Runs the first ``heads`` query heads (and first ``kv_heads`` KV heads) of a reordered attention."""

    def __init__(self, attention: nn.Module, proj: AttentionProjections, kv_map: torch.Tensor,
                 removal: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.inner = attention
        self.proj = proj
        for name in ("layer_idx", "head_dim", "scaling", "attention_dropout", "is_causal", "config"):
            setattr(self, name, getattr(attention, name))
        self.sliding_window = getattr(attention, "sliding_window", None)
        self.num_key_value_groups = 1
        self.register_buffer("kv_map", kv_map, persistent=False)
        self.head_removal = removal["heads"]  # removal step per (reordered) head, _NEVER if never
        self.kv_removal = removal["kv"]
        self.heads = kv_map.numel()
        self.kv_heads = int(kv_map.max()) + 1 if kv_map.numel() else 0

    def set_step(self, step: int) -> None:
        self.heads = int((self.head_removal > step).sum())
        self.kv_heads = int((self.kv_removal > step).sum())

    def forward(self, hidden_states: torch.Tensor, position_embeddings: Any = None, attention_mask: Any = None,
                cache: Any = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        a, p, h, d = self.inner, self.proj, self.heads, self.head_dim
        if h == 0:
            if cache is not None:
                release_kv_slot(cache, self.layer_idx)
            out = torch.zeros_like(hidden_states)
            return (out + p.o.bias if p.o.bias is not None else out), None
        kv = self.kv_heads * d

        def bias(p: torch.Tensor | None, n: int) -> torch.Tensor | None:
            return None if p is None else p[:n]

        w = {"q": p.q.weight[: h * d], "q_bias": bias(p.q.bias, h * d),
             "k": p.k.weight[:kv], "k_bias": bias(p.k.bias, kv),
             "v": p.v.weight[:kv], "v_bias": bias(p.v.bias, kv),
             "o": p.o.weight[:, : h * d], "o_bias": p.o.bias}
        return attend_mapped(self, hidden_states, position_embeddings, attention_mask, cache, w, self.kv_map[:h],
                             getattr(a, "q_norm", None), getattr(a, "k_norm", None), **kwargs)


class ElasticMLP(_Wrapper):
    """Runs the first ``channels`` channels of a reordered gated MLP."""

    def __init__(self, mlp: nn.Module, proj: MLPProjections, removal: torch.Tensor) -> None:
        super().__init__()
        self.inner = mlp
        self.proj = proj
        self.removal = removal
        self.channels = removal.numel()

    def set_step(self, step: int) -> None:
        self.channels = int((self.removal > step).sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, c = self.proj, self.channels
        if c == 0:
            out = torch.zeros_like(x)
            return out + p.down.bias if p.down.bias is not None else out

        def lin(p: nn.Linear, n: int) -> torch.Tensor:
            return nn.functional.linear(x, p.weight[:n], None if p.bias is None else p.bias[:n])

        hidden = self.inner.act_fn(lin(p.gate, c)) * lin(p.up, c)
        return nn.functional.linear(hidden, p.down.weight[:, :c], p.down.bias)


class ElasticModel(nn.Module):
    """A base model whose sparsity level can be switched in place (see module docstring).

    The wrapped model is modified in place (weights reordered, attention and
    MLP modules wrapped); use :attr:`model` for anything transformers offers
    (``generate``, ...), or call this object like the model.
    """

    def __init__(self, model: nn.Module, trajectory: Trajectory, *, tokenizer: Any = None, check: bool = True) -> None:
        super().__init__()
        if check:
            trajectory.check_model(model)
        self.model = model
        self.tokenizer = tokenizer
        self.trajectory = trajectory
        self.layout: Layout = trajectory.layout
        arch = get_architecture(model)
        attn_name, mlp_name = arch.attention_modules[0], arch.mlp_modules[0]
        self._attn: list[ElasticAttention] = []
        self._mlp: list[ElasticMLP] = []
        for i, layer in enumerate(arch.layers(model)):
            s = self.layout.layers[i]
            att, mlp = arch.attention(layer), arch.mlp(layer)
            hs, ho = trajectory.head_step[i], trajectory.head_order[i]
            q_perm = _keep_order(hs, ho)
            removal = torch.tensor([_NEVER if x == 0 else x for x in hs], dtype=torch.long)
            group = torch.arange(s.num_heads) // s.group_size
            kv_removal = torch.stack([removal[group == g].max() for g in range(s.num_kv_heads)])
            kv_perm = torch.argsort(kv_removal, descending=True, stable=True)
            kv_pos = torch.empty_like(kv_perm)
            kv_pos[kv_perm] = torch.arange(s.num_kv_heads)
            q_rows, kv_rows = block_rows(q_perm, s.head_dim), block_rows(kv_perm, s.head_dim)
            for p, idx, dim in ((att.q.weight, q_rows, 0), (att.q.bias, q_rows, 0), (att.k.weight, kv_rows, 0),
                                (att.k.bias, kv_rows, 0), (att.v.weight, kv_rows, 0), (att.v.bias, kv_rows, 0),
                                (att.o.weight, q_rows, 1)):
                _permute(p, idx, dim)
            kv_map = kv_pos[group[q_perm]].to(att.q.weight.device)
            elastic_attn = ElasticAttention(getattr(layer, attn_name), att, kv_map,
                                            {"heads": removal[q_perm], "kv": kv_removal[kv_perm]})
            setattr(layer, attn_name, elastic_attn)
            c_perm = _keep_order(trajectory.channel_step[i], trajectory.channel_order[i])
            for p, dim in ((mlp.gate.weight, 0), (mlp.gate.bias, 0), (mlp.up.weight, 0), (mlp.up.bias, 0),
                           (mlp.down.weight, 1)):
                _permute(p, c_perm, dim)
            c_removal = torch.tensor([_NEVER if x == 0 else x for x in trajectory.channel_step[i]])[c_perm]
            elastic_mlp = ElasticMLP(getattr(layer, mlp_name), mlp, c_removal)
            setattr(layer, mlp_name, elastic_mlp)
            self._attn.append(elastic_attn)
            self._mlp.append(elastic_mlp)
        self.step = 0
        self.set_step(0)

    @classmethod
    def from_run(cls, run: str | Path, *, model: nn.Module | None = None, dtype: str | None = None,
                 device: str = "auto") -> ElasticModel:
        """Load the run's base model (by its recorded name/path; ``dtype`` default: the run's) and make it elastic."""
        traj = Trajectory.load(run)
        tokenizer = None
        if model is None:
            loaded = load_base_model(traj.model, dtype=dtype, device=device)
            model, tokenizer = loaded.model, loaded.tokenizer
        return cls(model, traj, tokenizer=tokenizer)

    # levels -------------------------------------------------------------------
    def set_step(self, step: int) -> dict[str, Any]:
        """Switch to the model kept after ``step`` (0 = dense); no weights are copied."""
        if not 0 <= step <= self.trajectory.last_step:
            raise GispError(f"step {step} is outside this run's steps 0..{self.trajectory.last_step}")
        for a, m in zip(self._attn, self._mlp):
            a.set_step(step)
            m.set_step(step)
        self.step = step
        return self.trajectory.steps[step]

    def set_sparsity(self, sparsity: float) -> dict[str, Any]:
        """Switch to the last step at or below ``sparsity``; returns that step's record."""
        return self.set_step(self.trajectory.step_at(sparsity)["step"])

    @property
    def sparsity(self) -> float:
        return float(self.trajectory.steps[self.step]["sparsity"])

    def widths(self) -> list[tuple[int, int, int]]:
        """(query heads, KV heads, channels) each layer runs at the current level."""
        return [(a.heads, a.kv_heads, m.channels) for a, m in zip(self._attn, self._mlp)]

    def active_params(self) -> int:
        """Parameters the current level uses: what its export (``gqa="map"``) holds."""
        mask = self.trajectory.mask_at_step(self.step)
        return count_params(self.model, self.layout, plan_layers(mask, self.layout, "map"))

    # running ------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.generate(*args, **kwargs)
