"""Elastic model: one copy of the weights, every level of a run by prefix slicing."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.conftest import VARIANTS, tiny_model
from tests.deploy.test_export import TOL, greedy, hand_trajectory, ids, masked, max_diff, n_params, pruned

import gisp
from gisp.architectures import apply_mask
from gisp.architectures.slicing import slim_model
from gisp.deploy.elastic import ElasticModel
from gisp.errors import GispError


@pytest.mark.parametrize("arch,kv", VARIANTS)
def test_every_level_equals_its_export_without_copying_weights(arch, kv):
    base, traj = pruned(arch, kv)
    el = ElasticModel(copy.deepcopy(base), traj)
    storage = [p.data_ptr() for p in el.parameters()]
    x = ids()
    for step in (3, 0, traj.last_step, 1, 4, 2):
        el.set_step(step)
        slim = slim_model(base, traj.mask_at_step(step))
        assert max_diff(el, slim, x) <= TOL
        assert el.active_params() == n_params(slim)
        if step in (0, 3):
            assert torch.equal(greedy(el, x[:1]), greedy(slim, x[:1]))
    assert [p.data_ptr() for p in el.parameters()] == storage  # switching levels copies nothing
    assert n_params(el) == n_params(base)


def test_set_sparsity_follows_the_trajectory():
    base, traj = pruned("llama", 2)
    el = ElasticModel(copy.deepcopy(base), traj)
    rec = el.set_sparsity(0.3)
    assert rec["step"] == traj.step_at(0.3)["step"] == el.step and el.sparsity == rec["sparsity"]
    widths = el.widths()
    mask = traj.mask_at_step(el.step)
    for i, (h, kvh, c) in enumerate(widths):
        assert h == int(mask.heads[i].sum()) and c == int(mask.channels[i].sum())
        assert kvh == int(mask.kv_heads(traj.layout, i).sum())
    with pytest.raises(GispError):
        el.set_step(traj.last_step + 1)
    with pytest.raises(GispError):
        el.set_sparsity(1.5)


def test_uneven_groups_and_empty_blocks_with_kv_cache():
    base = tiny_model("qwen3", 2, layers=4)
    traj = hand_trajectory(base, {0: [1, 1, 1, 1], 1: [0, 2, 0, 1]}, {2: [1] * 96, 3: [2] * 50 + [0] * 46})
    el = ElasticModel(copy.deepcopy(base), traj)
    x = ids()
    for step in (2, 1, 0):
        el.set_step(step)
        ref = masked(base, traj.mask_at_step(step))
        assert max_diff(el, ref, x) <= TOL
        assert torch.equal(greedy(el, x[:1]), greedy(ref, x[:1]))
    el.set_step(2)
    assert el.widths()[0] == (0, 0, 96) and el.widths()[1] == (2, 2, 96) and el.widths()[2][2] == 0


def test_refuses_a_different_model():
    base, traj = pruned("llama", 2)
    with pytest.raises(GispError, match="fingerprint"):
        ElasticModel(tiny_model("llama", 2, layers=6, seed=1), traj)


@pytest.mark.integration
def test_smollm2_elastic_from_run_matches_exports(smollm2, tmp_path):
    from gisp.core.calibration import build_calibration

    base = smollm2.model
    calib = build_calibration("lm", "c4", smollm2.tokenizer, 4, 64, 0)
    run = tmp_path / "run"
    traj = gisp.prune(copy.deepcopy(base), gisp.PruneConfig(target=0.3, steps=3, batch_size=4, calib_samples=4,
                                                             seq_len=64),
                      calib, run_dir=run, progress=False,
                      model_info={"name": "smollm2-135m", "path": smollm2.path})
    el = ElasticModel.from_run(run, dtype="fp32", device="cpu")
    x = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    ref = copy.deepcopy(base)
    for s in (0.1, 0.3):  # nested masks: the second is applied on top of the first
        rec = el.set_sparsity(s)
        apply_mask(ref, traj.mask_at_step(rec["step"]))
        assert max_diff(el, ref, x) <= TOL
    assert el.tokenizer is not None
