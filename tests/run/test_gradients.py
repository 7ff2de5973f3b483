"""The calibration-set gradient keeps results: checkpointing recomputes, the accumulation precision is exact
enough (fp32) or exact (fp64), and the hook fallback of older torch agrees."""

from __future__ import annotations

import importlib

import pytest
import torch
from tests.conftest import random_calib, tiny_model

import gisp
from gisp.architectures import get_architecture, layout_of
from gisp.core.objectives import LanguageModelling
from gisp.run import memory

grad_mod = importlib.import_module("gisp.run.gradients")
CFG = dict(target=0.5, steps=4, batch_size=3, protect_first=0.25, protect_last=1)
STRUCTURE = ("head_step", "channel_step", "head_order", "channel_order")


# --- gradient checkpointing -------------------------------------------------------------------------------
def test_checkpointing_recomputes_and_changes_nothing():
    base = gisp.prune(tiny_model(), gisp.PruneConfig(**CFG), random_calib(), progress=False)
    model = tiny_model()
    calls = {"n": 0}
    # a pre-hook on the layer's first projection: the recompute may stop early, before the layer's end
    model.model.layers[1].self_attn.q_proj.register_forward_pre_hook(
        lambda *a: calls.__setitem__("n", calls["n"] + 1))
    ckpt = gisp.prune(model, gisp.PruneConfig(**CFG, grad_checkpointing=True), random_calib(), progress=False)
    # 4 steps x 4 micro-batches, each run twice (forward + recompute), plus one final no-grad pass of 4
    assert calls["n"] == 4 * 4 * 2 + 4
    for key in STRUCTURE:
        assert getattr(ckpt, key) == getattr(base, key)
    for a, b in zip(ckpt.steps, base.steps, strict=True):
        assert a["calib_loss"] == pytest.approx(b["calib_loss"], rel=1e-6)
    assert ckpt.config["grad_checkpointing"] is True and base.config["grad_checkpointing"] is False
    # everything is as before: no checkpointing, eval mode everywhere, no gradients
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert not any(m.training for m in model.modules())
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


# --- gradient accumulation precision ------------------------------------------------------------------------
def _grads(model, mode, n=24, record=None):
    layout = layout_of(model)
    params = get_architecture(model).prunable_parameters(model, layout)
    for p in params:
        p.requires_grad_(True)
    handles = []
    if record is not None:  # keep every micro-batch's own gradient (native mode only)
        def keep(p):
            record.setdefault(id(p), []).append(p.grad.clone())
            p.grad = None
        handles = [p.register_post_accumulate_grad_hook(keep) for p in params]
    grad_mod.accumulate_gradients(model, LanguageModelling(), random_calib(n=n), batch_size=1,
                                   grad_accum_dtype=mode)
    for h in handles:
        h.remove()
    out = [p.grad.detach().clone() if p.grad is not None else None for p in params]
    model.zero_grad(set_to_none=True)
    grad_mod.restore_grad_dtype(model)
    if record is not None:  # the exact sum of the same bf16 micro-batch gradients
        return [torch.stack(record[id(p)]).double().sum(0) for p in params]
    return out


def test_fp32_accumulation_sums_bf16_microbatch_gradients_exactly_enough():
    """Both modes get the same bf16 gradient per micro-batch; only the running sum differs."""
    bf16 = tiny_model().to(torch.bfloat16)
    exact = _grads(bf16, "native", record={})
    fp32 = _grads(bf16, "fp32")
    native = _grads(bf16, "native")
    assert all(g.dtype == torch.float32 for g in fp32) and all(g.dtype == torch.bfloat16 for g in native)
    assert all(p.grad_dtype == p.dtype for p in bf16.parameters())  # restored

    def err(gs):
        return sum(float((g.double() - e).norm()) for g, e in zip(gs, exact)) / sum(float(e.norm()) for e in exact)

    assert err(fp32) < 1e-6 and err(native) > 100 * err(fp32)


def test_fp64_accumulation_is_exact_whatever_the_order():
    """fp64 sums of fp32 micro-batch gradients: what makes 1 and N processes agree bit for bit."""
    model = tiny_model()
    record: dict = {}
    exact = _grads(model, "native", record=record)
    fp64 = _grads(model, "fp64")
    assert all(g.dtype == torch.float64 for g in fp64)
    layout = layout_of(model)
    for p, g, e in zip(get_architecture(model).prunable_parameters(model, layout), fp64, exact):
        parts = record[id(p)]
        assert torch.equal(g, e)
        # another grouping (two "ranks", then their sum) gives the same bits
        assert torch.equal(g, torch.stack(parts[0::2]).double().sum(0) + torch.stack(parts[1::2]).double().sum(0))
    params = get_architecture(model).prunable_parameters(model, layout)
    assert memory.grad_bytes(model, layout, "fp64") == 8 * sum(p.numel() for p in params)


def test_fp32_accumulation_without_grad_dtype_uses_hooks(monkeypatch):
    """Older torch: fp32 buffers via post-accumulate hooks, rounded once to the weight dtype."""
    bf16 = tiny_model().to(torch.bfloat16)
    fp32 = _grads(bf16, "fp32")
    monkeypatch.setattr(grad_mod, "_HAS_GRAD_DTYPE", False)
    hooked = _grads(bf16, "fp32")
    for h, f in zip(hooked, fp32):
        assert h.dtype == torch.bfloat16
        torch.testing.assert_close(h, f.to(torch.bfloat16), rtol=0, atol=0)


def test_bf16_run_records_its_precision_and_leaves_no_state():
    model = tiny_model().to(torch.bfloat16)
    traj = gisp.prune(model, gisp.PruneConfig(**CFG), random_calib(), progress=False)
    assert traj.config["grad_accum_dtype"] == "fp32" and traj.model["weight_dtype"] == "bfloat16"
    assert all(p.grad is None and p.grad_dtype == p.dtype for p in model.parameters())
    with pytest.raises(gisp.GispError, match="grad-accum-dtype"):
        gisp.PruneConfig(grad_accum_dtype="fp8")


@pytest.mark.parametrize("native", [True, False])
def test_bf16_autocast_warns_only_where_it_is_emulated(monkeypatch, recwarn, native):
    """An AVX2-only CPU emulates bf16 (about 25x slower than fp32 on SmolLM2): say so instead of crawling."""
    monkeypatch.setattr(grad_mod, "native_bf16", lambda device: native)
    gisp.prune(tiny_model(), gisp.PruneConfig(**{**CFG, "autocast": "bf16"}), random_calib(), progress=False)
    emulated = [w for w in recwarn if "runs emulated" in str(w.message)]
    assert len(emulated) == (0 if native else 1)


# --- placement ----------------------------------------------------------------------------------------------
def test_device_map_model_prunes_like_a_plain_one_and_offload_is_refused(tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_model().save_pretrained(tmp_path / "m")
    ref = gisp.prune(tiny_model(), gisp.PruneConfig(**CFG), random_calib(), progress=False)
    placed = AutoModelForCausalLM.from_pretrained(tmp_path / "m", device_map="auto")
    traj = gisp.prune(placed, gisp.PruneConfig(**CFG), random_calib(), progress=False)
    assert all(getattr(traj, k) == getattr(ref, k) for k in STRUCTURE)
    dm = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
          **{f"model.layers.{i}": ("disk" if i == 2 else "cpu") for i in range(4)}}
    offloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", device_map=dm, offload_folder=tmp_path / "off")
    with pytest.raises(gisp.GispError, match="offloaded"):
        gisp.prune(offloaded, gisp.PruneConfig(**CFG), random_calib(), progress=False)
