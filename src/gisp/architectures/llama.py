"""Llama (Llama-2/3, DeepSeek-R1-Distill-Llama, SmolLM2): the reference layout.

Optional biases: ``attention_bias`` gives q/k/v/o biases, ``mlp_bias`` gives
gate/up/down biases; both switches also let an export carry bias compensation.
"""

from __future__ import annotations

from typing import Any

from transformers import LlamaConfig

from gisp.architectures.base import LlamaLike


class Llama(LlamaLike):
    model_type = "llama"
    config_class = LlamaConfig

    def has_o_bias(self, config: Any) -> bool:
        return bool(getattr(config, "attention_bias", False))

    def has_down_bias(self, config: Any) -> bool:
        return bool(getattr(config, "mlp_bias", False))

    def config_with_output_biases(self, config: Any) -> Any:
        out = type(config).from_dict(config.to_dict())
        out.attention_bias = True
        out.mlp_bias = True
        return out
