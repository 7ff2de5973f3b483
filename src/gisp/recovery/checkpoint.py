"""Recovery checkpoints: adapters, optimiser, RNG and data position, as safetensors and JSON (no pickle).

A checkpoint is the directory ``OUT/checkpoint`` of an unfinished recovery
(``OUT`` holds nothing else until the merged model replaces it):

- ``adapter.safetensors``: the trainable (LoRA) weights by parameter name;
- ``optimizer.safetensors``: the optimiser's per-parameter state tensors
  (``<param index>.<name>``, e.g. AdamW's ``step``, ``exp_avg``, ``exp_avg_sq``);
- ``rng.safetensors``: torch's CPU generator state and every CUDA device's;
- ``state.json``: the settings, the input export's fingerprint, completed
  steps, the next data position, the optimiser's param groups, the loss history
  and the training seconds so far.

Each checkpoint is written into a temporary directory and moved into place
(:func:`gisp.outputs.staged`), so a kill at any moment leaves the
previous checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from gisp.errors import GispError
from gisp.outputs import staged
from gisp.provenance import atomic_write_json

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.json"
FORMAT = 1


def checkpoint_path(out: Path) -> Path:
    return out / CHECKPOINT_DIR


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous().clone()


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimiser's state as named tensors plus JSON (param groups, non-tensor state)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = _plain(value)
            else:
                scalars[f"{idx}.{key}"] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted((int(k.split(".")[1]), v) for k, v in tensors.items() if k.startswith("cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([v for _, v in cuda])


def save_checkpoint(out: Path, adapters: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    state: dict[str, Any]) -> None:
    """Write ``OUT/checkpoint`` atomically (see the module docstring)."""
    with staged(checkpoint_path(out)) as tmp:
        save_file({k: _plain(v) for k, v in adapters.items()}, str(tmp / "adapter.safetensors"))
        opt_tensors, opt_meta = optimizer_tensors(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file(rng_tensors(), str(tmp / "rng.safetensors"))
        atomic_write_json(tmp / STATE_FILE, {"format": FORMAT, **state, "optimizer": opt_meta})


def read_state(out: Path) -> dict[str, Any] | None:
    """The state of ``OUT``'s checkpoint, or ``None`` when it has none."""
    file = checkpoint_path(out) / STATE_FILE
    if not file.is_file():
        return None
    try:
        state = json.loads(file.read_text())
    except (json.JSONDecodeError, OSError) as e:
        raise GispError(f"{file} is unreadable ({type(e).__name__}): remove {out} and start again") from e
    if state.get("format") != FORMAT:
        raise GispError(f"{file} was written by another version of gisp recover: remove {out} and start again")
    return state


def load_checkpoint(out: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Adapters, optimiser tensors and RNG states of ``OUT``'s checkpoint."""
    ck = checkpoint_path(out)
    return (load_file(str(ck / "adapter.safetensors")), load_file(str(ck / "optimizer.safetensors")),
            load_file(str(ck / "rng.safetensors")))
