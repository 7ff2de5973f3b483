"""Slicing: a physically smaller copy of a model that keeps exactly a mask's structures.

Query rows and output columns of removed heads, key/value rows of KV heads no
kept query head uses, gate/up rows and down columns of removed channels are
sliced away, and a layer whose heads (or channels) are all gone skips that
block entirely (only the residual path remains). The copy is built from a new
config (a standard one when every layer ends with the same standard widths,
else the family's per-layer config), never by patching modules, and computes
what the masked model computes, to float rounding.

GQA: a KV head stays while any query head of its group is kept, so kept query
heads can be spread unevenly over KV heads (e.g. 2, 1 and 3). Two exact ways:

- ``gqa="map"`` (default): keep each KV head once and record per layer which
  KV head every query head reads (``kv_head_map``); smallest weights and KV
  cache, but those layers need gisp's per-layer class.
- ``gqa="duplicate"``: duplicate KV heads until every group has the same size
  (``gcd`` of the group sizes), which is standard grouped-query attention:
  larger k/v weights and KV cache, no custom attention code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from gisp.architectures import get_architecture
from gisp.architectures.base import Architecture
from gisp.core.structures import Layout, Mask, block_rows
from gisp.errors import GispError

GQA_MODES = ("map", "duplicate")


class OutputBiases(Protocol):
    """Biases to add to a layer's o_proj (``module='o'``) or down_proj (``'down'``) output (bias compensation)."""

    def bias_for(self, layer: int, module: str) -> torch.Tensor | None: ...


@dataclass
class LayerPlan:
    """What one sliced layer keeps, in export order (indices into the base layer)."""

    heads: list[int]
    kv_heads: list[int]  # may repeat a KV head (gqa="duplicate")
    kv_map: list[int] | None  # query head i (export order) reads kv_heads[kv_map[i]]
    channels: list[int]

    @property
    def overrides(self) -> dict[str, Any]:
        d: dict[str, Any] = {"num_attention_heads": len(self.heads), "num_key_value_heads": len(self.kv_heads),
                             "intermediate_size": len(self.channels)}
        if self.kv_map is not None:
            d["kv_head_map"] = self.kv_map
        skip = (["self_attn"] if not self.heads else []) + (["mlp"] if not self.channels else [])
        if skip:
            d["skip"] = skip
        return d


