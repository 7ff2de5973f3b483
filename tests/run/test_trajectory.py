"""The trajectory file: typed step records, the only writers of its arrays, nested masks, old files."""

from __future__ import annotations

import json

import pytest
import torch
from tests.conftest import random_calib, tiny_model

import gisp
from gisp.core.ranking import Pick
from gisp.core.structures import LayerShape, Layout, Mask
from gisp.run.trajectory import StepRecord, Trajectory

CFG = dict(target=0.5, steps=5, batch_size=4, protect_first=0.25, protect_last=1)
# the keys of a step record as trajectory.json has always written them, in that order
BASE_KEYS = ["step", "target", "sparsity", "kept_params", "calib_loss", "heads_removed", "channels_removed"]


def run(arch="llama", kv=2, **kw):
    model = tiny_model(arch, kv)
    traj = gisp.prune(model, gisp.PruneConfig(**{**CFG, **kw}), random_calib(), progress=False)
    return model, traj


def small() -> tuple[Layout, Trajectory]:
    """Two layers of 2 heads (MHA) and 3 channels, nothing protected."""
    layout = Layout((LayerShape(2, 2, 4, 8, 3),) * 2, frozenset())
    return layout, Trajectory.start(layout, {"objective": "lm"}, {"name": "m"}, {}, {})


def record(layout: Layout, traj: Trajectory, step: int, picks: list[Pick], target: float
           ) -> tuple[Mask, StepRecord]:
    """The mask after removing ``picks`` from the last step's, and its record."""
    mask = traj.mask_at_step(traj.last_step)
    for p in picks:
        (mask.heads if p.kind == "head" else mask.channels)[p.layer][p.index] = False
    return mask, StepRecord.of_mask(step, target, mask, layout, seconds=1.0)


def test_start_records_the_dense_step_zero():
    layout, traj = small()
    assert traj.steps == [{"step": 0, "target": 0.0, "sparsity": 0.0, "kept_params": layout.dense_params,
                           "calib_loss": None, "heads_removed": 0, "channels_removed": 0, "seconds": 0.0}]
    assert traj.last_step == 0 and traj.next_order() == 0 and not traj.completed
    assert traj.mask_at_step(0).kept_params(layout) == layout.dense_params


def test_record_step_writes_steps_orders_and_nested_masks():
    layout, traj = small()
    first = [Pick("channel", 1, 2), Pick("head", 0, 1)]
    _, rec = record(layout, traj, 1, first, 0.2)
    assert traj.record_step(rec, first, traj.next_order()) == 2
    second = [Pick("channel", 0, 0), Pick("channel", 1, 0), Pick("head", 1, 0)]
    mask2, rec2 = record(layout, traj, 2, second, 0.5)
    assert traj.record_step(rec2, second, 2) == 5
    assert traj.head_step == [[0, 1], [2, 0]] and traj.channel_step == [[2, 0, 0], [2, 0, 1]]
    assert traj.head_order == [[-1, 1], [4, -1]] and traj.channel_order == [[2, -1, -1], [3, -1, 0]]
    assert traj.next_order() == 5 and traj.last_step == 2
    masks = [traj.mask_at_step(k) for k in range(3)]
    assert masks[2].is_subset_of(masks[1]) and masks[1].is_subset_of(masks[0])
    assert all(torch.equal(a, b) for a, b in zip(masks[2].heads + masks[2].channels, mask2.heads + mask2.channels))
    assert traj.steps[2] == rec2.to_dict() and traj.record(2) == rec2
    assert traj.steps[2]["heads_removed"] == 2 and traj.steps[2]["channels_removed"] == 3
    # a step out of turn, or a structure removed twice, is an internal error
    with pytest.raises(gisp.GispError, match="step 4 recorded after step 2"):
        traj.record_step(StepRecord(4, 0.6, 0.6, 1), [], 5)
    with pytest.raises(gisp.GispError, match="removed twice"):
        traj.record_step(StepRecord(3, 0.6, 0.6, 1), [Pick("head", 0, 1)], 5)
    with pytest.raises(gisp.GispError, match="outside this run's steps"):
        traj.mask_at_step(3)


def test_set_loss_and_timing_fill_in_recorded_steps():
    layout, traj = small()
    picks = [Pick("channel", 0, 1)]
    _, rec = record(layout, traj, 1, picks, 0.1)
    rec.timing = {"processes": 1, "save": 0.0}
    traj.record_step(rec, picks, 0)
    traj.set_loss(0, 2.5)
    traj.set_loss(1, 2.75)
    traj.set_timing(1, "save", 0.25)
    assert [s["calib_loss"] for s in traj.steps] == [2.5, 2.75]
    assert traj.steps[1]["timing"] == {"processes": 1, "save": 0.25} and rec.timing["save"] == 0.0  # a copy
    with pytest.raises(gisp.GispError, match="outside this run's steps"):
        traj.set_loss(2, 1.0)
    with pytest.raises(gisp.GispError, match="has no timing"):
        traj.set_timing(0, "save", 1.0)


def test_step_record_dict_keys_and_order_are_the_files():
    plain = StepRecord(3, 0.3, 0.29, 100, 1.5, 2, 7, seconds=0.5)
    assert list(plain.to_dict()) == [*BASE_KEYS, "seconds"]
    full = StepRecord(3, 0.3, 0.29, 100, 1.5, 2, 7, 0.5, 0.4, {"processes": 2, "save": 0.0}, work_params=900)
    d = full.to_dict()
    assert list(d) == [*BASE_KEYS, "work_params", "seconds", "gradient_seconds", "timing"]
    assert StepRecord.from_dict(d) == full and StepRecord.from_dict(plain.to_dict()) == plain
    assert StepRecord.from_dict({**d, "future_key": 1}) == full  # unknown keys are ignored


