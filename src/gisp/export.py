"""Deploy many: physically smaller models from one GISP run, exact and loadable.

A trajectory's mask zeroes structures; :func:`export` removes them. Query rows
and output columns of removed heads, key/value rows of KV heads no kept query
head uses, gate/up rows and down columns of removed channels are sliced away,
and a layer whose heads (or channels) are all gone skips that block entirely
(only the residual path remains). The result computes what the masked model
computes, to float rounding.

Format: a Hugging Face directory (safetensors, ``config.json``, tokenizer,
generation config, ``gisp_export.json``). Per-layer widths use transformers'
``per_layer_config`` (``HeterogeneousConfigMixin``): the global config keeps the
base model's widths and each pruned layer overrides ``num_attention_heads``,
``num_key_value_heads``, ``intermediate_size``, ``skip`` (``self_attn`` /
``mlp``) and, for uneven GQA groups, ``kv_head_map``. Such configs have model
type ``gisp_<arch>``; ``import gisp`` registers them with ``AutoConfig`` and
``AutoModelForCausalLM`` (no ``trust_remote_code``). The modules are built from
each layer's resolved config by subclasses of the transformers classes, so
transformers' own attention and MLP code runs with per-layer widths. When every
layer ends with the same standard widths (or ``uniform=True`` makes them so),
the directory is a plain ``llama``/``mistral``/``qwen2``/``qwen3`` checkpoint
that loads without gisp.

GQA: a KV head stays while any query head of its group is kept, so kept query
heads can be spread unevenly over KV heads (e.g. 2, 1 and 3). Two exact ways:

- ``gqa="map"`` (default): keep each KV head once and record per layer which
  KV head every query head reads (``kv_head_map``); smallest weights and KV
  cache, but those layers need gisp's model class.
- ``gqa="duplicate"``: duplicate KV heads until every group has the same size
  (``gcd`` of the group sizes), which is standard grouped-query attention:
  larger k/v weights and KV cache (up to one KV head per query head), no
  custom attention code.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)
from transformers.cache_utils import DummyLayer
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.llama import modeling_llama as _llama
from transformers.models.mistral import modeling_mistral as _mistral
from transformers.models.qwen2 import modeling_qwen2 as _qwen2
from transformers.models.qwen3 import modeling_qwen3 as _qwen3

from gisp.adapters import get_adapter
from gisp.errors import GispError
from gisp.provenance import atomic_write_text, versions
from gisp.run.trajectory import Trajectory
from gisp.structures import Layout, Mask

if TYPE_CHECKING:  # gisp.baselines imports this module
    from gisp.baselines.compensation import Compensation

EXPORT_FILE = "gisp_export.json"
EXPORT_FORMAT = 1
GQA_MODES = ("map", "duplicate")

# =============================================================================
# Model classes: transformers' Llama/Mistral/Qwen2/Qwen3 built layer by layer
# =============================================================================


def _release_kv_slot(cache: Any, layer_idx: int) -> None:
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


def _has_o_bias(arch: str, config: Any) -> bool:
    return arch in ("llama", "qwen3") and bool(getattr(config, "attention_bias", False))


def _has_down_bias(arch: str, config: Any) -> bool:
    return arch == "llama" and bool(getattr(config, "mlp_bias", False))


class _GispConfigMixin:
    """Per-layer widths live in ``per_layer_config``; ``head_dim`` is always explicit."""

    def validate_architecture(self) -> None:
        for i, lc in enumerate(self.per_layer_config):
            h, kv = lc.num_attention_heads, lc.num_key_value_heads
            skip = set(getattr(lc, "skip", []) or [])
            if "self_attn" in skip:
                continue
            kv_map = getattr(lc, "kv_head_map", None)
            if h < 1 or kv < 1:
                raise ValueError(f"layer {i}: attention needs at least one head, or skip=['self_attn']")
            if kv_map is not None:
                if len(kv_map) != h or sorted(set(kv_map)) != list(range(kv)):
                    raise ValueError(f"layer {i}: kv_head_map must give each of {h} query heads one of {kv} KV heads")
            elif h % kv:
                raise ValueError(f"layer {i}: {h} query heads do not split into {kv} KV groups; give kv_head_map")


@strict
class GispLlamaConfig(_GispConfigMixin, LlamaConfig):
    """A Llama whose layers may differ in widths (see :mod:`gisp.export`)."""

    model_type = "gisp_llama"
    kv_head_map: list[int] | None = None


@strict
class GispMistralConfig(_GispConfigMixin, MistralConfig):
    """A Mistral whose layers may differ in widths (see :mod:`gisp.export`)."""

    model_type = "gisp_mistral"
    kv_head_map: list[int] | None = None


@strict
class GispQwen2Config(_GispConfigMixin, Qwen2Config):
    """A Qwen2 whose layers may differ in widths (see :mod:`gisp.export`)."""

    model_type = "gisp_qwen2"
    kv_head_map: list[int] | None = None


@strict
class GispQwen3Config(_GispConfigMixin, Qwen3Config):
    """A Qwen3 whose layers may differ in widths (see :mod:`gisp.export`)."""

    model_type = "gisp_qwen3"
    kv_head_map: list[int] | None = None


class _GispAttentionMixin:
    """transformers' attention built from this layer's resolved config."""

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


class GispLlamaAttention(_GispAttentionMixin, _llama.LlamaAttention):
    pass


class GispMistralAttention(_GispAttentionMixin, _mistral.MistralAttention):
    pass


class GispQwen2Attention(_GispAttentionMixin, _qwen2.Qwen2Attention):
    pass


class GispQwen3Attention(_GispAttentionMixin, _qwen3.Qwen3Attention):
    pass


class _GispDecoderLayerMixin:
    """A decoder layer whose attention and MLP follow ``config.per_layer_config[layer_idx]``.

    ``skip`` lists blocks that are absent: the layer then runs only the
    residual path for that block (plus the block's output bias, if the
    architecture has one, which is what the masked model adds).
    """

    _arch: str
    _attention_cls: type
    _mlp_cls: type
    _norm_cls: type

    def __init__(self, config: Any, layer_idx: int) -> None:
        GradientCheckpointingLayer.__init__(self)
        lc = config.per_layer_config[layer_idx]
        skip = set(getattr(lc, "skip", []) or [])
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.self_attn = self.input_layernorm = self.mlp = self.post_attention_layernorm = None
        self.skipped_attn_bias = self.skipped_mlp_bias = None
        if "self_attn" in skip:
            if _has_o_bias(self._arch, lc):
                self.skipped_attn_bias = nn.Parameter(torch.zeros(config.hidden_size))
        else:
            self.self_attn = self._attention_cls(config, layer_idx)
            self.input_layernorm = self._norm_cls(config.hidden_size, eps=config.rms_norm_eps)
        if "mlp" in skip:
            if _has_down_bias(self._arch, lc):
                self.skipped_mlp_bias = nn.Parameter(torch.zeros(config.hidden_size))
        else:
            self.mlp = self._mlp_cls(lc)
            self.post_attention_layernorm = self._norm_cls(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, attention_mask: Any = None, position_ids: Any = None,
                cache: Any = None, use_cache: bool | None = False, position_embeddings: Any = None,
                **kwargs: Any) -> torch.Tensor:
        if self.self_attn is not None and self.mlp is not None:
            return super().forward(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                   cache=cache, use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
        if self.self_attn is not None:
            attn, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), attention_mask=attention_mask,
                                     position_ids=position_ids, cache=cache, use_cache=use_cache,
                                     position_embeddings=position_embeddings, **kwargs)
            hidden_states = hidden_states + attn
        else:
            if cache is not None:
                _release_kv_slot(cache, self.layer_idx)
            if self.skipped_attn_bias is not None:
                hidden_states = hidden_states + self.skipped_attn_bias
        if self.mlp is not None:
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        elif self.skipped_mlp_bias is not None:
            hidden_states = hidden_states + self.skipped_mlp_bias
        return hidden_states


class GispLlamaDecoderLayer(_GispDecoderLayerMixin, _llama.LlamaDecoderLayer):
    _arch, _attention_cls, _mlp_cls, _norm_cls = "llama", GispLlamaAttention, _llama.LlamaMLP, _llama.LlamaRMSNorm


class GispMistralDecoderLayer(_GispDecoderLayerMixin, _mistral.MistralDecoderLayer):
    _arch, _attention_cls, _mlp_cls, _norm_cls = ("mistral", GispMistralAttention, _mistral.MistralMLP,
                                                  _mistral.MistralRMSNorm)


class GispQwen2DecoderLayer(_GispDecoderLayerMixin, _qwen2.Qwen2DecoderLayer):
    _arch, _attention_cls, _mlp_cls, _norm_cls = "qwen2", GispQwen2Attention, _qwen2.Qwen2MLP, _qwen2.Qwen2RMSNorm


class GispQwen3DecoderLayer(_GispDecoderLayerMixin, _qwen3.Qwen3DecoderLayer):
    _arch, _attention_cls, _mlp_cls, _norm_cls = "qwen3", GispQwen3Attention, _qwen3.Qwen3MLP, _qwen3.Qwen3RMSNorm


class _GispModelMixin:
    """The decoder stack with per-layer widths; forward is transformers' own."""

    _layer_cls: type
    _norm_cls: type
    _rotary_cls: type

    def __init__(self, config: Any) -> None:
        PreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([self._layer_cls(config, i) for i in range(config.num_hidden_layers)])
        self.norm = self._norm_cls(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = self._rotary_cls(config=config)
        self.gradient_checkpointing = False
        if getattr(config, "layer_types", None) is not None:
            self.has_sliding_layers = "sliding_attention" in config.layer_types
        self.post_init()


class _GispCausalLMMixin:
    """Causal LM head over the per-layer decoder; refuses weights that do not fit its config."""

    _model_cls: type

    def __init__(self, config: Any) -> None:
        PreTrainedModel.__init__(self, config)
        self.model = self._model_cls(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any):
        if Path(str(pretrained_model_name_or_path)).is_dir():
            check_weights_match_config(pretrained_model_name_or_path)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)


