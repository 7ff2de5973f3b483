"""One model, every sparsity: switch levels of a GISP run without copying weights.

GISP's masks are nested, so if each layer's heads, KV heads and channels are
stored in reverse pruning order (the structure removed last first), the model
at any step keeps a *prefix* of every projection: the first ``h`` query heads,
the first ``kv`` KV heads and the first ``c`` channels. :class:`ElasticModel`
reorders the base model's weights once, in place, and then runs each layer on
prefix views of them; :meth:`ElasticModel.set_sparsity` only changes three
integers per layer. Its logits equal those of :func:`gisp.export.export` at the
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

from gisp.adapters import get_adapter
from gisp.errors import GispError
from gisp.export import _release_kv_slot, attend_mapped, count_params, plan_layers
from gisp.run.trajectory import Trajectory
from gisp.structures import Layout

_NEVER = 1 << 62  # removal step of a structure the run never removed


def _keep_order(steps: list[int], orders: list[int]) -> torch.Tensor:
    """Indices sorted so every step's kept set is a prefix: latest removal (or never) first."""
    key = [(_NEVER if s == 0 else s, o) for s, o in zip(steps, orders)]
    return torch.tensor(sorted(range(len(key)), key=lambda i: key[i], reverse=True), dtype=torch.long)


def _rows(perm: torch.Tensor, d: int) -> torch.Tensor:
    return (perm[:, None] * d + torch.arange(d)).flatten()


@torch.no_grad()
def _permute(p: nn.Parameter | None, index: torch.Tensor, dim: int) -> None:
    if p is not None:
        p.data = p.data.index_select(dim, index.to(p.device))


class _Wrapper(nn.Module):
    """Anything not elastic (q_proj, act_fn, ...) is the wrapped module's, so adapters still find it."""

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

    def __init__(self, attention: nn.Module, kv_map: torch.Tensor, removal: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.inner = attention
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
        a, h, d = self.inner, self.heads, self.head_dim
        if h == 0:
            if cache is not None:
                _release_kv_slot(cache, self.layer_idx)
            out = torch.zeros_like(hidden_states)
            return (out + a.o_proj.bias if a.o_proj.bias is not None else out), None
        kv = self.kv_heads * d

        def bias(p: torch.Tensor | None, n: int) -> torch.Tensor | None:
            return None if p is None else p[:n]

        w = {"q": a.q_proj.weight[: h * d], "q_bias": bias(a.q_proj.bias, h * d),
             "k": a.k_proj.weight[:kv], "k_bias": bias(a.k_proj.bias, kv),
             "v": a.v_proj.weight[:kv], "v_bias": bias(a.v_proj.bias, kv),
             "o": a.o_proj.weight[:, : h * d], "o_bias": a.o_proj.bias}
        return attend_mapped(self, hidden_states, position_embeddings, attention_mask, cache, w, self.kv_map[:h],
                             getattr(a, "q_norm", None), getattr(a, "k_norm", None), **kwargs)


class ElasticMLP(_Wrapper):
    """Runs the first ``channels`` channels of a reordered gated MLP."""

    def __init__(self, mlp: nn.Module, removal: torch.Tensor) -> None:
        super().__init__()
        self.inner = mlp
        self.removal = removal
        self.channels = removal.numel()

    def set_step(self, step: int) -> None:
        self.channels = int((self.removal > step).sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, c = self.inner, self.channels
        if c == 0:
            out = torch.zeros_like(x)
            return out + m.down_proj.bias if m.down_proj.bias is not None else out

        def lin(p: nn.Linear, n: int) -> torch.Tensor:
            return nn.functional.linear(x, p.weight[:n], None if p.bias is None else p.bias[:n])

        hidden = m.act_fn(lin(m.gate_proj, c)) * lin(m.up_proj, c)
        return nn.functional.linear(hidden, m.down_proj.weight[:, :c], m.down_proj.bias)


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
        adapter = get_adapter(model)
        self._attn: list[ElasticAttention] = []
        self._mlp: list[ElasticMLP] = []
        for i, layer in enumerate(adapter.layers(model)):
            s = self.layout.layers[i]
            att, mlp = adapter.attention(layer), adapter.mlp(layer)
            hs, ho = trajectory.head_step[i], trajectory.head_order[i]
            q_perm = _keep_order(hs, ho)
            removal = torch.tensor([_NEVER if x == 0 else x for x in hs], dtype=torch.long)
            group = torch.arange(s.num_heads) // s.group_size
            kv_removal = torch.stack([removal[group == g].max() for g in range(s.num_kv_heads)])
            kv_perm = torch.argsort(kv_removal, descending=True, stable=True)
            kv_pos = torch.empty_like(kv_perm)
            kv_pos[kv_perm] = torch.arange(s.num_kv_heads)
            q_rows, kv_rows = _rows(q_perm, s.head_dim), _rows(kv_perm, s.head_dim)
            for p, idx, dim in ((att.q.weight, q_rows, 0), (att.q.bias, q_rows, 0), (att.k.weight, kv_rows, 0),
                                (att.k.bias, kv_rows, 0), (att.v.weight, kv_rows, 0), (att.v.bias, kv_rows, 0),
                                (att.o.weight, q_rows, 1)):
                _permute(p, idx, dim)
            layer.self_attn = ElasticAttention(layer.self_attn, kv_pos[group[q_perm]].to(att.q.weight.device),
                                               {"heads": removal[q_perm], "kv": kv_removal[kv_perm]})
            c_perm = _keep_order(trajectory.channel_step[i], trajectory.channel_order[i])
            for p, dim in ((mlp.gate.weight, 0), (mlp.gate.bias, 0), (mlp.up.weight, 0), (mlp.up.bias, 0),
                           (mlp.down.weight, 1)):
                _permute(p, c_perm, dim)
            c_removal = torch.tensor([_NEVER if x == 0 else x for x in trajectory.channel_step[i]])[c_perm]
            layer.mlp = ElasticMLP(layer.mlp, c_removal)
            self._attn.append(layer.self_attn)
            self._mlp.append(layer.mlp)
        self.step = 0
        self.set_step(0)

    @classmethod
    def from_run(cls, run: str | Path, *, model: nn.Module | None = None, dtype: str = "auto",
                 device: str = "auto") -> ElasticModel:
        """Load the run's base model (by its recorded name/path) and make it elastic."""
        from gisp.loading import load_model

        traj = Trajectory.load(run)
        tokenizer = None
        if model is None:
            name = traj.model.get("path") or traj.model.get("name")
            if not name or name == "model":
                raise GispError(f"{run} does not record a loadable base model: pass model= (the unpruned base model)")
            loaded = load_model(name, dtype=dtype, device=device)
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
