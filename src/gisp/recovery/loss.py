"""The recovery loss, computed a chunk of positions at a time.

Logits over a large vocabulary (49k for SmolLM2) are the largest tensors of a
training step: batch x sequence x vocabulary floats, once for the student and
once for the teacher. Both models therefore stop at their final hidden states;
the LM heads are applied to ``chunk`` positions (rows of the flattened batch x
sequence) at a time, each chunk's loss is back-propagated into the (detached)
student hidden states at once, and the hidden states' gradient is passed
through the decoder once at the end (:func:`chunked_loss`). At most one chunk
of logits per model exists at any time, and the result equals the unchunked
loss (up to float summation order).

Distillation is the forward KL divergence KL(teacher || student) between the
softmax of the logits at temperature ``T`` (Minitron: logits only, ``T = 1``),
times ``T**2`` so its gradient keeps its scale at any ``T`` (Hinton et al.); the
LM loss is next-token cross-entropy. Both are means over the ``batch x
(seq_len - 1)`` positions that have a next token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Head = Callable[[torch.Tensor], torch.Tensor]
"""Hidden states ``(..., hidden)`` to logits ``(..., vocab)``."""


@dataclass
class Losses:
    """One step's losses (means over the predicted positions)."""

    total: float
    kd: float | None
    lm: float

    def to_dict(self) -> dict[str, float | None]:
        return {"total": self.total, "kd": self.kd, "lm": self.lm}


def kl_sum(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sum over positions of KL(softmax(t / T) || softmax(s / T)), in float32."""
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum()


def chunked_loss(student_hidden: torch.Tensor, labels: torch.Tensor, student_head: Head, *,
                 teacher_hidden: torch.Tensor | None = None, teacher_head: Head | None = None,
                 temperature: float = 1.0, lm_weight: float = 1.0, chunk: int = 128,
                 backward: bool = True) -> Losses:
    """The loss of one batch from final hidden states; with ``backward``, its gradient reaches the student.

    ``student_hidden`` and ``teacher_hidden`` are ``(batch, seq, hidden)`` states of
    positions ``0..seq-2`` of the input, ``labels`` the ``(batch, seq - 1)`` tokens
    they predict; ``chunk`` positions (rows of the flattened batch x sequence) get
    their logits at once. Without a teacher the loss is the LM loss alone. ``loss =
    (1 - lm_weight) * T**2 * KL + lm_weight * LM``.
    """
    distill = teacher_hidden is not None
    kd_weight = (1.0 - lm_weight) if distill else 0.0
    flat_labels = labels.reshape(-1)
    n = flat_labels.numel()
    leaf = student_hidden.detach().reshape(n, -1).requires_grad_(backward)
    t_flat = teacher_hidden.reshape(n, -1) if distill else None
    kd_total = lm_total = 0.0
    for start in range(0, n, chunk):
        cut = slice(start, start + chunk)
        with torch.set_grad_enabled(backward):
            logits = student_head(leaf[cut]).float()
            lm = F.cross_entropy(logits, flat_labels[cut], reduction="sum") / n
            loss = lm_weight * lm
            if distill:
                with torch.no_grad():
                    target = teacher_head(t_flat[cut])
                kd = kl_sum(target, logits, temperature) * (temperature**2) / n
                loss = loss + kd_weight * kd
                kd_total += float(kd.detach())
        lm_total += float(lm.detach())
        if backward and loss.requires_grad:
            loss.backward()
        del logits, loss
    if backward and leaf.grad is not None:
        student_hidden.backward(leaf.grad.view_as(student_hidden))
    total = lm_weight * lm_total + (kd_weight * kd_total if distill else 0.0)
    return Losses(total=total, kd=kd_total if distill else None, lm=lm_total)