class GispLlamaModel(_GispModelMixin, _llama.LlamaModel):
    config_class = GispLlamaConfig
    _no_split_modules = ["GispLlamaDecoderLayer"]
    _layer_cls, _norm_cls, _rotary_cls = GispLlamaDecoderLayer, _llama.LlamaRMSNorm, _llama.LlamaRotaryEmbedding


class GispMistralModel(_GispModelMixin, _mistral.MistralModel):
    config_class = GispMistralConfig
    _no_split_modules = ["GispMistralDecoderLayer"]
    _layer_cls, _norm_cls, _rotary_cls = (GispMistralDecoderLayer, _mistral.MistralRMSNorm,
                                          _mistral.MistralRotaryEmbedding)


class GispQwen2Model(_GispModelMixin, _qwen2.Qwen2Model):
    config_class = GispQwen2Config
    _no_split_modules = ["GispQwen2DecoderLayer"]
    _layer_cls, _norm_cls, _rotary_cls = GispQwen2DecoderLayer, _qwen2.Qwen2RMSNorm, _qwen2.Qwen2RotaryEmbedding


class GispQwen3Model(_GispModelMixin, _qwen3.Qwen3Model):
    config_class = GispQwen3Config
    _no_split_modules = ["GispQwen3DecoderLayer"]
    _layer_cls, _norm_cls, _rotary_cls = GispQwen3DecoderLayer, _qwen3.Qwen3RMSNorm, _qwen3.Qwen3RotaryEmbedding


