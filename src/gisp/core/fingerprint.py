"""The base model's fingerprint: which weights a run, an export or an evaluation belongs to."""

from __future__ import annotations

import hashlib

import torch
from torch import nn


@torch.no_grad()
def fingerprint(model: nn.Module, samples: int = 2048) -> str:
    """A short hash of a model's architecture and (sampled) weights.

    Each tensor contributes its name, shape and an evenly strided sample of its
    values rounded to bf16, so the same checkpoint loaded in fp32 or bf16 gives
    the same fingerprint, while a different or already-pruned model does not.
    """
    h = hashlib.sha256()
    cfg = model.config
    # per-layer (exported) configs refuse a global getattr of per-layer fields: read them raw
    get = getattr(cfg, "_getattr_without_heterogeneous_validation", None) or (lambda k, d: getattr(cfg, k, d))
    for key in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "intermediate_size", "vocab_size"):
        h.update(f"{key}={get(key, None)};".encode())
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        sample = flat[::step][:samples].to("cpu", torch.bfloat16).view(torch.int16)
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]
