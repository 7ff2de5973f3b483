"""Gemma 3 (text checkpoints, ``Gemma3ForCausalLM``, e.g. Gemma 3 270M / 1B).

What differs from Llama's layout:

- four norms per layer: ``input_layernorm`` and ``post_attention_layernorm``
  around the attention, ``pre_feedforward_layernorm`` and
  ``post_feedforward_layernorm`` around the MLP. The post-norms belong to their
  block (an RMSNorm of a zero output is zero, so a removed block adds nothing
  and an export drops the block with its two norms);
- per-head q/k RMSNorms whose weight (one entry per head dimension) is shared
  by all heads, so removing heads leaves it untouched;
- sliding-window and global layers (``layer_types``), each type with its own
  RoPE base; transformers' own text model builds the per-type masks and
  rotary embeddings from the per-layer config, which keeps ``layer_types``;
- scaled embeddings, a GeGLU MLP, ``query_pre_attn_scalar`` scaling and
  optional final-logit softcapping (transformers' Gemma 3 attention does not
  apply ``attn_logit_softcapping``; neither does gisp's).

``attention_bias`` gives q/k/v/o biases (no released Gemma 3 has them). A
removed block's o bias would pass through ``post_attention_layernorm``, which an
export drops with the block, so exporting a level that removes every head of a
layer of such a model is refused; partial head removal is exact.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import Gemma3TextConfig

from gisp.architectures.base import Architecture, PerLayerConfigMixin
from gisp.errors import GispError


@strict
class GispGemma3TextConfig(PerLayerConfigMixin, Gemma3TextConfig):
    """A Gemma 3 text model whose layers may differ in widths (see :mod:`gisp.architectures.perlayer`)."""

    model_type = "gisp_gemma3_text"
    kv_head_map: list[int] | None = None


class Gemma3(Architecture):
    model_type = "gemma3_text"
    config_class = Gemma3TextConfig
    per_layer_config_class = GispGemma3TextConfig
    attention_modules = ("self_attn", "input_layernorm", "post_attention_layernorm")
    mlp_modules = ("mlp", "pre_feedforward_layernorm", "post_feedforward_layernorm")

    def has_o_bias(self, config: Any) -> bool:
        return bool(getattr(config, "attention_bias", False))

    def logits(self, model: Any, hidden: Any) -> Any:
        logits = model.get_output_embeddings()(hidden)
        cap = getattr(model.config, "final_logit_softcapping", None)
        return logits if cap is None else (logits / cap).tanh() * cap

    @classmethod
    @cache
    def causal_lm_class(cls) -> type:
        from transformers.models.gemma3 import modeling_gemma3 as hf

        from gisp.architectures.perlayer import (
            PerLayerAttention,
            PerLayerCausalLM,
            PerLayerDecoderLayer,
            PerLayerModel,
        )

        class GispGemma3Attention(PerLayerAttention, hf.Gemma3Attention):
            pass

        class GispGemma3DecoderLayer(PerLayerDecoderLayer, hf.Gemma3DecoderLayer):
            arch = cls
            attention_class = GispGemma3Attention
            mlp_class = hf.Gemma3MLP
            norm_class = hf.Gemma3RMSNorm

            def __init__(self, config: Any, layer_idx: int) -> None:
                lc = config.per_layer_config[layer_idx]
                if "self_attn" in (getattr(lc, "skip", []) or []) and cls(config).has_o_bias(lc):
                    raise GispError(
                        f"layer {layer_idx} loses all its attention heads, but this Gemma 3 model has attention "
                        "biases: its o bias would pass through a norm the export drops; keep a head in that layer "
                        "(export a lower sparsity) or evaluate the masked level with gisp eval")
                super().__init__(config, layer_idx)

            def build_attention(self, config: Any, layer_config: Any, layer_idx: int) -> None:
                super().build_attention(config, layer_config, layer_idx)
                self.post_attention_layernorm = self.norm_class(config.hidden_size, eps=config.rms_norm_eps)

            def build_mlp(self, config: Any, layer_config: Any) -> None:
                self.mlp = self.mlp_class(layer_config)
                self.pre_feedforward_layernorm = self.norm_class(config.hidden_size, eps=config.rms_norm_eps)
                self.post_feedforward_layernorm = self.norm_class(config.hidden_size, eps=config.rms_norm_eps)

            def attention_block(self, hidden_states: Any, **kwargs: Any) -> Any:
                return self.post_attention_layernorm(super().attention_block(hidden_states, **kwargs))

            def mlp_block(self, hidden_states: Any) -> Any:
                return self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(hidden_states)))

        no_split = [GispGemma3DecoderLayer.__name__]

        class GispGemma3TextModel(PerLayerModel, hf.Gemma3TextModel):
            config_class = GispGemma3TextConfig
            _no_split_modules = no_split
            layer_class = GispGemma3DecoderLayer
            norm_class = hf.Gemma3RMSNorm
            rotary_class = hf.Gemma3RotaryEmbedding

            def build_embeddings(self, config: Any) -> None:
                # The scale is kept in the weights' dtype at run time, as transformers' Gemma 3 does.
                self.embed_tokens = hf.Gemma3TextScaledWordEmbedding(
                    config.vocab_size, config.hidden_size, self.padding_idx, embed_scale=config.hidden_size**0.5)

        class GispGemma3ForCausalLM(PerLayerCausalLM, hf.Gemma3ForCausalLM):
            config_class = GispGemma3TextConfig
            _no_split_modules = no_split
            model_class = GispGemma3TextModel

        return GispGemma3ForCausalLM
