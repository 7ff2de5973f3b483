"""Model loading: one dtype rule for a run's base model, one-line errors."""

import pytest
import torch

import gisp.loading as loading
from gisp.errors import GispError


def test_a_runs_base_model_loads_in_the_runs_own_dtype(monkeypatch):
    """export --list and export (and elastic) load the base model the same way, so sizes agree."""
    seen = []
    monkeypatch.setattr(loading, "load_model", lambda name, dtype, device: seen.append((name, dtype, device)))
    loading.load_base_model({"name": "m", "path": "/runs/base", "weight_dtype": "bfloat16"})
    loading.load_base_model({"name": "m", "weight_dtype": "float32"})
    loading.load_base_model({"name": "m", "path": "/runs/base", "weight_dtype": "bfloat16"}, dtype="fp32")
    assert seen == [("/runs/base", "bf16", "cpu"), ("m", "fp32", "cpu"), ("/runs/base", "fp32", "cpu")]


def test_a_run_without_a_loadable_model_is_one_line():
    with pytest.raises(GispError, match="does not record a loadable base model"):
        loading.load_base_model({"name": "model"})


def test_dtype_names():
    assert loading.torch_dtype("bf16") is torch.bfloat16
    with pytest.raises(GispError, match="unknown dtype 'fp8'"):
        loading.torch_dtype("fp8")


def test_unknown_model_names_are_one_line(tmp_path):
    with pytest.raises(GispError, match="unknown model"):
        loading.resolve_model_path(str(tmp_path / "nothing-here"))
    with pytest.raises(GispError, match="GGUF file not found"):
        loading.resolve_model_path(str(tmp_path / "m.gguf"))


@pytest.mark.parametrize("device", ["tpu", "xla", "cuda:banana", "meta", "cpu:x"])
def test_unknown_devices_are_one_line_before_any_work(device, monkeypatch):
    """--device tpu used to end in torch's RuntimeError traceback after the model name was resolved."""
    monkeypatch.setattr(loading, "resolve_model_path", lambda name: pytest.fail("resolved the model first"))
    with pytest.raises(GispError, match=r"device"):
        loading.load_model("some-model", device=device)


def test_cuda_without_cuda_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(GispError, match="no CUDA device"):
        loading.resolve_device("cuda:0")
    assert loading.resolve_device("cpu") == torch.device("cpu")