def test_step_at_takes_the_last_step_at_or_below():
    _, traj = run()
    sp = [s["sparsity"] for s in traj.steps]
    assert traj.step_at(0.0)["step"] == 0
    assert traj.step_at(sp[3])["step"] == 3  # exactly on a step
    assert traj.step_at((sp[3] + sp[4]) / 2)["step"] == 3
    assert traj.step_at(0.99)["step"] == 5
    with pytest.raises(gisp.GispError, match="sparsity must be in"):
        traj.step_at(1.0)


def test_run_masks_are_nested_and_match_the_arrays():
    _, traj = run()
    for k in range(1, traj.last_step + 1):
        prev, cur = traj.mask_at_step(k - 1), traj.mask_at_step(k)
        assert cur.is_subset_of(prev)
        gone = sum(int((p & ~c).sum()) for p, c in zip(prev.heads + prev.channels, cur.heads + cur.channels))
        assert gone == sum(x == k for arr in traj.head_step + traj.channel_step for x in arr)
    orders = sorted(o for arr in traj.head_order + traj.channel_order for o in arr if o >= 0)
    assert orders == list(range(traj.next_order()))  # one global order without gaps


def test_save_load_round_trip_is_exact(tmp_path):
    _, traj = run()
    path = traj.save(tmp_path)
    text = path.read_text()
    loaded = Trajectory.load(tmp_path)
    assert loaded.to_dict() == json.loads(text)
    assert loaded.save(tmp_path / "again").read_text() == text  # byte for byte
    assert [loaded.record(k) for k in range(6)] == [StepRecord.from_dict(s) for s in traj.steps]


def _old_file() -> dict:
    """A trajectory.json as gisp wrote it before StepRecord: step records as plain dicts, one of them from an
    even older version without timing and with a key this version does not know."""
    shape = {"num_heads": 2, "num_kv_heads": 2, "head_dim": 4, "hidden": 8, "intermediate": 3, "qkv_bias": False,
             "o_bias": False, "mlp_bias": False}
    return {
        "format": 1, "completed": True, "model": {"name": "old", "fingerprint": "abc"},
        "config": {"target": 0.5, "steps": 2, "objective": "lm"}, "calibration": {"name": "c4"},
        "versions": {"gisp": "0.1.0"}, "sparsity_definition": small()[1].to_dict()["sparsity_definition"],
        "layout": {"layers": [shape, shape], "protected": []},
        "steps": [
            {"step": 0, "target": 0.0, "sparsity": 0.0, "kept_params": 240, "calib_loss": 3.0, "heads_removed": 0,
             "channels_removed": 0, "seconds": 0.0},
            {"step": 1, "target": 0.25, "sparsity": 0.2, "kept_params": 192, "calib_loss": 3.5, "heads_removed": 1,
             "channels_removed": 1, "seconds": 2.0, "lr": 0.1},
            {"step": 2, "target": 0.5, "sparsity": 0.4, "kept_params": 144, "calib_loss": 4.0, "heads_removed": 2,
             "channels_removed": 2, "seconds": 2.0, "gradient_seconds": 1.5,
             "timing": {"processes": 1, "scoring": 0.1, "save": 0.01}},
        ],
        "head_step": [[1, 0], [0, 2]], "channel_step": [[0, 1, 0], [2, 0, 0]],
        "head_order": [[0, -1], [-1, 2]], "channel_order": [[-1, 1, -1], [3, -1, -1]],
    }


def test_old_files_load_and_save_back_unchanged(tmp_path):
    d = _old_file()
    (tmp_path / "trajectory.json").write_text(json.dumps(d))
    traj = Trajectory.load(tmp_path)
    assert traj.completed and traj.last_step == 2 and traj.next_order() == 4
    assert traj.step_at(0.3)["step"] == 1 and traj.steps[1]["lr"] == 0.1  # readers see the stored dicts
    assert traj.record(1) == StepRecord(1, 0.25, 0.2, 192, 3.5, 1, 1, 2.0)
    assert traj.record(2).timing == {"processes": 1, "scoring": 0.1, "save": 0.01}
    mask = traj.mask_at_step(1)
    assert mask.heads[0].tolist() == [False, True] and mask.channels[0].tolist() == [True, False, True]
    assert traj.to_dict() == d
    with pytest.raises(gisp.GispError, match="trajectory format 2"):
        (tmp_path / "trajectory.json").write_text(json.dumps({**d, "format": 2}))
        Trajectory.load(tmp_path)


def test_roundtrip_mask_at_and_apply(tmp_path):
    model, traj = run()
    traj.save(tmp_path)
    loaded = Trajectory.load(tmp_path)
    assert loaded.to_dict() == json.loads(json.dumps(traj.to_dict()))
    for s in (0.0, 0.15, 0.3, 0.5):
        rec = loaded.step_at(s)
        assert rec["sparsity"] <= s + 1e-9
        nxt = [r for r in loaded.steps if r["step"] == rec["step"] + 1]
        assert not nxt or nxt[0]["sparsity"] > s
    fresh = tiny_model()
    rec = loaded.apply(fresh, 0.5)
    assert rec["step"] == 5
    ids = torch.randint(0, 97, (1, 12))
    torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


def test_refuses_a_different_model():
    _, traj = run()
    with pytest.raises(gisp.GispError, match="fingerprint"):
        traj.apply(tiny_model(seed=1), 0.3)
    with pytest.raises(gisp.GispError, match="layer shapes"):
        traj.apply(tiny_model(layers=3), 0.3)
