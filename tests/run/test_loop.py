"""The iterative global loop: nesting, protection, sparsity accuracy, exact masking, resume."""

import importlib
import json

import pytest
import torch
from tests.conftest import VARIANTS, random_calib, tiny_model

import gisp
from gisp.architectures import apply_mask, layout_of
from gisp.core.schedule import targets
from gisp.core.structures import Mask
from gisp.run.trajectory import Trajectory

CFG = dict(target=0.5, steps=5, batch_size=4, protect_first=0.25, protect_last=1)


def run(arch="llama", kv=2, **kw):
    model = tiny_model(arch, kv)
    traj = gisp.prune(model, gisp.PruneConfig(**{**CFG, **kw}), random_calib(), progress=False)
    return model, traj


@pytest.mark.parametrize("arch,kv", VARIANTS)
def test_masks_nested_protected_and_on_target(arch, kv):
    model, traj = run(arch, kv)
    layout = traj.layout
    sched = targets("linear", 0.5, 5)
    masks = [traj.mask_at_step(k) for k in range(6)]
    for k in range(1, 6):
        assert masks[k].is_subset_of(masks[k - 1])
        # within one structure below the target: the largest structure is an MHA head
        biggest = max(s.params(1, 1, 0) for s in layout.layers) / layout.dense_params
        achieved = traj.steps[k]["sparsity"]
        assert sched[k - 1] - biggest <= achieved <= sched[k - 1] + 1e-9
        assert achieved == pytest.approx(masks[k].sparsity(layout))
    for i in layout.protected:
        assert masks[-1].heads[i].all() and masks[-1].channels[i].all()
    assert {0, 3} == set(layout.protected)
    # the model left by prune() is the last mask applied to the base model
    fresh = tiny_model(arch, kv)
    apply_mask(fresh, masks[-1])
    ids = torch.randint(0, 97, (2, 16))
    torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


def test_structures_unit_reproduces_reference_schedule():
    _, traj = run(schedule_unit="structures", target=0.4)
    layout = traj.layout
    total = layout.num_structures()
    for k, t in enumerate(targets("linear", 0.4, 5), start=1):
        removed = traj.steps[k]["heads_removed"] + traj.steps[k]["channels_removed"]
        assert removed == round(t * total)


@pytest.mark.parametrize("schedule", ["cosine", "exp"])
def test_other_schedules_reach_target(schedule):
    _, traj = run(schedule=schedule)
    assert traj.steps[-1]["sparsity"] == pytest.approx(0.5, abs=0.02)
    assert [s["sparsity"] for s in traj.steps] == sorted(s["sparsity"] for s in traj.steps)