def plan_layers(mask: Mask, layout: Layout, gqa: str = "map") -> list[LayerPlan]:
    """Order kept heads by KV group and decide how each layer's groups are expressed."""
    if gqa not in GQA_MODES:
        raise GispError(f"unknown --gqa '{gqa}': use one of {', '.join(GQA_MODES)}")
    plans = []
    for i, s in enumerate(layout.layers):
        kept = mask.heads[i].nonzero().flatten().tolist()
        groups: dict[int, list[int]] = {}
        for h in kept:
            groups.setdefault(h // s.group_size, []).append(h)
        kv = sorted(groups)
        heads = [h for g in kv for h in groups[g]]
        sizes = [len(groups[g]) for g in kv]
        kv_map = None
        if len(set(sizes)) > 1:
            if gqa == "map":
                kv_map = [j for j, g in enumerate(kv) for _ in groups[g]]
            else:
                step = math.gcd(*sizes)
                kv = [g for g in kv for _ in range(len(groups[g]) // step)]
        plans.append(LayerPlan(heads, kv, kv_map, mask.channels[i].nonzero().flatten().tolist()))
    return plans


def _numel(modules: Sequence[nn.Module | None]) -> int:
    return sum(p.numel() for m in modules if m is not None for p in m.parameters())


def count_params(model: nn.Module, layout: Layout, plans: Sequence[LayerPlan]) -> int:
    """Parameters of the sliced model (embeddings, norms and lm_head included, tied weights once)."""
    arch = get_architecture(model)
    total = sum(p.numel() for p in model.parameters())
    for i, (layer, plan) in enumerate(zip(arch.layers(model), plans)):
        s = layout.layers[i]
        att, mlp = arch.attention(layer), arch.mlp(layer)
        attn_blocks, mlp_blocks = arch.block_modules(layer, "attention"), arch.block_modules(layer, "mlp")
        total -= _numel(attn_blocks) + _numel(mlp_blocks)
        total += s.params(len(plan.heads), len(plan.kv_heads), len(plan.channels))
        if plan.heads:  # the block's other weights (norms, q/k norms) stay
            total += _numel(attn_blocks) - _numel([att.q, att.k, att.v, att.o])
        elif s.o_bias:
            total += s.hidden  # the output bias of a skipped block stays
        if plan.channels:
            total += _numel(mlp_blocks) - _numel([mlp.gate, mlp.up, mlp.down])
        elif s.mlp_bias:
            total += s.hidden
    return total


def base_config_dict(config: Any) -> dict[str, Any]:
    """The base config as keyword arguments for a new config of the same family (``head_dim`` explicit)."""
    d = config.to_dict()
    for k in ("model_type", "architectures", "transformers_version", "_name_or_path", "per_layer_config",
              "quantization_config", "kv_head_map", "auto_map"):
        d.pop(k, None)
    d["head_dim"] = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    return d


def standard_config(arch: Architecture, base_config: Any, heads: int, kv_heads: int, channels: int) -> Any | None:
    """The family's standard config at these widths, or ``None`` when it refuses them."""
    d = base_config_dict(base_config)
    d.update(num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=channels)
    try:
        return arch.config_class(**d)
    except Exception:  # e.g. Llama insists hidden_size % heads == 0
        return None


def slim_config(base_config: Any, plans: Sequence[LayerPlan]) -> Any:
    """A standard config when all layers share standard widths, else the family's per-layer config."""
    arch = get_architecture(base_config)
    shapes = {(len(p.heads), len(p.kv_heads), len(p.channels)) for p in plans}
    if len(shapes) == 1 and all(p.kv_map is None for p in plans):
        h, kv, c = shapes.pop()
        config = standard_config(arch, base_config, h, kv, c) if h and c else None
        if config is not None:
            return config
    per_layer = {i: p.overrides for i, p in enumerate(plans)}
    return arch.per_layer_config_class(**base_config_dict(base_config), per_layer_config=per_layer)


def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


@torch.no_grad()
def slim_state_dict(model: nn.Module, layout: Layout, plans: Sequence[LayerPlan]) -> dict[str, torch.Tensor]:
    """The base model's tensors with removed rows/columns (and empty blocks) dropped."""
    arch = get_architecture(model)
    names = _module_names(model)
    drop: list[str] = []
    sliced: dict[str, torch.Tensor] = {}
    def take_rows(proj: nn.Linear, index: torch.Tensor) -> None:
        sliced[names[id(proj)] + ".weight"] = proj.weight.index_select(0, index)
        if proj.bias is not None:
            sliced[names[id(proj)] + ".bias"] = proj.bias.index_select(0, index)

    for i, (layer, plan) in enumerate(zip(arch.layers(model), plans)):
        s = layout.layers[i]
        att, mlp = arch.attention(layer), arch.mlp(layer)
        prefix = names[id(layer)]
        for kept, modules, out_proj, bias_name in ((plan.heads, arch.attention_modules, att.o, "skipped_attn_bias"),
                                                   (plan.channels, arch.mlp_modules, mlp.down, "skipped_mlp_bias")):
            if not kept:  # the block goes; the output bias it always added stays
                drop += [f"{prefix}.{n}." for n in modules]
                if out_proj.bias is not None:
                    sliced[f"{prefix}.{bias_name}"] = out_proj.bias.clone()
        if plan.heads:
            q_rows, kv_rows = block_rows(plan.heads, s.head_dim), block_rows(plan.kv_heads, s.head_dim)
            for proj, rows in ((att.q, q_rows), (att.k, kv_rows), (att.v, kv_rows)):
                take_rows(proj, rows)
            sliced[names[id(att.o)] + ".weight"] = att.o.weight.index_select(1, q_rows)
        if plan.channels:
            ch = torch.tensor(plan.channels, dtype=torch.long)
            for proj in (mlp.gate, mlp.up):
                take_rows(proj, ch)
            sliced[names[id(mlp.down)] + ".weight"] = mlp.down.weight.index_select(1, ch)
    out = {k: v for k, v in model.state_dict().items() if k not in sliced and not k.startswith(tuple(drop))}
    out.update(sliced)
    return out


@torch.no_grad()
def output_bias_tensors(model: nn.Module, plans: Sequence[LayerPlan], state: dict[str, torch.Tensor],
                        biases: OutputBiases) -> dict[str, torch.Tensor]:
    """Bias tensors of a compensated slice: zero q/k/v/gate/up biases, o_proj/down_proj biases equal to
    ``biases`` (added to any bias the base model has), and the same for fully removed blocks."""
    arch = get_architecture(model)
    names = _module_names(model)
    dtype = next(model.parameters()).dtype
    out: dict[str, torch.Tensor] = {}

    def put(key: str, size: int, extra: torch.Tensor | None = None) -> None:
        b = state[key].clone() if key in state else torch.zeros(size, dtype=dtype)
        out[key] = b if extra is None else b + extra.to(dtype)

    for i, (layer, plan) in enumerate(zip(arch.layers(model), plans)):
        att, mlp = arch.attention(layer), arch.mlp(layer)
        hidden, d = att.o.weight.shape[0], arch.head_dim
        prefix = names[id(layer)]
        o_comp, down_comp = biases.bias_for(i, "o"), biases.bias_for(i, "down")
        if plan.heads:
            put(names[id(att.q)] + ".bias", len(plan.heads) * d)
            put(names[id(att.k)] + ".bias", len(plan.kv_heads) * d)
            put(names[id(att.v)] + ".bias", len(plan.kv_heads) * d)
            put(names[id(att.o)] + ".bias", hidden, o_comp)
        else:
            put(prefix + ".skipped_attn_bias", hidden, o_comp)
        if plan.channels:
            put(names[id(mlp.gate)] + ".bias", len(plan.channels))
            put(names[id(mlp.up)] + ".bias", len(plan.channels))
            put(names[id(mlp.down)] + ".bias", hidden, down_comp)
        else:
            put(prefix + ".skipped_mlp_bias", hidden, down_comp)
    return out


def slim_model(model: nn.Module, mask: Mask, *, gqa: str = "map", dtype: torch.dtype | None = None,
               biases: OutputBiases | None = None) -> nn.Module:
    """A physically smaller copy of ``model`` keeping exactly ``mask``'s structures (the model is untouched).

    ``biases`` (bias compensation, e.g. FLAP's) become real o_proj/down_proj biases: the copy's config then
    switches those biases on (Llama's ``attention_bias``/``mlp_bias``) with zero q/k/v and gate/up biases, so
    it loads in any loader of the family; families without such a switch refuse.
    """
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from gisp.architectures import register_auto_classes

    register_auto_classes()
    arch = get_architecture(model)
    layout = arch.layout(model)
    plans = plan_layers(mask, layout, gqa)
    config = slim_config(model.config if biases is None else arch.config_with_output_biases(model.config), plans)
    state = slim_state_dict(model, layout, plans)
    if biases is not None:
        state.update(output_bias_tensors(model, plans, state, biases))
    with no_init_weights():
        slim = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    missing, unexpected = slim.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise GispError(f"internal error slicing the model: missing {sorted(set(missing) - tied)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]}")
    if tied:
        slim.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        slim.generation_config = type(model.generation_config).from_dict(model.generation_config.to_dict())
    if dtype is not None:
        slim.to(dtype)
    return slim.eval()
