"""Qwen2 (Qwen2 / Qwen2.5): Llama's layout with q/k/v biases, which are sliced with their rows."""

from transformers import Qwen2Config

from gisp.architectures.base import LlamaLike


class Qwen2(LlamaLike):
    model_type = "qwen2"
    config_class = Qwen2Config
