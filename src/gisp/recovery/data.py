"""Training batches for recovery: a fixed, seeded order that any step can be rebuilt from.

The text is the *calibration* part of a source (:func:`gisp.core.data.token_stream`):
the first 80% of its documents, so the evaluation part (the last 20%, which
``gisp eval --ppl`` reads) is never trained on. The EOS-joined token stream is
cut into non-overlapping windows of ``seq_len`` tokens; each pass over them
("epoch") visits them in a permutation seeded by ``(seed, epoch)``, and step
``k`` takes the next ``batch_size`` windows of that endless sequence. A batch is
therefore a pure function of the step number, which is what makes ``--resume``
continue exactly where a killed run stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from gisp.core.data import TextSource, token_stream
from gisp.errors import GispError


@dataclass
class TrainingText:
    """The windows of the training text and where they came from."""

    windows: torch.Tensor
    """``(n, seq_len)`` token ids, in text order."""
    source: TextSource
    seed: int

    @classmethod
    def build(cls, source: str, tokenizer: Any, seq_len: int, seed: int) -> TrainingText:
        stream, src = token_stream(source, "calib", tokenizer)
        count = stream.numel() // seq_len
        if count == 0:
            raise GispError(f"the training text of '{source}' has {stream.numel()} tokens, fewer than one "
                            f"sequence of {seq_len}: give more text or a shorter --seq-len")
        return cls(stream[: count * seq_len].view(count, seq_len), src, seed)

    def position(self, step: int, batch_size: int) -> dict[str, int]:
        """Where step ``step`` (0-based) starts reading: pass over the text and window within it."""
        first = step * batch_size
        return {"step": step, "epoch": first // len(self.windows), "offset": first % len(self.windows)}

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        """The ``(batch_size, seq_len)`` ids of step ``step`` (0-based)."""
        n = len(self.windows)
        picks = []
        for i in range(step * batch_size, (step + 1) * batch_size):
            epoch, offset = divmod(i, n)
            picks.append(int(self._order(epoch)[offset]))
        return self.windows[picks]

    def _order(self, epoch: int) -> torch.Tensor:
        cached = getattr(self, "_cache", None)
        if cached is None or cached[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            cached = (epoch, torch.randperm(len(self.windows), generator=g))
            self._cache = cached
        return cached[1]

    def describe(self, steps: int, batch_size: int) -> dict[str, Any]:
        """The record of what was trained on."""
        n = len(self.windows)
        return {**self.source.to_dict(), "windows": n, "seq_len": int(self.windows.shape[1]),
                "passes": steps * batch_size / n,
                "sampling": "non-overlapping windows of the EOS-joined calibration part, a seeded permutation "
                            "per pass; the source's evaluation part is never read"}
