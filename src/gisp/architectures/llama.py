"""Llama (Llama-2/3, DeepSeek-R1-Distill-Llama, SmolLM2): the reference layout.

Optional biases: ``attention_bias`` gives q/k/v/o biases, ``mlp_bias`` gives
gate/up/down biases; both switches also let an export carry bias compensation.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

from gisp.architectures.base import Architecture, PerLayerConfigMixin


@strict
class GispLlamaConfig(PerLayerConfigMixin, LlamaConfig):
    """A Llama whose layers may differ in widths (see :mod:`gisp.architectures.perlayer`)."""

    model_type = "gisp_llama"
    kv_head_map: list[int] | None = None


class Llama(Architecture):
    model_type = "llama"
    config_class = LlamaConfig
    per_layer_config_class = GispLlamaConfig

    def has_o_bias(self, config: Any) -> bool:
        return bool(getattr(config, "attention_bias", False))

    def has_down_bias(self, config: Any) -> bool:
        return bool(getattr(config, "mlp_bias", False))

    def config_with_output_biases(self, config: Any) -> Any:
        out = type(config).from_dict(config.to_dict())
        out.attention_bias = True
        out.mlp_bias = True
        return out

    @classmethod
    @cache
    def causal_lm_class(cls) -> type:
        from transformers.models.llama import modeling_llama

        from gisp.architectures.perlayer import build_llama_like

        return build_llama_like(cls, modeling_llama, "Llama")
