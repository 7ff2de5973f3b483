"""Where exports may write: never over a run or a model, refused before loading, nothing partial left."""

from __future__ import annotations

import copy
import errno
import json
import sys
from pathlib import Path

import gguf
import pytest
from safetensors.torch import load_file
from tests.conftest import random_calib, tiny_model

import gisp
import gisp.deploy.export as export_mod
from gisp.cli import main
from gisp.deploy.gguf import export_gguf
from gisp.deploy.vllm import export_vllm
from gisp.errors import GispError
from gisp.outputs import check_output_file

CFG = dict(target=0.5, steps=4, batch_size=4, protect_first=0.25)



@pytest.fixture(scope="module")
def run_on_disk(tmp_path_factory):
    """A saved run whose trajectory names its base model directory (as gisp prune writes it)."""
    root = tmp_path_factory.mktemp("runs")
    base = tiny_model("llama", 2, layers=4)
    base_dir = root / "base"
    base.save_pretrained(base_dir)
    traj = gisp.prune(copy.deepcopy(base), gisp.PruneConfig(**CFG), random_calib(n=8, seq_len=16), progress=False,
                      model_info={"name": str(base_dir), "path": str(base_dir)})
    run = root / "run"
    traj.save(run)
    return base, run, base_dir


def cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["gisp", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        main()
    return e.value.code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("gisp: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fmt,target", [
    ("hf", "RUN"), ("hf", "RUN/sub"), ("hf", "PARENT"), ("hf", "BASE"),
    ("vllm", "RUN"), ("vllm", "BASE"), ("gguf", "RUN/x.gguf"), ("gguf", "BASE/x.gguf"),
])
def test_out_over_an_input_is_refused_for_every_format(run_on_disk, monkeypatch, capsys, fmt, target):
    base, run, base_dir = run_on_disk
    out = {"RUN": run, "RUN/sub": run / "sub", "PARENT": run.parent, "BASE": base_dir,
           "RUN/x.gguf": run / "x.gguf", "BASE/x.gguf": base_dir / "x.gguf"}[target]
    before, before_base = snapshot(run), snapshot(base_dir)
    code, err = cli(monkeypatch, capsys, "export", run, "--sparsity", "0.3", "--out", out, "--overwrite",
                    "--format", fmt)
    assert code == 2 and "would overwrite the input" in one_error_line(err)
    assert snapshot(run) == before and snapshot(base_dir) == before_base


def test_overwrite_replaces_only_our_exports(run_on_disk, tmp_path):
    base, run, _ = run_on_disk
    other = tmp_path / "someone-elses"
    other.mkdir()
    (other / "trajectory.json").write_text("{}")  # another run: never replaced
    with pytest.raises(GispError, match="replaces only an earlier gisp export"):
        gisp.export(run, other, model=base, sparsity=0.3, overwrite=True)
    with pytest.raises(GispError, match="replaces only an earlier gisp export"):
        export_vllm(run, other, model=base, sparsity=0.3, overwrite=True)
    foreign = tmp_path / "f.gguf"
    foreign.write_bytes(b"not a gguf of ours")
    with pytest.raises(GispError, match="only a GGUF file gisp wrote"):
        export_gguf(run, foreign, model=base, sparsity=0.3, overwrite=True)
    assert (other / "trajectory.json").read_text() == "{}" and foreign.read_bytes() == b"not a gguf of ours"
    ours = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(ours, "llama")
    writer.add_string("gisp.version", "0")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    assert check_output_file(ours, overwrite=True) == ours  # a GGUF file of ours may be replaced
    with pytest.raises(GispError, match="already exists"):
        check_output_file(ours)


@pytest.mark.parametrize("args,match", [
    (("--sparsity", "0.3", "--out", "FILE"), "is a file"),
    (("--sparsity", "0.3", "--out", "FILE/sub"), "is a file"),
    (("--sparsity", "0.3", "--out", "FILE", "--format", "vllm"), "is a file"),
    (("--max-size-gb", "nan", "--out", "NEW"), "--max-size-gb must be a positive finite"),
    (("--max-size-gb", "inf", "--out", "NEW"), "--max-size-gb must be a positive finite"),
    (("--max-size-gb", "-1", "--out", "NEW"), "--max-size-gb must be a positive finite"),
    (("--max-size-gb", "nan", "--out", "NEW.gguf", "--format", "gguf"), "--max-size-gb must be a positive finite"),
    (("--max-params", "inf", "--out", "NEW"), "--max-params takes"),
    (("--max-params", "-5", "--out", "NEW"), "--max-params takes"),
    (("--max-params", "0", "--out", "NEW"), "--max-params must be positive"),
    (("--sparsity", "0.9", "--out", "NEW"), "this run holds sparsities up to"),
    (("--sparsity", "0.9", "--out", "NEW", "--format", "vllm"), "this run holds sparsities up to"),
    (("--sparsity", "0.3", "--out", "NEW", "--outtype", "q8_0"), "--outtype sets the weight type of --format gguf"),
    (("--sparsity", "0.3", "--out", "NEW", "--format", "vllm", "--outtype", "f16"), "for --format vllm give --dtype"),
])
def test_bad_requests_fail_in_one_line_before_loading(run_on_disk, monkeypatch, capsys, tmp_path, args, match):
    """The run's base model is made unloadable: each error must come before any load."""
    _, run, _ = run_on_disk
    broken = tmp_path / "run"
    broken.mkdir()
    traj = json.loads((run / "trajectory.json").read_text())
    traj["model"]["path"] = str(tmp_path / "no-such-model")
    (broken / "trajectory.json").write_text(json.dumps(traj))
    (tmp_path / "f").write_text("a file")
    paths = {"FILE": tmp_path / "f", "FILE/sub": tmp_path / "f" / "sub", "NEW": tmp_path / "new",
             "NEW.gguf": tmp_path / "new.gguf"}
    code, err = cli(monkeypatch, capsys, "export", broken, *[paths.get(a, a) for a in args])
    assert code == 2 and match in one_error_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "run"]


