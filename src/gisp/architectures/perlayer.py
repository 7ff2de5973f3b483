"""Per-layer model classes: transformers' own modules, built layer by layer from a per-layer config.

A per-layer export's config keeps the base model's global widths and overrides,
for each layer, ``num_attention_heads``, ``num_key_value_heads``,
``intermediate_size``, ``skip`` and ``kv_head_map`` (transformers'
``per_layer_config``). The mixins here build each layer's attention and MLP from
that layer's resolved config, so transformers' own attention and MLP code runs
with per-layer widths; a skipped block leaves only the residual path (plus the
block's output bias, if the family has one, which is what the masked model adds).

Each family module combines these mixins with its transformers classes inside
its ``causal_lm_class()``; this module imports transformers' modeling code and
is therefore only imported when such a class is first needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DummyLayer
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.llama import modeling_llama as _llama


def release_kv_slot(cache: Any, layer_idx: int) -> None:
    """A layer without attention keeps no KV cache.

    Its cache slot becomes a :class:`DummyLayer` (as transformers does for
    MLP-only layers), so the sequence length and attention masks are read from
    a layer that does attend, even when layer 0 has no attention left.
    """
    layers = getattr(cache, "layers", None)
    if layers is None:
        return
    if layer_idx >= len(layers):
        grow = getattr(cache, "layer_class_to_replicate", None)
        if grow is None:
            return
        while len(layers) < layer_idx:
            layers.append(grow())
        layers.append(DummyLayer())
    elif not isinstance(layers[layer_idx], DummyLayer):
        layers[layer_idx] = DummyLayer()


def attend_mapped(
    module: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None,
    cache: Any,
    weights: dict[str, torch.Tensor | None],
    kv_map: torch.Tensor,
    q_norm: nn.Module | None = None,
    k_norm: nn.Module | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention where query head ``i`` reads KV head ``kv_map[i]``.

    Same steps as transformers' Llama-family attention (projections, optional
    per-head q/k norm, RoPE, cache update, registered attention function,
    output projection); the cache holds each KV head once and the heads are
    gathered for the attention call, which then runs with one query per KV
    head (``module.num_key_value_groups == 1``).
    """
    input_shape = hidden_states.shape[:-1]
    shape = (*input_shape, -1, module.head_dim)
    q = F.linear(hidden_states, weights["q"], weights["q_bias"]).view(shape)
    k = F.linear(hidden_states, weights["k"], weights["k_bias"]).view(shape)
    v = F.linear(hidden_states, weights["v"], weights["v_bias"]).view(shape).transpose(1, 2)
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = position_embeddings
    q, k = _llama.apply_rotary_pos_emb(q, k, cos, sin)
    if cache is not None:
        k, v = cache.update(k, v, module.layer_idx, kwargs=kwargs)
    k, v = k.index_select(1, kv_map), v.index_select(1, kv_map)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation,
                                                      _llama.eager_attention_forward)
    out, attn_weights = interface(
        module, q, k, v, attention_mask,
        dropout=0.0 if not module.training else module.attention_dropout,
        scaling=module.scaling,
        sliding_window=getattr(module, "sliding_window", None),
        **kwargs,
    )
    out = out.reshape(*input_shape, -1).contiguous()
    return F.linear(out, weights["o"], weights["o_bias"]), attn_weights