class GispLlamaForCausalLM(_GispCausalLMMixin, _llama.LlamaForCausalLM):
    config_class = GispLlamaConfig
    _no_split_modules = ["GispLlamaDecoderLayer"]
    _model_cls = GispLlamaModel


class GispMistralForCausalLM(_GispCausalLMMixin, _mistral.MistralForCausalLM):
    config_class = GispMistralConfig
    _no_split_modules = ["GispMistralDecoderLayer"]
    _model_cls = GispMistralModel


class GispQwen2ForCausalLM(_GispCausalLMMixin, _qwen2.Qwen2ForCausalLM):
    config_class = GispQwen2Config
    _no_split_modules = ["GispQwen2DecoderLayer"]
    _model_cls = GispQwen2Model


class GispQwen3ForCausalLM(_GispCausalLMMixin, _qwen3.Qwen3ForCausalLM):
    config_class = GispQwen3Config
    _no_split_modules = ["GispQwen3DecoderLayer"]
    _model_cls = GispQwen3Model


# base model_type -> (standard config class, gisp config class, gisp causal LM class)
FAMILIES: dict[str, tuple[type, type, type]] = {
    "llama": (LlamaConfig, GispLlamaConfig, GispLlamaForCausalLM),
    "mistral": (MistralConfig, GispMistralConfig, GispMistralForCausalLM),
    "qwen2": (Qwen2Config, GispQwen2Config, GispQwen2ForCausalLM),
    "qwen3": (Qwen3Config, GispQwen3Config, GispQwen3ForCausalLM),
}


def _register() -> None:
    for _std, cfg_cls, model_cls in FAMILIES.values():
        AutoConfig.register(cfg_cls.model_type, cfg_cls, exist_ok=True)
        AutoModelForCausalLM.register(cfg_cls, model_cls, exist_ok=True)


_register()

# =============================================================================
# Loading and checking exported directories
# =============================================================================


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [f.name for f in sorted(path.glob("*.safetensors"))]
    if not files:
        raise GispError(f"{path} has no safetensors weights: re-export the model")
    shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
        try:
            with safe_open(str(path / name), framework="pt") as f:
                for key in f.keys():
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except Exception as e:  # truncated or corrupt file
            raise GispError(f"{path / name} is not a readable safetensors file ({type(e).__name__}): "
                            "re-export the model") from e
    return shapes


