"""PruneConfig: every bad setting is refused with a one-line error naming its option; what resumes."""

from __future__ import annotations

import json

import pytest
from tests.conftest import random_calib, tiny_model

import gisp
from gisp.run.config import LEGACY, RESUME_FREE, PruneConfig, resume_conflicts

CFG = dict(target=0.5, steps=4, batch_size=3, protect_first=0.25, protect_last=1)


@pytest.mark.parametrize("kw,match", [
    ({"target": 0.0}, "target sparsity must be in \\(0, 1\\)"),
    ({"target": 1.0}, "target sparsity must be in \\(0, 1\\)"),
    ({"steps": 0}, "--steps must be at least 1"),
    ({"schedule": "step"}, "unknown --schedule 'step'"),
    ({"schedule_unit": "flops"}, "unknown --schedule-unit 'flops'"),
    ({"normalize": "l2"}, "unknown --normalize 'l2'"),
    ({"autocast": "fp8"}, "unknown --autocast 'fp8'"),
    ({"grad_accum_dtype": "fp8"}, "unknown --grad-accum-dtype 'fp8'"),
    ({"calib_samples": 0}, "--calib-samples must be at least 1"),
    ({"batch_size": 0}, "--batch-size must be at least 1"),
    ({"shrink_every": -1}, "--shrink-every must be 0"),
    ({"objective": "no-such-objective"}, "no-such-objective"),
])
def test_bad_settings_are_refused(kw, match):
    with pytest.raises(gisp.GispError, match=match):
        PruneConfig(**kw)


def test_dict_round_trip_ignores_unknown_keys():
    cfg = PruneConfig(**CFG, shrink_every=2)
    assert PruneConfig.from_dict(cfg.to_dict()) == cfg
    assert PruneConfig.from_dict({**cfg.to_dict(), "method": "gisp", "nested": True}) == cfg
    assert list(cfg.to_dict())[:3] == ["target", "steps", "schedule"]  # field order: the saved file's order


def test_resume_conflicts_ignore_speed_settings_and_know_old_runs():
    cfg = PruneConfig(**CFG)
    saved = cfg.to_dict()
    changed = {k: (v + 1 if isinstance(v, int) and not isinstance(v, bool) else not v)
               for k, v in saved.items() if k in RESUME_FREE}
    assert resume_conflicts({**saved, **changed}, cfg, "float32") == []
    assert resume_conflicts({**saved, "steps": 7, "seed": 1}, cfg, "float32") == ["seed", "steps"]
    old = {k: v for k, v in saved.items() if k not in LEGACY}  # saved before those settings existed
    assert resume_conflicts(old, cfg, "float32") == []  # native == fp32 for fp32 weights
    assert resume_conflicts(old, cfg, "bfloat16") == ["grad_accum_dtype"]


def test_runs_saved_before_the_new_settings_resume(tmp_path):
    config = gisp.PruneConfig(**CFG)
    gisp.prune(tiny_model(), config, random_calib(), run_dir=tmp_path, progress=False, stop_after=2)
    path = tmp_path / "trajectory.json"
    d = json.loads(path.read_text())
    for key in ("grad_checkpointing", "grad_accum_dtype"):
        del d["config"][key]
    del d["checksum"]  # as such runs were saved
    path.write_text(json.dumps(d))
    resumed = gisp.prune(tiny_model(), gisp.PruneConfig(**CFG, grad_checkpointing=True), random_calib(),
                         run_dir=tmp_path, resume=True, progress=False)
    assert resumed.completed


def test_seq_len_beyond_the_models_context_is_one_line():
    from types import SimpleNamespace

    from gisp.run.config import check_seq_len

    check_seq_len(2048, SimpleNamespace(max_position_embeddings=2048))
    check_seq_len(10**5, SimpleNamespace())  # no known context: nothing to check
    with pytest.raises(gisp.GispError, match="--seq-len 100000 exceeds the model's context length of 8192 tokens"):
        check_seq_len(10**5, SimpleNamespace(max_position_embeddings=8192))