@pytest.mark.parametrize("arch,kv", [("llama", 2), ("qwen2", 4)])
def test_masked_structures_contribute_nothing(arch, kv):
    """Whatever values the removed structures' weights held, the masked model is the same."""
    _, traj = run(arch, kv)
    mask = traj.mask_at_step(traj.last_step)
    a, b = tiny_model(arch, kv), tiny_model(arch, kv)
    layout = layout_of(b)
    with torch.no_grad():  # scramble every removed structure of b (and only those)
        for i, layer in enumerate(b.model.layers):
            at, mlp, d = layer.self_attn, layer.mlp, 16
            for h in (~mask.heads[i]).nonzero().flatten().tolist():
                at.q_proj.weight[h * d:(h + 1) * d].normal_()
                at.o_proj.weight[:, h * d:(h + 1) * d].normal_()
            for g in (~mask.kv_heads(layout, i)).nonzero().flatten().tolist():
                at.k_proj.weight[g * d:(g + 1) * d].normal_()
                at.v_proj.weight[g * d:(g + 1) * d].normal_()
            gone = ~mask.channels[i]
            mlp.gate_proj.weight[gone] = torch.randn_like(mlp.gate_proj.weight[gone])
            mlp.down_proj.weight[:, gone] = torch.randn_like(mlp.down_proj.weight[:, gone])
    apply_mask(a, mask)
    apply_mask(b, mask)
    ids = torch.randint(0, 97, (2, 16))
    torch.testing.assert_close(a(input_ids=ids).logits, b(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_fully_removed_blocks_output_zero():
    model = tiny_model("llama", 2)
    layout = layout_of(model)
    mask = Mask.dense(layout)
    mask.heads[1][:] = False
    mask.channels[1][:] = False
    apply_mask(model, mask)
    outs = {}
    layer = model.model.layers[1]
    layer.self_attn.register_forward_hook(lambda m, i, o: outs.__setitem__("attn", o[0]))
    layer.mlp.register_forward_hook(lambda m, i, o: outs.__setitem__("mlp", o))
    model(input_ids=torch.randint(0, 97, (1, 8)))
    assert outs["attn"].abs().max() == 0 and outs["mlp"].abs().max() == 0
    assert mask.kept_params(layout) == layout.dense_params - layout.layers[1].dense_params


def test_resume_equals_uninterrupted(tmp_path):
    config = gisp.PruneConfig(**CFG)
    gisp.prune(tiny_model(), config, random_calib(), run_dir=tmp_path / "a", progress=False)
    part = gisp.prune(tiny_model(), config, random_calib(), run_dir=tmp_path / "b", progress=False, stop_after=2)
    assert not part.completed and part.last_step == 2
    with pytest.raises(gisp.GispError, match="--resume"):
        gisp.prune(tiny_model(), config, random_calib(), run_dir=tmp_path / "b", progress=False)
    resumed = gisp.prune(tiny_model(), config, random_calib(), run_dir=tmp_path / "b", progress=False,
                         resume=True)
    assert resumed.completed
    a = json.loads((tmp_path / "a" / "trajectory.json").read_text())
    b = json.loads((tmp_path / "b" / "trajectory.json").read_text())
    for key in ("head_step", "channel_step", "head_order", "channel_order"):
        assert a[key] == b[key]
    for sa, sb in zip(a["steps"], b["steps"], strict=True):
        assert sa["sparsity"] == sb["sparsity"] and sa["calib_loss"] == pytest.approx(sb["calib_loss"], rel=1e-6)
    # a different configuration in the same directory is refused
    with pytest.raises(gisp.GispError, match="different settings"):
        gisp.prune(tiny_model(), gisp.PruneConfig(**{**CFG, "steps": 7}), random_calib(),
                   run_dir=tmp_path / "b", progress=False, resume=True)


def test_crash_mid_step_then_resume(tmp_path, monkeypatch):
    """A run that dies inside a step keeps its last completed step on disk and resumes to the same end."""
    import importlib

    prune_mod = importlib.import_module("gisp.run.loop")  # the loop module, which calls accumulate_gradients

    config = gisp.PruneConfig(**CFG)
    full = gisp.prune(tiny_model(), config, random_calib(), progress=False)
    real, calls = prune_mod.accumulate_gradients, {"n": 0}

    def dies_on_third_pass(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")
        return real(*args, **kwargs)

    monkeypatch.setattr(prune_mod, "accumulate_gradients", dies_on_third_pass)
    with pytest.raises(KeyboardInterrupt):
        gisp.prune(tiny_model(), config, random_calib(), run_dir=tmp_path, progress=False)
    on_disk = Trajectory.load(tmp_path)
    assert on_disk.last_step == 2 and not on_disk.completed
    monkeypatch.setattr(prune_mod, "accumulate_gradients", real)
    resumed = gisp.prune(tiny_model(), config, random_calib(), run_dir=tmp_path, progress=False, resume=True)
    assert resumed.head_step == full.head_step and resumed.channel_step == full.channel_step
    assert [s["sparsity"] for s in resumed.steps] == [s["sparsity"] for s in full.steps]


def test_progress_pairs_each_loss_with_the_mask_it_was_measured_on():
    """A step's gradient pass measures the previous mask; only the last step measures its own."""
    loop = importlib.import_module("gisp.run.loop")
    _, traj = run()
    s = [r["sparsity"] for r in traj.steps]
    loss = [r["calib_loss"] for r in traj.steps]
    mid = dict(traj.steps[2], calib_loss=None)  # as the bar sees step 2: its own loss not measured yet
    traj.steps[2] = mid
    assert loop._progress_text(traj, 2) == f"sparsity={s[2]:.3f}, loss={loss[1]:.3f} at sparsity {s[1]:.3f}"
    assert loop._progress_text(traj, 5) == f"sparsity={s[5]:.3f}, loss={loss[5]:.3f} at sparsity {s[5]:.3f}"


def test_shrink_schedule():
    loop = importlib.import_module("gisp.run.loop")
    due = [k for k in range(1, 10) if loop._shrink_due(k, 3, have_copy=True)]
    assert due == [4, 7] and not any(loop._shrink_due(k, 0, False) for k in range(1, 10))
    assert loop._shrink_due(6, 3, have_copy=False)  # a resumed run past its first slicing slices at once
    assert not loop._shrink_due(3, 3, have_copy=False)


def test_resume_refuses_other_calibration_data(tmp_path):
    """Resume used to check the settings only: a changed calibration file went on under the old provenance."""
    config = gisp.PruneConfig(**CFG)
    gisp.prune(tiny_model(), config, random_calib(), run_dir=tmp_path, progress=False, stop_after=2)
    saved = json.loads((tmp_path / "trajectory.json").read_text())
    assert saved["calibration"]["tokens_sha256"] == random_calib().fingerprint()
    with pytest.raises(gisp.GispError, match="calibrated on other data .* restore that data or use another --out"):
        gisp.prune(tiny_model(), config, random_calib(seed=1), run_dir=tmp_path, progress=False, resume=True)
    assert json.loads((tmp_path / "trajectory.json").read_text()) == saved  # nothing written
    done = gisp.prune(tiny_model(), config, random_calib(), run_dir=tmp_path, progress=False, resume=True)
    assert done.completed and done.calibration["tokens_sha256"] == random_calib().fingerprint()


def test_runs_saved_without_a_calibration_hash_resume_with_a_warning(tmp_path):
    config = gisp.PruneConfig(**CFG)
    gisp.prune(tiny_model(), config, random_calib(), run_dir=tmp_path, progress=False, stop_after=2)
    path = tmp_path / "trajectory.json"
    d = json.loads(path.read_text())
    del d["calibration"]["tokens_sha256"], d["checksum"]  # as gisp wrote it before either existed
    path.write_text(json.dumps(d))
    with pytest.warns(UserWarning, match="did not record its calibration tokens"):
        done = gisp.prune(tiny_model(), config, random_calib(seed=1), run_dir=tmp_path, progress=False, resume=True)
    assert done.completed and "tokens_sha256" not in done.calibration  # unknown data is not claimed as checked


def test_a_new_run_removes_temporaries_a_killed_write_left(tmp_path):
    """A kill during a trajectory write used to leave trajectory.json.XXXXXXXX.tmp in the run folder forever."""
    import os

    config = gisp.PruneConfig(**CFG)
    gisp.prune(tiny_model(), config, random_calib(), run_dir=tmp_path, progress=False, stop_after=1)
    left = [tmp_path / "trajectory.json.k1ll3d_x.tmp", tmp_path / "eval.json.abcdefgh.tmp"]
    for f in left:
        f.write_text('{"half": ')
        os.utime(f, (0, 0))
    gisp.prune(tiny_model(), config, random_calib(), run_dir=tmp_path, progress=False, stop_after=1, resume=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trajectory.json"]


def test_calibration_longer_than_the_context_is_refused_before_any_work(monkeypatch):
    """A --seq-len far past max_position_embeddings used to grind for minutes."""
    loop = importlib.import_module("gisp.run.loop")
    monkeypatch.setattr(loop, "accumulate_gradients", lambda *a, **k: pytest.fail("gradients ran"))
    with pytest.raises(gisp.GispError, match="calibration samples of 129 exceeds the model's context length of "
                       "128 tokens: use --seq-len 128 or less"):
        gisp.prune(tiny_model(), gisp.PruneConfig(**CFG), random_calib(n=2, seq_len=129), progress=False)


def test_resume_refuses_a_run_file_changed_after_it_was_written(tmp_path):
    """Resuming would stamp a fresh checksum on the change."""
    config = gisp.PruneConfig(**CFG)
    gisp.prune(tiny_model(), config, random_calib(), run_dir=tmp_path, progress=False, stop_after=2)
    path = tmp_path / "trajectory.json"
    d = json.loads(path.read_text())
    d["calibration"]["name"] = "something else"
    path.write_text(json.dumps(d))
    with pytest.warns(UserWarning, match="was changed"), pytest.raises(gisp.GispError, match="checksum mismatch"):
        gisp.prune(tiny_model(), config, random_calib(), run_dir=tmp_path, progress=False, resume=True)
