"""Fixtures for task tests: SmolLM2's real tokenizer and tiny models over its vocabulary."""

from __future__ import annotations

import pytest
from tests.conftest import tiny_model
from transformers import AutoTokenizer

from gisp.loading import resolve_model_path


@pytest.fixture(scope="session")
def smol_tokenizer():
    """SmolLM2's BPE tokenizer (converted once into the gisp cache); no model weights are loaded."""
    path, _ = resolve_model_path("smollm2-135m")
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="session")
def tiny_lm(smol_tokenizer):
    """A random 2-layer Llama (GQA) with SmolLM2's vocabulary, 128 positions (so long inputs are truncated)."""
    return tiny_model("llama", kv_heads=2, layers=2, vocab=len(smol_tokenizer))


@pytest.fixture(scope="session")
def tiny_lm_long(smol_tokenizer):
    """The same tiny Llama allowed 2048 positions (RoPE needs no more weights), for GSM8K's long prompts."""
    model = tiny_model("llama", kv_heads=2, layers=2, vocab=len(smol_tokenizer))
    model.config.max_position_embeddings = 2048
    return model
