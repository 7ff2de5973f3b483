"""Qwen3: Llama's layout with per-head q/k RMSNorms.

The q/k norms' weight has one entry per head dimension and is shared by all
heads, so removing heads leaves it untouched. ``attention_bias`` gives q/k/v/o
biases.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import Qwen3Config

from gisp.architectures.base import Architecture, PerLayerConfigMixin


@strict
class GispQwen3Config(PerLayerConfigMixin, Qwen3Config):
    """A Qwen3 whose layers may differ in widths (see :mod:`gisp.architectures.perlayer`)."""

    model_type = "gisp_qwen3"
    kv_head_map: list[int] | None = None


class Qwen3(Architecture):
    model_type = "qwen3"
    config_class = Qwen3Config
    per_layer_config_class = GispQwen3Config

    def has_o_bias(self, config: Any) -> bool:
        return bool(getattr(config, "attention_bias", False))

    @classmethod
    @cache
    def causal_lm_class(cls) -> type:
        from transformers.models.qwen3 import modeling_qwen3

        from gisp.architectures.perlayer import build_llama_like

        return build_llama_like(cls, modeling_qwen3, "Qwen3")