class PerLayerAttention:
    """transformers' attention built from this layer's resolved config (mixed before the family's class)."""

    def __init__(self, config: Any, layer_idx: int) -> None:
        layer_config = config.per_layer_config[layer_idx]
        super().__init__(layer_config, layer_idx)
        # The global config, so switching the attention implementation reaches this module.
        self.config = config
        kv_map = getattr(layer_config, "kv_head_map", None)
        # A plain tuple, not a buffer: loading materialises modules from the meta device and would
        # leave a non-persistent buffer uninitialised.
        self.kv_head_map = tuple(int(j) for j in kv_map) if kv_map is not None else None
        self._kv_index: dict[torch.device, torch.Tensor] = {}
        if kv_map is not None:
            self.num_key_value_groups = 1

    def forward(self, hidden_states: torch.Tensor, position_embeddings: Any = None, attention_mask: Any = None,
                cache: Any = None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.kv_head_map is None:
            return super().forward(hidden_states, position_embeddings=position_embeddings,
                                   attention_mask=attention_mask, cache=cache, **kwargs)
        w = {"q": self.q_proj.weight, "q_bias": self.q_proj.bias, "k": self.k_proj.weight, "k_bias": self.k_proj.bias,
             "v": self.v_proj.weight, "v_bias": self.v_proj.bias, "o": self.o_proj.weight, "o_bias": self.o_proj.bias}
        index = self._kv_index.get(hidden_states.device)
        if index is None:
            index = self._kv_index[hidden_states.device] = torch.tensor(self.kv_head_map, device=hidden_states.device)
        return attend_mapped(self, hidden_states, position_embeddings, attention_mask, cache, w,
                             index, getattr(self, "q_norm", None), getattr(self, "k_norm", None), **kwargs)


class PerLayerDecoderLayer:
    """A decoder layer whose attention and MLP follow ``config.per_layer_config[layer_idx]``.

    Family classes set ``arch`` (the :class:`~gisp.architectures.base.Architecture`
    subclass), ``attention_class``, ``mlp_class`` and ``norm_class``, and may
    override :meth:`build_blocks`, :meth:`attention_block` and :meth:`mlp_block`
    where their layer differs from Llama's (norms after each block, say).
    """

    arch: type
    attention_class: type
    mlp_class: type
    norm_class: type

    def __init__(self, config: Any, layer_idx: int) -> None:
        GradientCheckpointingLayer.__init__(self)
        lc = config.per_layer_config[layer_idx]
        skip = set(getattr(lc, "skip", []) or [])
        arch = self.arch(config)
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        for name in (*arch.attention_modules, *arch.mlp_modules):
            setattr(self, name, None)
        self.skipped_attn_bias = self.skipped_mlp_bias = None
        if "self_attn" in skip:
            if arch.has_o_bias(lc):
                self.skipped_attn_bias = nn.Parameter(torch.zeros(config.hidden_size))
        else:
            self.build_attention(config, lc, layer_idx)
        if "mlp" in skip:
            if arch.has_down_bias(lc):
                self.skipped_mlp_bias = nn.Parameter(torch.zeros(config.hidden_size))
        else:
            self.build_mlp(config, lc)

    def build_attention(self, config: Any, layer_config: Any, layer_idx: int) -> None:
        self.self_attn = self.attention_class(config, layer_idx)
        self.input_layernorm = self.norm_class(config.hidden_size, eps=config.rms_norm_eps)

    def build_mlp(self, config: Any, layer_config: Any) -> None:
        self.mlp = self.mlp_class(layer_config)
        self.post_attention_layernorm = self.norm_class(config.hidden_size, eps=config.rms_norm_eps)

    def attention_block(self, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """What the attention block adds to the residual stream."""
        out, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
        return out

    def mlp_block(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """What the MLP block adds to the residual stream."""
        return self.mlp(self.post_attention_layernorm(hidden_states))

    def forward(self, hidden_states: torch.Tensor, attention_mask: Any = None, position_ids: Any = None,
                cache: Any = None, use_cache: bool | None = False, position_embeddings: Any = None,
                **kwargs: Any) -> torch.Tensor:
        if self.self_attn is not None and self.mlp is not None:
            return super().forward(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                   cache=cache, use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
        if self.self_attn is not None:
            hidden_states = hidden_states + self.attention_block(
                hidden_states, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
        else:
            if cache is not None:
                release_kv_slot(cache, self.layer_idx)
            if self.skipped_attn_bias is not None:
                hidden_states = hidden_states + self.skipped_attn_bias
        if self.mlp is not None:
            hidden_states = hidden_states + self.mlp_block(hidden_states)
        elif self.skipped_mlp_bias is not None:
            hidden_states = hidden_states + self.skipped_mlp_bias
        return hidden_states


class PerLayerModel:
    """The decoder stack with per-layer widths; its forward is transformers' own.

    Family classes set ``layer_class``, ``norm_class`` and ``rotary_class``, and
    may override :meth:`build_embeddings` (scaled embeddings, say).
    """

    layer_class: type
    norm_class: type
    rotary_class: type

    def __init__(self, config: Any) -> None:
        PreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.build_embeddings(config)
        self.layers = nn.ModuleList([self.layer_class(config, i) for i in range(config.num_hidden_layers)])
        self.norm = self.norm_class(config.hidden_size, eps=config.rms_norm_eps)
        self.build_rotary(config)
        self.gradient_checkpointing = False
        if getattr(config, "layer_types", None) is not None:
            self.has_sliding_layers = "sliding_attention" in config.layer_types
        self.post_init()

    def build_embeddings(self, config: Any) -> None:
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)

    def build_rotary(self, config: Any) -> None:
        self.rotary_emb = self.rotary_class(config=config)


class PerLayerCausalLM:
    """Causal LM head over the per-layer decoder; refuses weights that do not fit its config."""

    model_class: type

    def __init__(self, config: Any) -> None:
        PreTrainedModel.__init__(self, config)
        self.model = self.model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any):
        if Path(str(pretrained_model_name_or_path)).is_dir():
            from gisp.architectures.checkpoints import check_weights_match_config

            check_weights_match_config(pretrained_model_name_or_path)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)


def build_llama_like(arch: type, hf: Any, prefix: str) -> type:
    """The per-layer causal LM class of a family whose modules follow Llama's (``{prefix}Attention``,
    ``{prefix}MLP``, ``{prefix}RMSNorm``, ``{prefix}RotaryEmbedding``, ... in transformers' module ``hf``)."""
    config_class = arch.per_layer_config_class
    name = f"Gisp{prefix}"
    attention = type(f"{name}Attention", (PerLayerAttention, getattr(hf, f"{prefix}Attention")), {})
    layer = type(f"{name}DecoderLayer", (PerLayerDecoderLayer, getattr(hf, f"{prefix}DecoderLayer")), {
        "arch": arch, "attention_class": attention, "mlp_class": getattr(hf, f"{prefix}MLP"),
        "norm_class": getattr(hf, f"{prefix}RMSNorm")})
    no_split = [layer.__name__]
    model = type(f"{name}Model", (PerLayerModel, getattr(hf, f"{prefix}Model")), {
        "config_class": config_class, "_no_split_modules": no_split, "layer_class": layer,
        "norm_class": getattr(hf, f"{prefix}RMSNorm"), "rotary_class": getattr(hf, f"{prefix}RotaryEmbedding")})
    return type(f"{name}ForCausalLM", (PerLayerCausalLM, getattr(hf, f"{prefix}ForCausalLM")), {
        "config_class": config_class, "_no_split_modules": no_split, "model_class": model})
