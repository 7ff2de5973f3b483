"""The trajectory file: typed step records, the only writers of its arrays, nested masks, old files."""

from __future__ import annotations

import json

import pytest
import torch
from tests.conftest import random_calib, tiny_model

import gisp
from gisp.core.ranking import Pick
from gisp.core.structures import LayerShape, Layout, Mask
from gisp.run.trajectory import StepRecord, Trajectory, checksum

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
            {"step": 0, "target": 0.0, "sparsity": 0.0, "kept_params": 656, "calib_loss": 3.0, "heads_removed": 0,
             "channels_removed": 0, "seconds": 0.0},
            {"step": 1, "target": 0.25, "sparsity": 1 - 504 / 656, "kept_params": 504, "calib_loss": 3.5,
             "heads_removed": 1, "channels_removed": 1, "seconds": 2.0, "lr": 0.1},
            {"step": 2, "target": 0.5, "sparsity": 1 - 352 / 656, "kept_params": 352, "calib_loss": 4.0,
             "heads_removed": 2,
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
    assert traj.record(1) == StepRecord(1, 0.25, 1 - 504 / 656, 504, 3.5, 1, 1, 2.0)
    assert traj.record(2).timing == {"processes": 1, "scoring": 0.1, "save": 0.01}
    mask = traj.mask_at_step(1)
    assert mask.heads[0].tolist() == [False, True] and mask.channels[0].tolist() == [True, False, True]
    saved = traj.to_dict()
    assert saved.pop("checksum") == checksum(d) and saved == d  # saved back as it was, with a checksum now
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


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """One run's trajectory.json (5 steps, layer 0 and 3 protected) as a dict."""
    _, traj = run()
    return json.loads(json.dumps(traj.to_dict()))


def _set(path: list, value):
    def edit(d):
        target = d
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return edit


def _removed(d, key="head_step"):
    """(layer, index) of a structure removed at step 1."""
    return next((i, j) for i, row in enumerate(d[key]) for j, x in enumerate(row) if x == 1)


EDITS = {
    "step past the last": (lambda d: _set(["head_step", *_removed(d)], 6)(d),
                           r"head_step\[\d\]\[\d\]' must be a step in 0\.\.5"),
    "negative step": (lambda d: _set(["channel_step", *_removed(d, "channel_step")], -1)(d), r"channel_step\[\d\]"),
    "protected layer": (lambda d: _set(["channel_step", 0, 0], 3)(d), r"channel_step\[0\]' removes structures of "
                        "protected layer 0"),
    "a string": (lambda d: _set(["head_step", 1, 0], "1")(d), r"head_step\[1\]\[0\]' must be a step"),
    "a float": (lambda d: _set(["head_step", 1, 0], 1.0)(d), r"head_step\[1\]\[0\]"),
    "row too short": (lambda d: d["channel_step"][1].pop(), r"channel_step\[1\]' must be a list of 96"),
    "row too long": (lambda d: d["head_order"][2].append(-1), r"head_order\[2\]' must be a list of 4"),
    "missing rows": (lambda d: d["head_step"].pop(), r"head_step' must hold one row per layer \(4\)"),
    "missing key": (lambda d: d.pop("channel_order"), "channel_order' is missing"),
    "missing record key": (lambda d: d["steps"][2].pop("kept_params"), r"steps\[2\]\.kept_params' is missing"),
    "kept params": (lambda d: d["steps"][3].update(kept_params=d["steps"][3]["kept_params"] + 1),
                    r"steps\[3\]\.kept_params' is \d+, but the step's mask keeps"),
    "sparsity": (lambda d: d["steps"][4].update(sparsity=0.4), r"steps\[4\]\.sparsity' is 0\.4, but the step's mask"),
    "sparsity as text": (lambda d: d["steps"][4].update(sparsity="0.4"), r"steps\[4\]\.sparsity' must be a number"),
    "heads removed": (lambda d: d["steps"][5].update(heads_removed=0), r"steps\[5\]\.heads_removed' is 0"),
    "record out of order": (lambda d: d["steps"][1].update(step=2), r"steps\[1\]\.step' must be 1"),
    "extra step": (lambda d: d["steps"].append(dict(d["steps"][-1], step=6)), "'steps' holds 6 steps, more than"),
    "not completed": (lambda d: d.update(completed="yes"), "'completed' must be true or false"),
    "duplicate order": (lambda d: _set(["channel_order", *_removed(d, "channel_step")],
                                       d["head_order"][_removed(d)[0]][_removed(d)[1]])(d),
                        "pruning order must number"),
    "order of a kept structure": (lambda d: _set(["head_order", 0, 0], 3)(d), r"head_order\[0\]\[0\]' must be -1"),
    "protected edited": (lambda d: d["layout"].update(protected=[3]), r"layout\.protected' is \[3\], but the run's"),
    "layout shape": (lambda d: d["layout"]["layers"][1].update(intermediate="96"), r"layers\[1\]\.intermediate'"),
    "model not an object": (lambda d: d.update(model=[]), "'model' must be a JSON object"),
}


@pytest.mark.parametrize("edit", list(EDITS), ids=list(EDITS))
def test_load_refuses_edited_or_damaged_files_naming_the_field(saved_run, tmp_path, edit):
    """Edited files used to load as they were, their stored (wrong) records printed as if right."""
    change, match = EDITS[edit]
    d = json.loads(json.dumps(saved_run))
    change(d)
    path = tmp_path / "trajectory.json"
    path.write_text(json.dumps(d))
    with pytest.raises(gisp.GispError, match=match) as err:
        Trajectory.load(tmp_path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: field '") and "\n" not in msg and msg.endswith("re-run gisp prune")


def test_a_saved_run_is_valid_and_unedited(saved_run, tmp_path, recwarn):
    (tmp_path / "trajectory.json").write_text(json.dumps(saved_run))
    loaded = Trajectory.load(tmp_path)
    assert not loaded.edited and not recwarn.list and loaded.source == str(tmp_path / "trajectory.json")
    d = dict(saved_run, model={**saved_run["model"], "name": "moved", "path": "/elsewhere"})
    (tmp_path / "trajectory.json").write_text(json.dumps(d))
    assert not Trajectory.load(tmp_path).edited  # pointing at a moved base model is no edit


def test_a_consistent_edit_loads_with_a_warning(saved_run, tmp_path):
    """An edit that keeps the file valid (here: a claim about the calibration data) is no longer silent."""
    d = json.loads(json.dumps(saved_run))
    d["calibration"]["name"] = "claimed"
    (tmp_path / "trajectory.json").write_text(json.dumps(d))
    with pytest.warns(UserWarning, match="was changed after gisp wrote it"):
        assert Trajectory.load(tmp_path).edited


def test_the_fingerprint_error_blames_the_file_or_the_model(saved_run, tmp_path):
    """The fingerprint error used to blame the model when the run file was what differed."""
    (tmp_path / "trajectory.json").write_text(json.dumps(saved_run))
    with pytest.raises(gisp.GispError, match="is not the run's base model .* made from another model"):
        Trajectory.load(tmp_path).apply(tiny_model(seed=1), 0.3)  # the model differs
    d = json.loads(json.dumps(saved_run))
    d["model"]["fingerprint"] = "0123456789abcdef"
    (tmp_path / "trajectory.json").write_text(json.dumps(d))
    with pytest.warns(UserWarning, match="was changed"):
        traj = Trajectory.load(tmp_path)
    with pytest.raises(gisp.GispError, match=r"trajectory.json was changed after gisp wrote it .* fingerprint "
                       r"0123456789abcdef is not this model's"):
        traj.apply(tiny_model(), 0.3)  # the right model, an edited file
    d["model"]["fingerprint"] = 12
    (tmp_path / "trajectory.json").write_text(json.dumps(d))
    with pytest.raises(gisp.GispError, match="'model.fingerprint' must be a string"):
        Trajectory.load(tmp_path)


def test_apply_refuses_a_step_outside_the_run():
    model, traj = run()
    with pytest.raises(gisp.GispError, match="outside this run's steps"):
        traj.apply(tiny_model(), step=9)
