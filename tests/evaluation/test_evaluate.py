"""``gisp eval`` of a model as it is: any causal LM transformers loads, not only the families gisp prunes."""

import json
import math

import pytest
from tests.conftest import byte_bpe_tokenizer, save_tiny
from typer.testing import CliRunner

from gisp.cli.app import app
from gisp.errors import GispError


def tiny_unsupported(family: str, vocab: int):
    from transformers import GPT2Config, GPT2LMHeadModel, PhiConfig, PhiForCausalLM

    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=vocab, n_positions=128))
    return PhiForCausalLM(PhiConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, max_position_embeddings=128))


@pytest.mark.parametrize("family", ["gpt2", "phi"])
def test_eval_takes_any_causal_lm_and_prune_and_export_refuse_it(family, tmp_path):
    tok = byte_bpe_tokenizer()
    model_dir = save_tiny(tmp_path / family, tiny_unsupported(family, len(tok)), tok)
    runner = CliRunner()
    out = tmp_path / "eval.json"
    r = runner.invoke(app, ["eval", str(model_dir), "--ppl", "wiki", "--window", "32", "--max-windows", "2",
                            "--device", "cpu", "--json", str(out)])
    assert r.exit_code == 0, r.output
    row = json.loads(out.read_text())["rows"][0]
    assert math.isfinite(row["ppl"]["ppl"]) and row["ppl"]["ppl"] > 1 and row["linear_params"] > 0
    r = runner.invoke(app, ["prune", str(model_dir), "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert isinstance(r.exception, GispError) and f"unsupported architecture '{family}'" in str(r.exception)
    assert not (tmp_path / "run").exists()
    r = runner.invoke(app, ["export", str(model_dir), "--format", "gguf", "--out", str(tmp_path / "m.gguf")])
    assert isinstance(r.exception, GispError) and "\n" not in str(r.exception), r.output
    assert not (tmp_path / "m.gguf").exists()