def check_weights_match_config(path: str | Path) -> None:
    """Refuse a directory whose weights do not have the shapes its ``config.json`` describes.

    transformers would otherwise initialise missing or mismatched tensors at
    random with only a warning, which is how peers' pruned checkpoints fail.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise GispError(f"{path} is not a model directory (no config.json): give the directory gisp export wrote")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
        raise GispError(f"{path}/config.json is not a valid model config ({first}): re-export the model") from e
    from transformers.initialization import no_init_weights

    with torch.device("meta"), no_init_weights():
        model = AutoModelForCausalLM.from_config(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    found = _safetensors_shapes(path)
    for key, shape in expected.items():
        if key not in found:
            if key in tied:
                continue
            raise GispError(f"{path}: weights lack '{key}' that config.json requires: the directory is incomplete "
                            "or was edited; re-export the model")
        if found[key] != shape:
            raise GispError(f"{path}: '{key}' has shape {list(found[key])} but config.json implies {list(shape)}: "
                            "weights and config do not match; re-export the model")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise GispError(f"{path}: weights hold '{extra[0]}' that config.json does not describe: weights and config "
                        "do not match; re-export the model")


def load_pretrained(path: str | Path, *, dtype: str = "auto", device: str = "auto", tokenizer: bool = True):
    """Load an exported directory (gisp or plain format) after checking weights against config.

    Returns a :class:`gisp.loading.LoadedModel`; the tokenizer is ``None`` when
    the directory has none.
    """
    from gisp.loading import LoadedModel, _silence_hf, resolve_device, resolve_dtype

    _silence_hf()
    path = Path(path)
    check_weights_match_config(path)
    dev = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, dev))
    model.to(dev).eval()
    tok = None
    if tokenizer and any(path.glob("tokenizer*")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
    return LoadedModel(model, tok, str(path), str(path))


# =============================================================================
# Which structures to keep: the trajectory's order, rounding, uniform shapes
# =============================================================================

_UNRANKED = 1e15  # keep-priority of structures the run never removed (above every global order)


@dataclass
class Ranking:
    """Keep-priority of every head and channel (higher = kept longer).

    A structure the run removed has its global pruning order; one it never
    removed ranks above all of them. Among never-removed structures (all of a
    protected layer's) the trajectory gives no order; where one is needed
    (``uniform``) a data-free weight-magnitude proxy breaks the tie.
    """

    heads: list[torch.Tensor]
    channels: list[torch.Tensor]
    head_ranked: list[torch.Tensor]
    channel_ranked: list[torch.Tensor]

    @classmethod
    def from_trajectory(cls, traj: Trajectory, model: nn.Module | None = None) -> Ranking:
        proxy = _magnitude_proxy(model, traj.layout) if model is not None else None
        heads, chans, hr, cr = [], [], [], []
        for i in range(traj.layout.num_layers):
            for orders, out, ranked, kind in ((traj.head_order[i], heads, hr, 0),
                                              (traj.channel_order[i], chans, cr, 1)):
                o = torch.tensor(orders, dtype=torch.float64)
                is_ranked = o >= 0
                tie = proxy[kind][i] if proxy is not None else -torch.arange(len(orders), dtype=torch.float64)
                tie_rank = torch.empty_like(tie)
                tie_rank[torch.argsort(tie, stable=True)] = torch.arange(len(orders), dtype=torch.float64)
                out.append(torch.where(is_ranked, o, _UNRANKED + tie_rank))
                ranked.append(is_ranked)
        return cls(heads, chans, hr, cr)


@torch.no_grad()
def _magnitude_proxy(model: nn.Module, layout: Layout) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Mean |w| per structure (q rows + o columns; gate/up rows + down column)."""
    adapter = get_adapter(model)
    heads, chans = [], []
    for i, layer in enumerate(adapter.layers(model)):
        s = layout.layers[i]
        att, mlp = adapter.attention(layer), adapter.mlp(layer)
        h = att.q.weight.detach().float().abs().view(s.num_heads, -1).mean(1)
        h = h + att.o.weight.detach().float().abs().view(s.hidden, s.num_heads, -1).mean((0, 2))
        c = mlp.gate.weight.detach().float().abs().mean(1) + mlp.up.weight.detach().float().abs().mean(1)
        c = c + mlp.down.weight.detach().float().abs().mean(0)
        heads.append(h.double().cpu())
        chans.append(c.double().cpu())
    return heads, chans


def _head_multiple(round_to: int, head_dim: int) -> int:
    """Heads per step so that the q/o width (heads * head_dim) is a multiple of ``round_to``."""
    return round_to // math.gcd(round_to, head_dim)


def _round_count(kept: torch.Tensor, key: torch.Tensor, ranked: torch.Tensor, multiple: int) -> torch.Tensor:
    """Move one layer's kept count to the nearest multiple along the global order.

    Adds back the last-removed structures or removes the next-ranked ones,
    whichever reaches a multiple with fewer changes (ties: add back). The
    dense width is always allowed; untouched (dense) layers stay as they are.
    """
    n, dense = int(kept.sum()), kept.numel()
    if multiple <= 1 or n == dense or n % multiple == 0:
        return kept
    add_back = torch.nonzero(~kept).flatten()
    add_back = add_back[torch.argsort(key[add_back], descending=True, stable=True)]
    removable = torch.nonzero(kept & ranked).flatten()
    removable = removable[torch.argsort(key[removable], stable=True)]
    lo = n - removable.numel()
    options = [m for m in range((lo + multiple - 1) // multiple * multiple, dense + 1, multiple)] + [dense]
    target = min(options, key=lambda m: (abs(m - n), -m))
    out = kept.clone()
    if target > n:
        out[add_back[: target - n]] = True
    else:
        out[removable[: n - target]] = False
    return out


def round_mask(mask: Mask, layout: Layout, ranking: Ranking, round_to: int) -> Mask:
    """Per-layer head and channel counts made multiples of ``round_to`` (see :func:`_round_count`).

    Channel counts become multiples of ``round_to``; head counts multiples of
    ``round_to / gcd(round_to, head_dim)``, so every projection width is a
    multiple of ``round_to``.
    """
    if round_to < 1:
        raise GispError(f"--round-to must be a positive integer, got {round_to}")
    out = mask.clone()
    for i, s in enumerate(layout.layers):
        out.heads[i] = _round_count(mask.heads[i], ranking.heads[i], ranking.head_ranked[i],
                                    _head_multiple(round_to, s.head_dim))
        out.channels[i] = _round_count(mask.channels[i], ranking.channels[i], ranking.channel_ranked[i], round_to)
    return out


def _plain_config_ok(std_cls: type, base_config: Any, heads: int, kv: int, channels: int) -> bool:
    d = _base_config_dict(base_config)
    d.update(num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=channels)
    try:
        std_cls(**d)
    except Exception:
        return False
    return True


def uniform_mask(mask: Mask, layout: Layout, ranking: Ranking, base_config: Any, round_to: int | None = None) -> Mask:
    """One shape for every layer, close to ``mask``'s parameter count: a standard checkpoint.

    Every layer keeps the same number of KV heads with the same number of query
    heads in each (closest to the mean kept heads and KV heads of ``mask``) and
    the same number of channels (chosen so the total decoder parameters match
    ``mask``). Within a layer the structures kept are the ones the global order
    removed last. Protected layers are cut to the same shape, and structures
    the run never ranked are chosen by a weight-magnitude proxy: this departs
    from GISP's protection, which is the price of a plain architecture.
    """
    s0 = layout.layers[0]
    if any((s.num_heads, s.num_kv_heads, s.intermediate, s.head_dim) != (s0.num_heads, s0.num_kv_heads,
                                                                          s0.intermediate, s0.head_dim)
           for s in layout.layers):
        raise GispError("--uniform needs a base model whose layers all have the same widths")
    kvh, g, L = s0.num_kv_heads, s0.group_size, layout.num_layers
    std_cls = FAMILIES[base_config.model_type][0]
    mean_heads = sum(int(h.sum()) for h in mask.heads) / L
    mean_kv = sum(int(mask.kv_heads(layout, i).sum()) for i in range(L)) / L
    hm = _head_multiple(round_to, s0.head_dim) if round_to else 1
    shapes = [(kv, k) for kv in range(1, kvh + 1) for k in range(1, g + 1)
              if (kv * k) % hm == 0 and _plain_config_ok(std_cls, base_config, kv * k, kv, 1)]
    if not shapes:
        raise GispError(f"no uniform head count fits --round-to {round_to} for this model: use a smaller --round-to")
    kv_keep, k = min(shapes, key=lambda x: (abs(x[0] * x[1] - mean_heads), abs(x[0] - mean_kv), -x[0] * x[1]))
    target = mask.kept_params(layout)
    attn = sum(s.params(kv_keep * k, kv_keep, 0) for s in layout.layers)
    per_channel = s0.params(0, 0, 2) - s0.params(0, 0, 1)
    c = round((target - attn - L * (s0.params(0, 0, 1) - per_channel)) / (L * per_channel))
    c = max(1, min(s0.intermediate, c))
    if round_to and s0.intermediate >= round_to:
        c = min(s0.intermediate, max(round_to, round(c / round_to) * round_to))
    out = Mask.dense(layout)
    for i in range(L):
        key = ranking.heads[i].view(kvh, g)
        groups = torch.argsort(key.max(dim=1).values, descending=True, stable=True)[:kv_keep]
        keep = torch.zeros(kvh, g, dtype=torch.bool)
        for grp in groups.tolist():
            keep[grp, torch.argsort(key[grp], descending=True, stable=True)[:k]] = True
        out.heads[i] = keep.flatten()
        ch = torch.zeros(s0.intermediate, dtype=torch.bool)
        ch[torch.argsort(ranking.channels[i], descending=True, stable=True)[:c]] = True
        out.channels[i] = ch
    return out


# =============================================================================
# Slicing
# =============================================================================


@dataclass
class LayerPlan:
    """What one exported layer keeps, in export order (indices into the base layer)."""

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


def _head_rows(heads: Sequence[int], d: int) -> torch.Tensor:
    idx = torch.tensor(list(heads), dtype=torch.long)
    return (idx[:, None] * d + torch.arange(d)).flatten()


def _numel(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def count_params(model: nn.Module, layout: Layout, plans: Sequence[LayerPlan]) -> int:
    """Parameters of the exported model (embeddings, norms and lm_head included, tied weights once)."""
    adapter = get_adapter(model)
    total = sum(p.numel() for p in model.parameters())
    for i, (layer, plan) in enumerate(zip(adapter.layers(model), plans)):
        s = layout.layers[i]
        att, mlp = adapter.attention(layer), adapter.mlp(layer)
        d, hdn = s.head_dim, s.hidden
        total -= _numel(layer.self_attn) + _numel(layer.input_layernorm) + _numel(layer.mlp)
        total -= _numel(layer.post_attention_layernorm)
        if plan.heads:
            total += len(plan.heads) * d * hdn * 2 + 2 * len(plan.kv_heads) * d * hdn
            total += (len(plan.heads) + 2 * len(plan.kv_heads)) * d if s.qkv_bias else 0
            total += hdn if s.o_bias else 0
            total += _numel(layer.self_attn) - sum(_numel(p) for p in (att.q, att.k, att.v, att.o))
            total += _numel(layer.input_layernorm)
        elif att.o.bias is not None:
            total += hdn
        if plan.channels:
            total += 3 * len(plan.channels) * hdn + ((2 * len(plan.channels) + hdn) if s.mlp_bias else 0)
            total += _numel(layer.mlp) - sum(_numel(p) for p in (mlp.gate, mlp.up, mlp.down))
            total += _numel(layer.post_attention_layernorm)
        elif mlp.down.bias is not None:
            total += hdn
    return total


def _base_config_dict(config: Any) -> dict[str, Any]:
    d = config.to_dict()
    for k in ("model_type", "architectures", "transformers_version", "_name_or_path", "per_layer_config",
              "quantization_config", "kv_head_map", "auto_map"):
        d.pop(k, None)
    d["head_dim"] = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    return d


def slim_config(base_config: Any, plans: Sequence[LayerPlan]) -> Any:
    """A standard config when all layers share standard widths, else a ``gisp_<arch>`` per-layer config."""
    arch = base_config.model_type
    if arch not in FAMILIES:
        raise GispError(f"gisp export supports {', '.join(FAMILIES)} models, not '{arch}'")
    std_cls, gisp_cls, _ = FAMILIES[arch]
    d = _base_config_dict(base_config)
    shapes = {(len(p.heads), len(p.kv_heads), len(p.channels)) for p in plans}
    if len(shapes) == 1 and all(p.kv_map is None for p in plans):
        h, kv, c = shapes.pop()
        if h and c:
            try:
                return std_cls(**{**d, "num_attention_heads": h, "num_key_value_heads": kv, "intermediate_size": c})
            except Exception:
                pass  # e.g. Llama insists hidden_size % heads == 0: fall back to the per-layer format
    per_layer = {i: p.overrides for i, p in enumerate(plans)}
    return gisp_cls(**d, per_layer_config=per_layer)


@torch.no_grad()
def slim_state_dict(model: nn.Module, layout: Layout, plans: Sequence[LayerPlan]) -> dict[str, torch.Tensor]:
    """The base model's tensors with removed rows/columns (and empty blocks) dropped."""
    adapter = get_adapter(model)
    names = {id(m): n for n, m in model.named_modules()}
    drop: list[str] = []
    sliced: dict[str, torch.Tensor] = {}
    for i, (layer, plan) in enumerate(zip(adapter.layers(model), plans)):
        s = layout.layers[i]
        att, mlp = adapter.attention(layer), adapter.mlp(layer)
        prefix = names[id(layer)]
        if plan.heads:
            q_rows, kv_rows = _head_rows(plan.heads, s.head_dim), _head_rows(plan.kv_heads, s.head_dim)
            for proj, rows in ((att.q, q_rows), (att.k, kv_rows), (att.v, kv_rows)):
                sliced[names[id(proj)] + ".weight"] = proj.weight.index_select(0, rows)
                if proj.bias is not None:
                    sliced[names[id(proj)] + ".bias"] = proj.bias.index_select(0, rows)
            sliced[names[id(att.o)] + ".weight"] = att.o.weight.index_select(1, q_rows)
        else:
            drop += [prefix + ".self_attn.", prefix + ".input_layernorm."]
            if att.o.bias is not None:
                sliced[prefix + ".skipped_attn_bias"] = att.o.bias.clone()
        if plan.channels:
            ch = torch.tensor(plan.channels, dtype=torch.long)
            for proj in (mlp.gate, mlp.up):
                sliced[names[id(proj)] + ".weight"] = proj.weight.index_select(0, ch)
                if proj.bias is not None:
                    sliced[names[id(proj)] + ".bias"] = proj.bias.index_select(0, ch)
            sliced[names[id(mlp.down)] + ".weight"] = mlp.down.weight.index_select(1, ch)
        else:
            drop += [prefix + ".mlp.", prefix + ".post_attention_layernorm."]
            if mlp.down.bias is not None:
                sliced[prefix + ".skipped_mlp_bias"] = mlp.down.bias.clone()
    out = {}
    for k, v in model.state_dict().items():
        if k in sliced or any(k.startswith(p) for p in drop):
            continue
        out[k] = v
    out.update(sliced)
    return out


def _config_with_biases(config: Any) -> Any:
    """A Llama config whose attention and MLP carry biases (q/k/v/o, gate/up/down): where exported
    compensation lives. Other families have no switch for an o_proj/down_proj bias."""
    if config.model_type != "llama":
        raise GispError(f"bias compensation (FLAP) can be exported for llama models only, not "
                        f"'{config.model_type}': evaluate the masked level with gisp eval instead")
    out = type(config).from_dict(config.to_dict())
    out.attention_bias = True
    out.mlp_bias = True
    return out


@torch.no_grad()
def compensation_biases(model: nn.Module, plans: Sequence[LayerPlan], state: dict[str, torch.Tensor],
                        compensation: Compensation) -> dict[str, torch.Tensor]:
    """Bias tensors of a compensated export: zero q/k/v/gate/up biases, o_proj/down_proj biases equal to
    the compensation (added to any bias the base model has), and the same for fully removed blocks."""
    adapter = get_adapter(model)
    names = {id(m): n for n, m in model.named_modules()}
    dtype = next(model.parameters()).dtype
    out: dict[str, torch.Tensor] = {}

    def put(key: str, size: int, extra: torch.Tensor | None = None) -> None:
        b = state[key].clone() if key in state else torch.zeros(size, dtype=dtype)
        out[key] = b if extra is None else b + extra.to(dtype)

    for i, (layer, plan) in enumerate(zip(adapter.layers(model), plans)):
        att, mlp = adapter.attention(layer), adapter.mlp(layer)
        hidden, d = att.o.weight.shape[0], adapter.head_dim
        prefix = names[id(layer)]
        o_comp, down_comp = compensation.bias_for(i, "o"), compensation.bias_for(i, "down")
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
               compensation: Compensation | None = None) -> nn.Module:
    """A physically smaller copy of ``model`` keeping exactly ``mask``'s structures (the model is untouched).

    ``compensation`` (:class:`gisp.baselines.Compensation`, FLAP) becomes real o_proj/down_proj biases:
    the export then declares ``attention_bias``/``mlp_bias`` (a standard Llama option) with zero q/k/v and
    gate/up biases, so it loads in any Llama loader.
    """
    from transformers.initialization import no_init_weights

    layout = Layout.from_model(model)
    plans = plan_layers(mask, layout, gqa)
    config = slim_config(model.config if compensation is None else _config_with_biases(model.config), plans)
    state = slim_state_dict(model, layout, plans)
    if compensation is not None:
        state.update(compensation_biases(model, plans, state, compensation))
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


# =============================================================================
# Levels, budgets and the export itself
# =============================================================================


@dataclass
class Level:
    """One deployable model of a run: a step, possibly rounded or made uniform."""

    step: int
    sparsity: float
    params: int
    size_bytes: int
    mask: Mask = field(repr=False)
    step_sparsity: float = 0.0
    ppl: float | None = None
    ppl_protocol: str | None = None

    def to_row(self) -> dict[str, Any]:
        return {"step": self.step, "sparsity": self.sparsity, "step_sparsity": self.step_sparsity,
                "params": self.params, "size_bytes": self.size_bytes, "ppl": self.ppl,
                "ppl_protocol": self.ppl_protocol}


def parse_params(text: str | int | float) -> int:
    """``"90M"`` -> 90_000_000 (k, M, B/G suffixes; plain numbers too)."""
    if isinstance(text, int | float):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbBgG]?)\s*", str(text))
    if not m:
        raise GispError(f"--max-params takes a count like 90M, 1.2B or 500000; got '{text}'")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def known_perplexities(run_dir: str | Path | None) -> dict[int, tuple[float, str]]:
    """Perplexities that ``gisp eval`` recorded for this run (``RUN/eval.json``), by step."""
    if run_dir is None:
        return {}
    file = Path(run_dir) / "eval.json"
    if not file.is_file():
        return {}
    try:
        entries = json.loads(file.read_text()).get("entries", [])
    except (json.JSONDecodeError, AttributeError):
        return {}
    out: dict[int, tuple[float, str]] = {}
    for e in entries:
        row, proto = e.get("row", {}), e.get("protocol", {})
        ppl = row.get("ppl")
        if isinstance(ppl, dict):
            ppl = ppl.get("ppl")
        if isinstance(ppl, int | float) and isinstance(row.get("step"), int):
            out[row["step"]] = (float(ppl), f"{proto.get('ppl_source')}/{proto.get('window')}")
    return out


def _adjust(mask: Mask, layout: Layout, ranking: Ranking | None, base_config: Any, round_to: int | None,
            uniform: bool) -> Mask:
    if uniform:
        return uniform_mask(mask, layout, ranking, base_config, round_to)
    if round_to and round_to > 1:
        return round_mask(mask, layout, ranking, round_to)
    return mask


def levels(
    traj: Trajectory,
    model: nn.Module,
    *,
    round_to: int | None = None,
    uniform: bool = False,
    gqa: str = "map",
    dtype: torch.dtype | None = None,
    run_dir: str | Path | None = None,
) -> list[Level]:
    """Every step of the run as an exportable model: sparsity, parameters, bytes (and ppl if known)."""
    layout = traj.layout
    ranking = Ranking.from_trajectory(traj, model if uniform else None) if (uniform or round_to) else None
    elem = torch.empty(0, dtype=dtype or next(model.parameters()).dtype).element_size()
    ppl = known_perplexities(run_dir)
    out = []
    for rec in traj.steps:
        mask = _adjust(traj.mask_at_step(rec["step"]), layout, ranking, model.config, round_to, uniform)
        params = count_params(model, layout, plan_layers(mask, layout, gqa))
        p = ppl.get(rec["step"]) if not (uniform or round_to) else None
        out.append(Level(rec["step"], mask.sparsity(layout), params, params * elem, mask, rec["sparsity"],
                         p[0] if p else None, p[1] if p else None))
    return out


def select_level(
    all_levels: Sequence[Level],
    traj: Trajectory,
    *,
    sparsity: float | None = None,
    step: int | None = None,
    max_params: str | int | None = None,
    max_size_gb: float | None = None,
) -> Level:
    """The level a budget asks for.

    ``sparsity``/``step`` name a step of the run (the last one at or below the
    sparsity). ``max_params`` / ``max_size_gb`` (1 GB = 1e9 bytes) pick the
    largest model that fits: the earliest step whose export is within budget.
    """
    given = [x is not None for x in (sparsity, step, max_params, max_size_gb)]
    if sum(given) != 1:
        raise GispError("give exactly one of --sparsity, --step, --max-params, --max-size-gb")
    by_step = {lv.step: lv for lv in all_levels}
    if step is not None:
        if step not in by_step:
            raise GispError(f"step {step} is outside this run's steps 0..{traj.last_step}")
        return by_step[step]
    if sparsity is not None:
        return by_step[traj.step_at(sparsity)["step"]]
    if max_params is not None:
        limit, what = parse_params(max_params), "params"
        if limit <= 0:
            raise GispError(f"--max-params must be positive, got {max_params}")
    else:
        if max_size_gb <= 0:
            raise GispError(f"--max-size-gb must be positive, got {max_size_gb}")
        limit, what = int(max_size_gb * 1e9), "size_bytes"
    for lv in sorted(all_levels, key=lambda x: x.step):
        if getattr(lv, what) <= limit:
            return lv
    smallest = min(all_levels, key=lambda x: getattr(x, what))
    shown = f"{smallest.params:,} params" if what == "params" else f"{smallest.size_bytes / 1e9:.4f} GB"
    raise GispError(f"no level of this run fits the budget (smallest is {shown} at step {smallest.step}): "
                    "raise the budget or prune to a higher target")


@dataclass
class ExportResult:
    """Where the export went and what it holds."""

    path: Path
    step: int
    sparsity: float
    step_sparsity: float
    params: int
    size_bytes: int
    plain: bool
    model_type: str
    mask: Mask = field(repr=False)
    adjustment: dict[str, Any] | None = None
    record: dict[str, Any] = field(default_factory=dict, repr=False)


def _copy_tokenizer(tokenizer: Any, source_path: str | None, out: Path) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
        return
    if source_path and Path(source_path).is_dir():
        for f in Path(source_path).iterdir():
            if f.is_file() and f.name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
                shutil.copy2(f, out / f.name)


def save_slim(
    model: nn.Module,
    mask: Mask,
    out: str | Path,
    *,
    gqa: str = "map",
    tokenizer: Any = None,
    source_path: str | None = None,
    record: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    compensation: Compensation | None = None,
) -> tuple[Path, nn.Module]:
    """Slice ``model`` by ``mask`` and write the directory atomically (temp dir, then rename)."""
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise GispError(f"{out} already exists and is not empty: choose another --out or pass --overwrite")
    slim = slim_model(model, mask, gqa=gqa, dtype=dtype, compensation=compensation)
    layout = Layout.from_model(model)
    plans = plan_layers(mask, layout, gqa)
    rec = dict(record or {})
    rec.update({
        "format": EXPORT_FORMAT,
        "gqa": gqa,
        "plain": not slim.config.model_type.startswith("gisp_"),
        "params": sum(p.numel() for p in slim.parameters()),
        "dtype": str(next(slim.parameters()).dtype).replace("torch.", ""),
        "versions": versions(),
        "layers": [{"heads": p.heads, "kv_heads": p.kv_heads, "kv_head_map": p.kv_map, "channels": p.channels}
                   for p in plans],
        "note": "kept indices refer to the base model's layer, in the exported order",
    })
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp"))
    old = None
    try:
        slim.save_pretrained(tmp, safe_serialization=True)
        _copy_tokenizer(tokenizer, source_path, tmp)
        _write_record(tmp / EXPORT_FILE, rec)
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old"))
            os.replace(out, old / "x")
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out, slim


def _write_record(path: Path, rec: dict[str, Any]) -> None:
    """JSON with one line per layer, so thousands of kept indices stay readable."""
    head = json.dumps({k: v for k, v in rec.items() if k != "layers"}, indent=1)
    layers = ",\n".join("  " + json.dumps(layer, separators=(",", ":")) for layer in rec.get("layers", []))
    atomic_write_text(path, head[:-2] + ',\n "layers": [\n' + layers + "\n ]\n}\n")


def export(
    run: str | Path | Trajectory,
    out: str | Path,
    *,
    sparsity: float | None = None,
    step: int | None = None,
    max_params: str | int | None = None,
    max_size_gb: float | None = None,
    round_to: int | None = None,
    uniform: bool = False,
    gqa: str = "map",
    model: nn.Module | None = None,
    tokenizer: Any = None,
    dtype: str | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Write one level of a run as a physically smaller, loadable model directory.

    ``model`` defaults to a fresh load of the run's base model (it must be
    unpruned: its fingerprint is checked). ``round_to`` makes per-layer widths
    multiples of N along the global order; ``uniform`` gives every layer one
    shape so the directory is a plain standard checkpoint. ``gqa`` says how
    uneven GQA groups are written: ``map`` (each KV head once, per-layer
    query-to-KV map, smallest KV cache) or ``duplicate`` (KV heads repeated
    into equal groups: standard attention, larger KV cache); see the module
    docstring. ``dtype`` (fp32/bf16/fp16) converts the weights; default: the
    base model's dtype.
    """
    from gisp.loading import DTYPES, load_model

    traj = run if isinstance(run, Trajectory) else Trajectory.load(run)
    run_dir = None if isinstance(run, Trajectory) else Path(run)
    source_path = None
    if model is None:
        name = traj.model.get("path") or traj.model.get("name")
        if not name or name == "model":
            raise GispError("this run does not record a loadable base model: pass model= (the unpruned base model)")
        saved = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(traj.model.get("weight_dtype"), "fp32")
        loaded = load_model(name, dtype=saved, device="cpu")
        model, tokenizer, source_path = loaded.model, tokenizer or loaded.tokenizer, loaded.path
    traj.check_model(model)
    if dtype is not None and dtype not in DTYPES:
        raise GispError(f"unknown dtype '{dtype}': use one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype] if dtype else None
    all_levels = levels(traj, model, round_to=round_to, uniform=uniform, gqa=gqa, dtype=torch_dtype, run_dir=run_dir)
    level = select_level(all_levels, traj, sparsity=sparsity, step=step, max_params=max_params,
                         max_size_gb=max_size_gb)
    from gisp.baselines.compensation import compensation_for_step

    compensation, comp_path = compensation_for_step(run_dir, level.step)
    if compensation is not None and (uniform or (round_to and round_to > 1)):
        raise GispError("this level carries FLAP's bias compensation, which holds for its exact mask only: "
                        "export it without --uniform/--round-to")
    adjustment = None
    if uniform or (round_to and round_to > 1):
        layout = traj.layout
        before = count_params(model, layout, plan_layers(traj.mask_at_step(level.step), layout, gqa))
        adjustment = {"kind": "uniform" if uniform else "round_to", "round_to": round_to,
                      "params_before": before, "params_after": level.params, "params_delta": level.params - before,
                      "sparsity_before": level.step_sparsity, "sparsity_after": level.sparsity,
                      "protected_structures_removed": _protected_removed(level.mask, layout)}
    record = {
        "source": {"name": traj.model.get("name"), "path": traj.model.get("path"),
                   "fingerprint": traj.model.get("fingerprint"), "model_type": model.config.model_type},
        "run": str(run_dir.resolve()) if run_dir is not None else None,
        "step": level.step,
        "sparsity": level.sparsity,
        "step_sparsity": level.step_sparsity,
        "sparsity_definition": "fraction of decoder-layer linear parameters removed (KV heads counted once)",
        "selection": {"sparsity": sparsity, "step": step, "max_params": max_params, "max_size_gb": max_size_gb},
        "round_to": round_to,
        "uniform": uniform,
        "adjustment": adjustment,
        "prune_config": traj.config,
        "calibration": traj.calibration,
        "compensation": None if comp_path is None else {
            "file": str(comp_path.resolve()), "kind": "FLAP bias compensation",
            "attn_layers": sorted(compensation.attn), "mlp_layers": sorted(compensation.mlp),
            "written_as": "o_proj/down_proj biases (attention_bias=mlp_bias=True, zero q/k/v/gate/up biases)"},
    }
    path, slim = save_slim(model, level.mask, out, gqa=gqa, tokenizer=tokenizer, source_path=source_path,
                           record=record, dtype=torch_dtype, overwrite=overwrite, compensation=compensation)
    params = sum(p.numel() for p in slim.parameters())
    return ExportResult(path, level.step, level.sparsity, level.step_sparsity, params,
                        params * next(slim.parameters()).element_size(), not slim.config.model_type.startswith("gisp_"),
                        slim.config.model_type, level.mask, adjustment, record)


def _protected_removed(mask: Mask, layout: Layout) -> int:
    return sum(int((~mask.heads[i]).sum() + (~mask.channels[i]).sum()) for i in layout.protected)
