"""FLAP's bias compensation for a masked model whose output projections have no bias.

FLAP replaces each removed input column ``j`` of the attention output (o) and
MLP down projections by its mean
calibration input: ``W[:, j] @ x_j ~ W[:, j] * mean_j``, a constant added to the
layer's output. Summed over the removed columns this is one bias vector per
module, ``b = W[:, removed] @ mean_input[removed]`` (computed from the dense
weights), which is exact whenever the removed columns see their mean input.

Llama-family checkpoints have no such biases, so a compensated model is the
masked model plus these vectors. :class:`Compensation` stores them
(``compensation.safetensors`` next to the run's trajectory, keys
``layers.{i}.o.bias`` / ``layers.{i}.down.bias``) and :func:`apply_compensation`
adds them through forward hooks, so evaluation of the masked model includes
them. An export writes them as real biases of the o/down projections (see
:meth:`Compensation.bias_for` and :func:`gisp.architectures.slicing.slim_model`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from gisp.architectures import get_architecture
from gisp.errors import GispError

FILENAME = "compensation.safetensors"


@dataclass
class Compensation:
    """Per-layer output biases of the o (``attn``) and down (``mlp``) projections, float32, on CPU."""

    attn: dict[int, torch.Tensor] = field(default_factory=dict)
    mlp: dict[int, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_means(cls, model: nn.Module, keep_heads: list[torch.Tensor], keep_channels: list[torch.Tensor],
                   attn_means: dict[int, torch.Tensor], mlp_means: dict[int, torch.Tensor]) -> Compensation:
        """``W[:, removed] @ mean[removed]`` per module, from the model's (dense) weights."""
        arch = get_architecture(model)
        layers = arch.layers(model)
        d = arch.head_dim
        comp = cls()
        with torch.no_grad():
            for i, layer in enumerate(layers):
                gone_cols = (~keep_heads[i]).repeat_interleave(d)
                if gone_cols.any() and i in attn_means:
                    w = arch.attention(layer).o.weight.detach().double().cpu()
                    comp.attn[i] = (w[:, gone_cols] @ attn_means[i].double()[gone_cols]).float()
                gone = ~keep_channels[i]
                if gone.any() and i in mlp_means:
                    w = arch.mlp(layer).down.weight.detach().double().cpu()
                    comp.mlp[i] = (w[:, gone] @ mlp_means[i].double()[gone]).float()
        return comp

    def bias_for(self, layer: int, module: str) -> torch.Tensor | None:
        """The bias an exporter adds to the o (module 'o') or down (module 'down') projection of a layer."""
        return (self.attn if module == "o" else self.mlp).get(layer)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"layers.{i}.o.bias": b.contiguous() for i, b in self.attn.items()}
        out.update({f"layers.{i}.down.bias": b.contiguous() for i, b in self.mlp.items()})
        return out

    def save(self, run_dir: str | Path) -> Path:
        """Write ``compensation.safetensors`` atomically."""
        import os
        import tempfile

        from safetensors.torch import save_file

        from gisp.provenance import make_final

        path = Path(run_dir) / FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=FILENAME, suffix=".tmp")
        os.close(fd)
        try:
            make_final(tmp)  # the umask's mode, not tempfile's 0600
            save_file(self.to_tensors(), tmp, metadata={"what": "FLAP bias compensation: add to o/down projections"})
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, run_dir: str | Path) -> Compensation | None:
        """The run's compensation, or ``None`` when it has none."""
        from safetensors.torch import load_file

        path = Path(run_dir)
        path = path / FILENAME if path.is_dir() else path
        if not path.is_file():
            return None
        comp = cls()
        for key, t in load_file(str(path)).items():
            parts = key.split(".")
            if len(parts) != 4 or parts[0] != "layers" or parts[2] not in ("o", "down"):
                raise GispError(f"{path}: unexpected tensor '{key}' (expected layers.N.o.bias / layers.N.down.bias)")
            (comp.attn if parts[2] == "o" else comp.mlp)[int(parts[1])] = t
        return comp


def compensation_for_step(run_dir: str | Path | None, step: int) -> tuple[Compensation | None, Path | None]:
    """The compensation a ``gisp compare`` method directory saved for one step of its trajectory.

    Levels live in ``RUN/sLEVEL/level.json`` (with ``compensation.safetensors`` beside it when the
    method compensates, as FLAP does), so ``gisp eval``/``gisp export`` of ``OUT/methods/flap`` find the
    biases of the step they read without being told.
    """
    if run_dir is None:
        return None, None
    import json

    for pointer in sorted(Path(run_dir).glob("s*/level.json")):
        try:
            d = json.loads(pointer.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if d.get("step") == step and d.get("compensation"):
            path = pointer.parent / FILENAME
            if not path.is_file():
                raise GispError(f"{pointer} names a compensation but {path} is missing: rerun gisp compare")
            return Compensation.load(path), path
    return None, None


class CompensationHandle:
    """Removes the hooks :func:`apply_compensation` installed."""

    def __init__(self, handles: list) -> None:
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self) -> CompensationHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def apply_compensation(model: nn.Module, comp: Compensation | None) -> CompensationHandle:
    """Add the compensation biases to the o/down projections' outputs through forward hooks."""
    if comp is None:
        return CompensationHandle([])
    arch = get_architecture(model)
    layers = arch.layers(model)
    handles = []

    def add(bias: torch.Tensor):
        def hook(_m, _inp, out):
            return out + bias.to(device=out.device, dtype=out.dtype)
        return hook

    for i, b in comp.attn.items():
        if i >= len(layers):
            raise GispError(f"compensation for layer {i} does not fit a model with {len(layers)} layers")
        handles.append(arch.attention(layers[i]).o.register_forward_hook(add(b)))
    for i, b in comp.mlp.items():
        if i >= len(layers):
            raise GispError(f"compensation for layer {i} does not fit a model with {len(layers)} layers")
        handles.append(arch.mlp(layers[i]).down.register_forward_hook(add(b)))
    return CompensationHandle(handles)
