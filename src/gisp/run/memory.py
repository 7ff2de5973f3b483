"""Peak memory of a pruning step, as a multiple of the model's weight bytes.

The paper's stated limitation is memory (43.6 GB for Llama-2-7B, 3.2x its bf16
weights). To compare, a step's peak is reported as a multiple of the weight
bytes and split into weights, gradients (computed: prunable weights only, in
the accumulation dtype) and the rest (activations and transients, measured).

CPU: the process's resident-set high-water mark (``VmHWM``), reset just before
the step through ``/proc/self/clear_refs`` (Linux); measure in a fresh process
so earlier work cannot leave its mark. CUDA: ``torch.cuda.max_memory_allocated``
(tensor memory only; the caching allocator's reserve and the CUDA context come
on top).
"""

from __future__ import annotations

import resource
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gisp.architectures import get_architecture
from gisp.core.structures import Layout

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """Current resident set size of this process (0 where /proc is missing)."""
    kib = _status_kib("VmRSS")
    return 0 if kib is None else kib * 1024


def peak_rss_bytes() -> int:
    """Resident-set high-water mark since the last :func:`reset_peak_rss` (or since start)."""
    kib = _status_kib("VmHWM")
    if kib is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return kib * 1024


def reset_peak_rss() -> bool:
    """Reset the high-water mark to the current RSS (Linux >= 4.0); False where not possible."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters (tied weights counted once) and buffers."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return params + sum(b.numel() * b.element_size() for b in model.buffers())


def grad_bytes(model: nn.Module, layout: Layout, grad_accum_dtype: str = "fp32") -> int:
    """Bytes of the accumulated gradient: prunable weights only, in the accumulation dtype."""
    wide = {"fp32": 4, "fp64": 8}.get(grad_accum_dtype, 0)
    params = get_architecture(model).prunable_parameters(model, layout)
    return sum(p.numel() * max(wide, p.element_size()) for p in params)


@dataclass
class PeakMemory:
    """Measures the peak memory of a block of code on ``device`` (context manager).

    ``start``: memory in use when the block began; ``peak``: the highest point
    during it (both bytes). On CPU, ``resettable`` says whether the high-water
    mark could be reset; if not, ``peak`` may come from before the block.
    """

    device: torch.device
    start: int = 0
    peak: int = 0
    resettable: bool = True
    source: str = ""

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            self.source = "torch.cuda.max_memory_allocated"
        else:
            self.resettable = reset_peak_rss()
            self.start = rss_bytes()
            self.source = "VmHWM (peak RSS) after /proc/self/clear_refs" if self.resettable else "ru_maxrss"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = peak_rss_bytes()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["device"] = str(self.device)
        return d


def breakdown(peak: int, baseline: int, weights: int, grads: int) -> dict[str, float]:
    """Split a step's peak into multiples of the weight bytes.

    ``baseline``: memory before the model existed (runtime and libraries on
    CPU; 0 on CUDA), so ``total`` counts what the pruning run itself needs.
    ``activations`` is the remainder: activations, logits, the objective's
    temporaries, scoring transients and allocator slack.
    """
    used = peak - baseline
    return {
        "total": used / weights,
        "weights": 1.0,
        "gradients": grads / weights,
        "activations_and_rest": (used - weights - grads) / weights,
    }
