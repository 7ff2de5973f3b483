"""Activation statistics from forward hooks on the calibration set.

Activation-based methods (Wanda-sp, FLAP, OWL, ShortGPT) need, per input
column of a linear layer, the mean, the variance and the squared L2 norm over
all calibration tokens, or each decoder layer's input and output. Hooks
collect them in float64 so long calibration sets do not lose precision.

:class:`LayerwiseRunner` replays the calibration set one decoder layer at a
time (the way Wanda and FLAP process a model): a method can prune layer ``i``
and feed its *pruned* output to layer ``i + 1`` for the cost of about two full
forward passes in total.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gisp.architectures import get_architecture
from gisp.baselines.base import input_batches
from gisp.core.calibration import CalibrationSet


class ColumnStats:
    """Per-input-column token count, sum and sum of squares of a linear layer's input."""

    def __init__(self) -> None:
        self.n = 0
        self.sum: torch.Tensor | None = None
        self.sumsq: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        if self.sum is None:
            self.sum = torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device)
            self.sumsq = torch.zeros_like(self.sum)
        self.n += x.shape[0]
        self.sum += x.sum(0)
        self.sumsq += (x * x).sum(0)

    @property
    def mean(self) -> torch.Tensor:
        return (self.sum / self.n).cpu()

    @property
    def var(self) -> torch.Tensor:
        """Unbiased per-column variance over tokens."""
        mean = self.sum / self.n
        return ((self.sumsq - self.n * mean * mean) / max(1, self.n - 1)).clamp_min(0).cpu()

    @property
    def mean_sq(self) -> torch.Tensor:
        """Mean of x^2 over tokens: Wanda's squared input norm up to a constant factor."""
        return (self.sumsq / self.n).cpu()


@contextmanager
def input_hooks(modules: dict[str, nn.Module]):
    """Collect :class:`ColumnStats` of each module's input while the context is open."""
    stats = {k: ColumnStats() for k in modules}
    handles = [m.register_forward_hook(lambda _m, inp, _out, k=k: stats[k].update(inp[0]))
               for k, m in modules.items()]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def forward_all(model: nn.Module, calib: CalibrationSet, batch_size: int) -> None:
    """One forward pass of the whole calibration set (hooks do the work)."""
    device = next(model.parameters()).device
    for ids in input_batches(calib, batch_size):
        model(input_ids=ids.to(device), use_cache=False)


def projection_inputs(model: nn.Module, layers: Iterable[int] | None = None, which: tuple[str, ...] = ("o", "down"),
                      ) -> dict[str, nn.Module]:
    """The linear modules whose inputs a method needs, keyed ``"{layer}.{name}"``.

    ``which`` picks from q (the attention input, shared by q/k/v), o, gate (the
    MLP input, shared by gate/up) and down.
    """
    arch = get_architecture(model)
    all_layers = arch.layers(model)
    out: dict[str, nn.Module] = {}
    for i in layers if layers is not None else range(len(all_layers)):
        att, mlp = arch.attention(all_layers[i]), arch.mlp(all_layers[i])
        mods = {"q": att.q, "o": att.o, "gate": mlp.gate, "down": mlp.down}
        for w in which:
            out[f"{i}.{w}"] = mods[w]
    return out


def collect_input_stats(model: nn.Module, calib: CalibrationSet, batch_size: int,
                        which: tuple[str, ...] = ("o", "down")) -> dict[str, ColumnStats]:
    """Input statistics of the chosen projections of every layer, on the model as it is."""
    with input_hooks(projection_inputs(model, which=which)) as stats:
        forward_all(model, calib, batch_size)
    return stats


def _layer_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def block_influence(model: nn.Module, calib: CalibrationSet, batch_size: int) -> list[float]:
    """ShortGPT's BI per decoder layer: 1 - mean cosine(layer input, layer output) over tokens."""
    layers = get_architecture(model).layers(model)
    sums = [0.0] * len(layers)
    counts = [0] * len(layers)
    inputs: dict[int, torch.Tensor] = {}

    def pre(i: int):
        def hook(_m, args, kwargs):
            inputs[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    def post(i: int):
        def hook(_m, _args, _kwargs, out):
            h_in, h_out = inputs.pop(i).float(), _layer_output(out).float()
            cos = F.cosine_similarity(h_in.reshape(-1, h_in.shape[-1]), h_out.reshape(-1, h_out.shape[-1]), dim=-1)
            sums[i] += float(cos.double().sum())
            counts[i] += cos.numel()
        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(pre(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(post(i), with_kwargs=True))
    try:
        forward_all(model, calib, batch_size)
    finally:
        for h in handles:
            h.remove()
    return [1.0 - sums[i] / counts[i] for i in range(len(layers))]


class LayerwiseRunner:
    """Replays the calibration set through one decoder layer at a time.

    One full forward pass records the first layer's input hidden states and the
    keyword arguments every layer receives (position embeddings, masks); these
    do not depend on the weights, so :meth:`run` can then feed any hidden states
    through layer ``i`` alone.
    """

    def __init__(self, model: nn.Module, calib: CalibrationSet, batch_size: int) -> None:
        self.layers = get_architecture(model).layers(model)
        self.hidden: list[torch.Tensor] = []
        self.kwargs: list[list[dict[str, Any]]] = [[] for _ in self.layers]
        handles = [layer.register_forward_pre_hook(self._recorder(i), with_kwargs=True)
                   for i, layer in enumerate(self.layers)]
        try:
            forward_all(model, calib, batch_size)
        finally:
            for h in handles:
                h.remove()

    def _recorder(self, i: int):
        def hook(_m, args, kwargs):
            if i == 0:
                self.hidden.append((args[0] if args else kwargs["hidden_states"]).detach())
            self.kwargs[i].append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        return hook

    @torch.no_grad()
    def run(self, i: int) -> list[torch.Tensor]:
        """Layer ``i``'s outputs for the current hidden states (hooks on it fire)."""
        return [_layer_output(self.layers[i](h, **kw)) for h, kw in zip(self.hidden, self.kwargs[i])]

    def advance(self, i: int) -> None:
        """Replace the current hidden states by layer ``i``'s output (after pruning it)."""
        self.hidden = self.run(i)
