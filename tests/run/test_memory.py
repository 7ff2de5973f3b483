"""Peak memory of a step: exact size arithmetic of weights, gradients and the breakdown."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import tiny_model

from gisp.architectures import get_architecture, layout_of
from gisp.run import memory


# --- peak memory measurement ----------------------------------------------------------------------------------
def test_peak_memory_sizes_are_exact():
    # An RSS-based check of a fresh allocation is unreliable inside a long test process (freed pages of
    # earlier tests stay resident and get reused), so the peak itself is measured by the benchmark scripts
    # in fresh processes; here only the exact size arithmetic is tested.
    model = tiny_model().to(torch.bfloat16)
    layout = layout_of(model, 0.25, 1)
    n_prunable = sum(p.numel() for p in get_architecture(model).prunable_parameters(model, layout))
    assert memory.weight_bytes(model) == 2 * sum(p.numel() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    assert memory.grad_bytes(model, layout, "fp32") == 4 * n_prunable
    assert memory.grad_bytes(model, layout, "native") == 2 * n_prunable
    parts = memory.breakdown(peak=1000, baseline=100, weights=300, grads=200)
    assert parts["total"] == 3.0 and parts["gradients"] == pytest.approx(2 / 3)
    assert parts["weights"] + parts["gradients"] + parts["activations_and_rest"] == pytest.approx(parts["total"])
