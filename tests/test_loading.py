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


# --- .gguf files: checked from the header, converted once per content ---------------------------------------


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("GISP_CACHE", str(d))
    return d


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from tests.conftest import write_tiny_gguf

    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def count_conversions(monkeypatch) -> list:
    calls = []
    real = loading._convert_gguf

    def counted(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(loading, "_convert_gguf", counted)
    return calls


def weights(loaded) -> dict:
    return {k: v.clone() for k, v in loaded.model.state_dict().items()}


def test_a_gguf_file_is_converted_once_per_content(tiny_gguf, cache, tmp_path, monkeypatch):
    from tests.conftest import write_tiny_gguf

    calls = count_conversions(monkeypatch)
    first = loading.load_model(str(tiny_gguf), dtype="fp32", device="cpu")
    second = loading.load_model(str(tiny_gguf), dtype="fp32", device="cpu")
    assert len(calls) == 1  # the second command on the same file reads the cached directory
    assert first.path == second.path == str(tiny_gguf)  # runs record the file, not the cache entry
    assert all(torch.equal(v, weights(second)[k]) for k, v in weights(first).items())
    copy = tmp_path / "elsewhere" / "same.gguf"
    copy.parent.mkdir()
    copy.write_bytes(tiny_gguf.read_bytes())
    loading.load_model(str(copy), dtype="fp32", device="cpu")
    assert len(calls) == 1  # same content under another name: same entry
    changed = write_tiny_gguf(tmp_path / "changed.gguf", seed=1)
    copy.write_bytes(changed.read_bytes())  # the same path, other weights
    third = loading.load_model(str(copy), dtype="fp32", device="cpu")
    assert len(calls) == 2  # a changed file converts again
    assert not torch.equal(weights(third)["model.embed_tokens.weight"], weights(first)["model.embed_tokens.weight"])
    entries = sorted(p.name for p in (cache / "gguf").iterdir())
    assert len(entries) == 2 and not any(e.startswith(".") for e in entries)  # no temporary directory left


def test_a_relative_path_is_recorded_absolute(tiny_gguf, cache, monkeypatch):
    """A run records the path it loaded; relative, it would not reload from another working directory."""
    monkeypatch.chdir(tiny_gguf.parent)
    assert loading.resolve_model_path(tiny_gguf.name) == (str(tiny_gguf.parent), tiny_gguf.name)
    assert loading.load_model(tiny_gguf.name, dtype="fp32", device="cpu").path == str(tiny_gguf)


@pytest.mark.parametrize("keep", [0, 100, -1])
def test_an_empty_or_truncated_gguf_is_one_line_and_leaves_no_file(tiny_gguf, cache, tmp_path, keep):
    bad = tmp_path / "bad.gguf"
    data = tiny_gguf.read_bytes()
    bad.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(GispError, match="empty|truncated") as e:
        loading.load_model(str(bad), dtype="fp32", device="cpu")
    assert "\n" not in str(e.value)
    assert not cache.exists() or not any(p.is_file() for p in cache.rglob("*"))


def _no_weights_loaded(monkeypatch):
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the architecture was checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


def test_an_unsupported_gguf_architecture_is_refused_from_the_header(cache, tmp_path, monkeypatch):
    from tests.core.test_gguf_file import write

    f = write(tmp_path / "phi.gguf", arch="phi3")
    _no_weights_loaded(monkeypatch)
    with pytest.raises(GispError, match="unsupported architecture 'phi3'"):
        loading.load_model(str(f), device="cpu")
    assert not cache.exists()
    # evaluation takes any architecture transformers reads from GGUF, and refuses the others as early
    with pytest.raises(GispError, match="'rwkv6' model, which transformers cannot read from GGUF"):
        loading.load_model(str(write(tmp_path / "rwkv.gguf", arch="rwkv6")), device="cpu", any_architecture=True)


def test_an_unsupported_directory_is_refused_before_its_weights_load(tmp_path, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    _no_weights_loaded(monkeypatch)
    with pytest.raises(GispError, match="unsupported architecture 'gpt2'"):
        loading.load_model(str(tmp_path / "gpt2"), device="cpu")


def test_a_gguf_file_beside_an_export_config_is_the_gguf(tiny_gguf, cache, tmp_path):
    """A .gguf in a directory that also holds a gisp export's config.json names the file, not the directory."""
    d = tmp_path / "export"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "gisp_llama"}')
    (d / "m.gguf").write_bytes(tiny_gguf.read_bytes())
    loaded = loading.load_model(str(d / "m.gguf"), dtype="fp32", device="cpu")
    assert loaded.path == str(d / "m.gguf") and loaded.model.config.model_type == "llama"


def test_an_unwritable_cache_is_one_line_before_converting(tiny_gguf, tmp_path, monkeypatch):
    """(Root ignores file modes, so the cache is made unusable by putting a regular file in its path.)"""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    monkeypatch.setenv("GISP_CACHE", str(blocker / "cache"))
    calls = []
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: calls.append(a))
    with pytest.raises(GispError, match="cannot write the conversion cache .*set GISP_CACHE") as info:
        loading.load_model(str(tiny_gguf), dtype="fp32", device="cpu")
    assert "\n" not in str(info.value) and not calls  # refused before the dequantisation started
