"""Qwen3: Llama's layout with per-head q/k RMSNorms.

The q/k norms' weight has one entry per head dimension and is shared by all
heads, so removing heads leaves it untouched. ``attention_bias`` gives q/k/v/o
biases.
"""

from __future__ import annotations

from typing import Any

from transformers import Qwen3Config

from gisp.architectures.base import LlamaLike


class Qwen3(LlamaLike):
    model_type = "qwen3"
    config_class = Qwen3Config

    def has_o_bias(self, config: Any) -> bool:
        return bool(getattr(config, "attention_bias", False))
