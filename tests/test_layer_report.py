"""``gisp report``: per-layer kept fractions, plots, and the paper's two observations stated with numbers."""

import json
import sys

import pytest
from tests.conftest import one_thread_fixture, random_calib, tiny_model

import gisp
from gisp.architectures import layout_of
from gisp.baselines import get_method
from gisp.baselines.base import trajectory_of
from gisp.core.structures import Mask
from gisp.layer_report import write_layer_report

one_thread = one_thread_fixture("module")


def synthetic_run(tmp_path, mlp_more: bool, late_more: bool):
    """A two-level trajectory whose masks prune MLP vs heads and late vs early layers as asked."""
    model = tiny_model("llama", 2, layers=6)
    layout = layout_of(model, protect_first=0.0, protect_last=0)
    method = get_method("magnitude", protect_first=0.0, protect_last=0)
    masks, prev = [], Mask.dense(layout)
    for level, frac in ((0.2, 0.3), (0.4, 0.6)):
        mask = prev.clone()
        for i in range(6):
            heavy = (i >= 3) == late_more
            f = frac * (1.5 if heavy else 0.5)
            ch, hd = (f, f / 3) if mlp_more else (f / 3, f)
            mask.channels[i][: int(ch * 96)] = False
            mask.heads[i][: int(hd * 4)] = False
        masks.append((level, mask))
        prev = mask
    info = {"name": "tiny", "fingerprint": gisp.fingerprint(model)}
    traj = trajectory_of(method, layout, masks, model_info=info, calib=None)
    traj.save(tmp_path)
    return tmp_path


def cli(monkeypatch, capsys, *args):
    """Run the ``gisp`` entry point in-process; returns (exit code, stdout, stderr)."""
    from gisp.cli import main

    monkeypatch.setattr(sys, "argv", ["gisp", *map(str, args)])
    monkeypatch.setenv("COLUMNS", "200")
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("mlp_more,late_more", [(True, True), (False, False)])
def test_states_the_observations_with_numbers(tmp_path, mlp_more, late_more):
    run = synthetic_run(tmp_path, mlp_more, late_more)
    rep = write_layer_report(run)
    assert [lv.requested for lv in rep.levels] == [0.2, 0.4]
    by = {(o["level"], o["observation"]): o for o in rep.observations}
    for level in (0.2, 0.4):
        mlp = by[(level, "mlp_pruned_more_than_attention")]
        early = by[(level, "early_layers_kept_more")]
        assert mlp["holds"] is mlp_more and (mlp["channels_removed"] > mlp["heads_removed"]) is mlp_more
        assert early["holds"] is late_more and (early["early_kept"] > early["late_kept"]) is late_more
        assert ("MLP is pruned more than attention" in mlp["statement"]) is mlp_more
        assert "%" in mlp["statement"] and "correlation" in early["statement"]
    for key in ("heatmap", "lines", "markdown", "json"):
        assert (run / rep.files[key].split("/")[-1]).is_file()
    saved = json.loads((run / "layers.json").read_text())
    assert len(saved["levels"][0]["heads"]) == 6 and saved["observations"]


def test_report_of_a_gisp_run_and_the_cli(tmp_path, monkeypatch, capsys):
    model = tiny_model("llama", 2, layers=5)
    cfg = gisp.PruneConfig(target=0.5, steps=5, batch_size=8, protect_first=0.2, protect_last=1)
    gisp.prune(model, cfg, random_calib(), run_dir=tmp_path / "run", progress=False)
    rep = write_layer_report(tmp_path / "run", [0.2, 0.5], out=tmp_path / "rep")
    assert len(rep.levels) == 2 and rep.protected == [0, 4]
    assert rep.levels[1].sparsity == pytest.approx(0.5, abs=0.02)
    assert all(rep.levels[1].heads[i] == 1 and rep.levels[1].channels[i] == 1 for i in (0, 4))
    code, out, err = cli(monkeypatch, capsys, "report", tmp_path / "run", "--sparsity", "0.3,0.5")
    assert code == 0, err
    assert "MLP is pruned" in out and "early layers are kept" in out
    code, out, err = cli(monkeypatch, capsys, "report", tmp_path / "run", "--sparsity", "0.9")
    assert code == 2 and "beyond it" in err and "Traceback" not in err
