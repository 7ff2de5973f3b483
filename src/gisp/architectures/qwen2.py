"""Qwen2 (Qwen2 / Qwen2.5): Llama's layout with q/k/v biases, which are sliced with their rows."""

from __future__ import annotations

from functools import cache

from huggingface_hub.dataclasses import strict
from transformers import Qwen2Config

from gisp.architectures.base import Architecture, PerLayerConfigMixin


@strict
class GispQwen2Config(PerLayerConfigMixin, Qwen2Config):
    """A Qwen2 whose layers may differ in widths (see :mod:`gisp.architectures.perlayer`)."""

    model_type = "gisp_qwen2"
    kv_head_map: list[int] | None = None


class Qwen2(Architecture):
    model_type = "qwen2"
    config_class = Qwen2Config
    per_layer_config_class = GispQwen2Config

    @classmethod
    @cache
    def causal_lm_class(cls) -> type:
        from transformers.models.qwen2 import modeling_qwen2

        from gisp.architectures.perlayer import build_llama_like

        return build_llama_like(cls, modeling_qwen2, "Qwen2")
