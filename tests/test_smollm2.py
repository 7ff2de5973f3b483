"""Integration: a few GISP steps on the real SmolLM2-135M (small budgets)."""

import pytest

import gisp

pytestmark = pytest.mark.integration


def test_smollm2_prune_and_perplexity_rises(smollm2, tmp_path):
    import copy

    model = copy.deepcopy(smollm2.model)
    config = gisp.PruneConfig(target=0.5, steps=3, calib="c4", calib_samples=8, seq_len=64, autocast="bf16")
    calib = gisp.build_calibration("lm", "c4", smollm2.tokenizer, 8, 64, 0)
    traj = gisp.prune(model, config, calib, run_dir=tmp_path, model_info={"name": "smollm2-135m"}, progress=False)
    assert traj.completed and traj.layout.protected == frozenset({0, 1, 2, 29})
    assert traj.steps[-1]["sparsity"] == pytest.approx(0.5, abs=0.002)
    losses = [s["calib_loss"] for s in traj.steps]
    assert losses == sorted(losses)  # calibration loss rises as structures go
    res = gisp.evaluate(tmp_path, [0.0, 0.5], ppl="wiki", window=128, max_windows=8, progress=False)
    dense, pruned = (r["ppl"]["ppl"] for r in res["rows"])
    assert 10 < dense < 60  # a real pretrained model, not a random one
    assert pruned > dense
