"""``gisp recover`` on the command line: its options come from RecoverConfig, bad inputs get one line."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from tests.recovery.conftest import exports, text_file, tokenizer  # noqa: F401  (fixtures)
from typer.testing import CliRunner

from gisp.cli import app
from gisp.recovery.config import RecoverConfig


def test_help_lists_every_setting():
    r = CliRunner().invoke(app, ["recover", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert r.exit_code == 0, r.output
    for f in dataclasses.fields(RecoverConfig):
        assert "--" + f.name.replace("_", "-") in r.output, f.name
    for name in ("--out", "--resume", "--device", "--teacher-from-run", "Training budget in tokens (required)"):
        assert name in r.output


def gisp_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "gisp", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


@pytest.mark.parametrize("case,match", [
    ("tokens0", "--tokens must be a positive number"),
    ("no_tokens", "Missing option '--tokens'"),
    ("not_export", "is not a gisp export"),
    ("run_dir", "is a pruning run, not an export"),
    ("same_out", "is the export being recovered"),
    ("other_vocab", "another tokenizer or vocabulary"),
])
def test_bad_inputs_are_one_line(case, match, exports, tokenizer, tmp_path):  # noqa: F811
    from tests.conftest import tiny_model

    src = exports["perlayer"]
    args = {
        "tokens0": [src, "--out", tmp_path / "o", "--tokens", 0],
        "no_tokens": [src, "--out", tmp_path / "o"],
        "not_export": [tmp_path, "--out", tmp_path / "o", "--tokens", 64],
        "run_dir": [tmp_path, "--out", tmp_path / "o", "--tokens", 64],
        "same_out": [src, "--out", src, "--tokens", 64],
        "other_vocab": [src, "--out", tmp_path / "o", "--tokens", 64, "--teacher", tmp_path / "other"],
    }[case]
    if case == "run_dir":
        (tmp_path / "trajectory.json").write_text("{}")
    if case == "other_vocab":
        tiny_model("llama", vocab=len(tokenizer) + 3).save_pretrained(tmp_path / "other")
        tokenizer.save_pretrained(tmp_path / "other")
    r = gisp_cli("recover", *args)
    assert r.returncode == 2, r.stderr
    assert match in r.stderr and "Traceback" not in r.stderr
    if case != "no_tokens":  # typer's own usage error is a box, not gisp's line
        errors = [line for line in r.stderr.splitlines() if line.startswith("gisp: error:")]
        assert len(errors) == 1 and match in errors[0]
