"""Perplexity in non-overlapping windows (the LLM-Pruner/FLAP protocol)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from gisp.core.data import consecutive_windows, token_stream
from gisp.core.objectives import token_nll


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer,
    source: str = "wiki",
    *,
    window: int = 128,
    max_windows: int | None = 256,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """exp(mean NLL) over the first ``max_windows`` windows of the source's eval part.

    Each window is scored on its own (no context carried over), predicting
    tokens 2..window from the ones before them.
    """
    stream, src = token_stream(source, "eval", tokenizer)
    windows = consecutive_windows(stream, window, max_windows)
    device = next(model.parameters()).device
    nll_sum, count = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc=f"ppl {source}", disable=not progress, leave=False):
        ids = windows[start : start + batch_size].to(device)
        nll = token_nll(model(input_ids=ids, use_cache=False).logits, ids)
        nll_sum += float(nll.double().sum())
        count += nll.numel()
    return {
        "ppl": math.exp(nll_sum / count),
        "source": src.to_dict(),
        "window": window,
        "windows": len(windows),
        "tokens_scored": count,
        "protocol": "non-overlapping windows from the start of the eval part, each scored independently",
    }