def test_prune_and_compare_refuse_a_file_as_out_before_loading(monkeypatch, capsys, tmp_path):
    (tmp_path / "f").write_text("a file")
    for cmd in (("prune", "no-such/model"), ("compare", "no-such/model")):
        code, err = cli(monkeypatch, capsys, *cmd, "--out", tmp_path / "f")
        assert code == 2 and "is a file" in one_error_line(err)


def test_disk_full_keeps_the_previous_export(run_on_disk, tmp_path, monkeypatch):
    base, run, _ = run_on_disk
    out = tmp_path / "o"
    gisp.export(run, out, model=base, sparsity=0.2)
    before = snapshot(out)

    def full(path, rec):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_mod, "write_record", full)  # after the weights: mid-way through the export
    with pytest.raises(GispError, match="no space left on the device") as e:
        gisp.export(run, out, model=base, sparsity=0.3, overwrite=True)
    assert "partial output removed" in str(e.value) and "left intact" in str(e.value) and "\n" not in str(e.value)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_stale_temporaries_of_ours_are_removed_and_nothing_else(run_on_disk, tmp_path):
    base, run, _ = run_on_disk
    out = tmp_path / "o"
    dead = 2 ** 22 + 12345  # above pid_max's default: no such process
    for name in (f".o.gisp-tmp-{dead}-0a1b2c3d", f".o.gisp-old-{dead}-deadbeef"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"0" * 1000)
    (tmp_path / ".o.tmpXYZ").mkdir()  # not our pattern: left alone
    (tmp_path / f".other.gisp-tmp-{dead}-00000000").mkdir()  # another output's: left alone
    res = gisp.export(run, out, model=base, sparsity=0.3)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".o.tmpXYZ", f".other.gisp-tmp-{dead}-00000000", "o"])
    assert load_file(res.path / "model.safetensors")
