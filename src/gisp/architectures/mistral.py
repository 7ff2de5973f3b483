"""Mistral: Llama's layout without biases (its sliding window is a config field every layer keeps)."""

from transformers import MistralConfig

from gisp.architectures.base import LlamaLike


class Mistral(LlamaLike):
    model_type = "mistral"
    config_class = MistralConfig
