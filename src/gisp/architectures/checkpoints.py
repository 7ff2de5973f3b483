"""Checkpoint directories whose weights must match their config, exactly."""

from __future__ import annotations

import json
from pathlib import Path

from gisp.architectures import install_auto_registration
from gisp.errors import GispError


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [f.name for f in sorted(path.glob("*.safetensors"))]
    if not files:
        raise GispError(f"{path} has no safetensors weights: re-export the model")
    shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
        try:
            with safe_open(str(path / name), framework="pt") as f:
                for key in f.keys():
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except Exception as e:  # truncated or corrupt file
            raise GispError(f"{path / name} is not a readable safetensors file ({type(e).__name__}): "
                            "re-export the model") from e
    return shapes


def check_weights_match_config(path: str | Path) -> None:
    """Refuse a directory whose weights do not have the shapes its ``config.json`` describes.

    transformers would otherwise initialise missing or mismatched tensors at
    random with only a warning, which is how peers' pruned checkpoints fail.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    install_auto_registration()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise GispError(f"{path} is not a model directory (no config.json): give the directory gisp export wrote")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
        raise GispError(f"{path}/config.json is not a valid model config ({first}): re-export the model") from e
    try:
        with torch.device("meta"), no_init_weights():
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # widths a model cannot have (head_dim 0, negative sizes, ...)
        first = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
        raise GispError(f"{path}/config.json does not describe a model that can be built ({first}): "
                        "re-export the model") from e
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    found = _safetensors_shapes(path)
    for key, shape in expected.items():
        if key not in found:
            if key in tied:
                continue
            raise GispError(f"{path}: weights lack '{key}' that config.json requires: the directory is incomplete "
                            "or was edited; re-export the model")
        if found[key] != shape:
            raise GispError(f"{path}: '{key}' has shape {list(found[key])} but config.json implies {list(shape)}: "
                            "weights and config do not match; re-export the model")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise GispError(f"{path}: weights hold '{extra[0]}' that config.json does not describe: weights and config "
                        "do not match; re-export the model")
