"""Mistral: Llama's layout without biases (its sliding window is a config field the layers keep)."""

from __future__ import annotations

from functools import cache

from huggingface_hub.dataclasses import strict
from transformers import MistralConfig

from gisp.architectures.base import Architecture, PerLayerConfigMixin


@strict
class GispMistralConfig(PerLayerConfigMixin, MistralConfig):
    """A Mistral whose layers may differ in widths (see :mod:`gisp.architectures.perlayer`)."""

    model_type = "gisp_mistral"
    kv_head_map: list[int] | None = None


class Mistral(Architecture):
    model_type = "mistral"
    config_class = MistralConfig
    per_layer_config_class = GispMistralConfig

    @classmethod
    @cache
    def causal_lm_class(cls) -> type:
        from transformers.models.mistral import modeling_mistral

        from gisp.architectures.perlayer import build_llama_like

        return build_llama_like(cls, modeling_mistral, "Mistral")
