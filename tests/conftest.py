"""Tiny in-process models (every supported architecture, MHA and GQA) and helpers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from gisp.core.calibration import CalibrationSet

VOCAB = 97
ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}
# (architecture, num_kv_heads): MHA (4 kv heads) and GQA (2 kv heads for 4 query heads)
VARIANTS = [(a, kv) for a in ARCHS for kv in (4, 2)]


def tiny_model(arch: str = "llama", kv_heads: int = 2, layers: int = 4, seed: int = 0, vocab: int = VOCAB):
    """A randomly initialised decoder (hidden 64, 4 heads of 16, 96 MLP channels)."""
    config_cls, model_cls = ARCHS[arch]
    torch.manual_seed(seed)
    config = config_cls(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=16, max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    model = model_cls(config).eval()
    with torch.no_grad():  # default init is tiny; larger weights give informative gradients
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
            elif "bias" in name:
                p.normal_(0, 0.1)
    return model


def one_thread_fixture(scope: str = "function"):
    """An autouse fixture that runs a file's tests on one torch thread: tiny models are faster so, far
    steadier on a busy shared 2-core machine, and it is what bit-equality is tested at. Bind it to a
    module-level name: ``one_thread = one_thread_fixture()``."""

    @pytest.fixture(autouse=True, scope=scope)
    def one_thread():
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(n)

    return one_thread


def random_calib(n: int = 10, seq_len: int = 24, seed: int = 0, vocab: int = VOCAB) -> CalibrationSet:
    g = torch.Generator().manual_seed(seed)
    return CalibrationSet([torch.randint(0, vocab, (seq_len,), generator=g) for _ in range(n)], {"name": "random"})


class CharTokenizer:
    """A byte-level stand-in tokenizer for data tests (EOS = 0)."""

    eos_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [1 + (b % (VOCAB - 1)) for b in text.encode()]}


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (converted once into the gisp cache)."""
    import gisp

    return gisp.load_model("smollm2-135m", dtype="fp32", device="cpu")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, smollm2) -> Path:
    """A tiny Llama on disk with SmolLM2's tokenizer: exercises the CLI end to end in seconds."""
    out = tmp_path_factory.mktemp("tiny_llama")
    model = tiny_model("llama", kv_heads=2, layers=5, vocab=len(smollm2.tokenizer))
    model.save_pretrained(out)
    for f in Path(smollm2.path).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)
    return out


# --- tiny models on disk, named every way a user can name a model ------------------------------------------

_BPE_TEXT = [
    "The quick brown fox jumps over the lazy dog. A model of the language reads text and predicts the next word.",
    "In the beginning of the year the city council met to discuss the new park, the roads and the schools.",
    "Water boils at one hundred degrees; the history of science is a history of measurement and of error.",
]


def byte_bpe_tokenizer(vocab: int = 300):
    """A byte-level BPE tokenizer of ``vocab`` tokens, trained in milliseconds: reads any text, is written to
    GGUF by gisp's writer, and transformers converts it back from a GGUF in milliseconds (SmolLM2's 49k
    tokens take half a minute)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_BPE_TEXT * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def save_tiny(out: Path, model, tokenizer) -> Path:
    """``model`` and ``tokenizer`` as a Hugging Face directory."""
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A tiny Llama (4 layers, GQA) with a byte-level BPE tokenizer as a GGUF file that transformers loads."""
    from gisp.deploy.gguf import write_gguf

    tok = byte_bpe_tokenizer()
    model = tiny_model("llama", 2, seed=seed, vocab=len(tok))
    hf = save_tiny(path.with_name(f"{path.stem}.hf{seed}"), model, tok)  # the writer reads the tokenizer here
    write_gguf(model, path, tokenizer_dir=hf, name=f"tiny-{seed}")
    return path


# property tests (hypothesis): bounded and reproducible in `make test`, longer with GISP_HYPOTHESIS_PROFILE=long
def _hypothesis_profiles() -> None:
    import os

    from hypothesis import HealthCheck, settings

    common = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                                                          HealthCheck.filter_too_much]}
    settings.register_profile("ci", max_examples=20, derandomize=True, database=None, print_blob=True, **common)
    settings.register_profile("long", max_examples=200, derandomize=False, database=None, print_blob=True, **common)
    settings.load_profile(os.environ.get("GISP_HYPOTHESIS_PROFILE", "ci"))


_hypothesis_profiles()


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """The property tests' tiny model, run and exports (tests/properties.py), built once per session."""
    from tests.properties import build_world

    return build_world(tmp_path_factory.mktemp("world"))


def pytest_sessionfinish(session, exitstatus):
    """GISP_FUZZ_REPORT=FILE: write the property tests' figures (cases, exits, violations) there."""
    import os

    path = os.environ.get("GISP_FUZZ_REPORT")
    if path:
        from tests.properties import write_figures

        write_figures(path)
