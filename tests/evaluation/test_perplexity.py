"""Perplexity in non-overlapping windows, each scored on its own, with its protocol recorded."""

import math

import pytest
import torch
from tests.conftest import CharTokenizer, tiny_model

from gisp.errors import GispError
from gisp.evaluation.perplexity import perplexity


def test_equals_a_hand_computed_mean_nll(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(f"document {i} about pruning and models, number {i * 7}." for i in range(60)))
    model = tiny_model("llama", 2)
    got = perplexity(model, CharTokenizer(), str(text), window=16, max_windows=5, progress=False)
    assert got["windows"] == 5 and got["window"] == 16 and got["tokens_scored"] == 5 * 15
    from gisp.core.data import consecutive_windows, token_stream

    stream, _ = token_stream(str(text), "eval", CharTokenizer())
    ids = consecutive_windows(stream, 16, 5)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].double(), -1)
    nll = -logp.gather(-1, ids[:, 1:, None]).mean()
    assert got["ppl"] == pytest.approx(math.exp(float(nll)), rel=1e-5)
    assert got["source"]["part"] == "eval"


def test_too_little_text_is_one_line(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("tiny\n\nshort")
    with pytest.raises(GispError, match="fewer than one window"):
        perplexity(tiny_model(), CharTokenizer(), str(text), window=64, progress=False)
