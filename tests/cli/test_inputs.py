"""Bad input gets one clear line, never a deep traceback."""

import pytest
from tests.conftest import CharTokenizer, tiny_model

import gisp
from gisp.core.data import random_windows, token_stream
from gisp.core.structures import protected_layers


@pytest.mark.parametrize("target", [0.0, 1.0, -0.1, 1.5])
def test_sparsity_out_of_range(target):
    with pytest.raises(gisp.GispError, match=r"in \(0, 1\)"):
        gisp.PruneConfig(target=target)


@pytest.mark.parametrize("field,value,match", [
    ("schedule", "step", "schedule"), ("normalize", "l2", "normalize"), ("objective", "nope", "objective"),
    ("steps", 0, "steps"), ("calib_samples", 0, "calib-samples"), ("schedule_unit", "flops", "schedule-unit"),
])
def test_bad_config(field, value, match):
    with pytest.raises(gisp.GispError, match=match):
        gisp.PruneConfig(**{field: value})


def test_unknown_model():
    with pytest.raises(gisp.GispError, match="unknown model"):
        gisp.load_model("no-such-model")
    with pytest.raises(gisp.GispError, match="GGUF file not found"):
        gisp.load_model("/nonexistent/model.gguf")


def test_unsupported_architecture():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(gisp.GispError, match="unsupported architecture 'gpt2'.*llama"):
        gisp.get_architecture(model)


def test_calibration_text_too_short(tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("a few words\n\nand a few more")
    stream, src = token_stream(str(f), "calib", CharTokenizer())
    with pytest.raises(gisp.GispError, match="fewer than one window of 128"):
        random_windows(stream, 4, 128, seed=0)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(gisp.GispError, match="empty"):
        token_stream(str(empty), "calib", CharTokenizer())
    with pytest.raises(gisp.GispError, match="empty"):
        gisp.prune(tiny_model(), gisp.PruneConfig(steps=1), gisp.CalibrationSet([]), progress=False)


def test_unknown_text_source():
    with pytest.raises(gisp.GispError, match="unknown text source"):
        token_stream("bogus", "calib", CharTokenizer())


def test_protection_bounds():
    assert protected_layers(30, 0.1, 1) == frozenset({0, 1, 2, 29})
    with pytest.raises(gisp.GispError, match="every layer is protected"):
        protected_layers(4, 0.5, 2)
    with pytest.raises(gisp.GispError, match="protect-first"):
        protected_layers(4, 1.5, 0)


def test_missing_run_dir(tmp_path):
    with pytest.raises(gisp.GispError, match="no pruning run"):
        gisp.Trajectory.load(tmp_path)
    (tmp_path / "trajectory.json").write_text("{not json")
    with pytest.raises(gisp.GispError, match="not a valid trajectory"):
        gisp.Trajectory.load(tmp_path)


def test_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(gisp.GispError, match="hub is unreachable"):
        gisp.load_model("some-org/some-model-that-is-not-cached")
