"""Progressive physical shrinking: the same trajectory as the masked path, on a smaller working copy."""

import pytest
import torch
from tests.conftest import VARIANTS, random_calib, tiny_model

import gisp
from gisp.architectures import layout_of

CFG = dict(target=0.6, steps=6, batch_size=4, protect_first=0.25, protect_last=1)


def run(arch, kv, dtype=torch.float64, **kw):
    model = tiny_model(arch, kv).to(dtype)
    traj = gisp.prune(model, gisp.PruneConfig(**{**CFG, **kw}), random_calib(), progress=False)
    return model, traj


@pytest.mark.parametrize("arch,kv,every", [(a, k, 1 + (n // 2) % 2) for n, (a, k) in enumerate(VARIANTS)])
def test_shrinking_equals_the_masked_path(arch, kv, every):
    """float64, so float rounding of the shorter matmuls cannot swap structures: identical trajectories."""
    masked_model, masked = run(arch, kv)
    shrunk_model, shrunk = run(arch, kv, shrink_every=every)
    assert shrunk.head_step == masked.head_step and shrunk.channel_step == masked.channel_step
    assert shrunk.head_order == masked.head_order and shrunk.channel_order == masked.channel_order
    for a, b in zip(masked.steps[1:], shrunk.steps[1:], strict=True):
        assert b["calib_loss"] == pytest.approx(a["calib_loss"], rel=1e-9)
    # the working copy really was smaller from step 1 + every on, and the base model carries the mask
    assert shrunk.steps[1 + every]["work_params"] < shrunk.steps[1]["work_params"]
    for p, q in zip(masked_model.parameters(), shrunk_model.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    assert not any(p.requires_grad or p.grad is not None for p in shrunk_model.parameters())


def test_shrinking_in_fp32_agrees_up_to_ties():
    _, masked = run("llama", 2, dtype=torch.float32)
    _, shrunk = run("llama", 2, dtype=torch.float32, shrink_every=2)
    layout = masked.layout
    same = sum(a == b for x, y in zip(masked.channel_step, shrunk.channel_step) for a, b in zip(x, y))
    assert same >= 0.95 * sum(s.intermediate for s in layout.layers)
    assert shrunk.steps[-1]["sparsity"] == pytest.approx(masked.steps[-1]["sparsity"], abs=0.02)


def test_shrinking_resumes_and_removes_whole_blocks(tmp_path):
    """Stop mid-run, resume with shrinking on: same trajectory as one uninterrupted shrinking run. A high
    target empties whole attention/MLP blocks of some layers, which the sliced copy drops."""
    cfg = gisp.PruneConfig(**{**CFG, "target": 0.8, "steps": 5, "shrink_every": 2})
    calib = random_calib()
    whole = gisp.prune(tiny_model("llama", 2).double(), cfg, calib, progress=False)
    model = tiny_model("llama", 2).double()
    gisp.prune(model, cfg, calib, run_dir=tmp_path, progress=False, stop_after=3)
    model = tiny_model("llama", 2).double()
    resumed = gisp.prune(model, cfg, calib, run_dir=tmp_path, resume=True, progress=False)
    assert resumed.head_step == whole.head_step and resumed.channel_step == whole.channel_step
    last = resumed.mask_at_step(resumed.last_step)
    layout = layout_of(model)
    assert any(not last.heads[i].any() or not last.channels[i].any() for i in layout.prunable)


def test_bad_shrink_every():
    with pytest.raises(gisp.GispError, match="shrink-every"):
        gisp.PruneConfig(shrink_every=-1)
