"""The experiments' ``--record`` files: what is kept there is read back as it was written, and a number
computed again in ``--out`` wins over the recorded one (so a lost ``runs/`` loses no reported cell)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _script(name: str) -> ModuleType:
    sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def quality() -> ModuleType:
    return _script("exp_quality")


@pytest.fixture(scope="module")
def budget() -> ModuleType:
    return _script("exp_budget")


def _args(mod: ModuleType, tmp_path: Path, *extra: str) -> object:
    argv = sys.argv
    sys.argv = ["x", "--out", str(tmp_path / "out"), "--record", str(tmp_path / "record.json"), *extra]
    try:
        return mod.parse()
    finally:
        sys.argv = argv


def test_quality_record_round_trip_and_precedence(quality: ModuleType, tmp_path: Path) -> None:
    args = _args(quality, tmp_path)
    data = {"ppl": {"dense": {None: 32.0}, "gisp+lsq": {0.3: 74.6, 0.5: 187.4}},
            "acc": {"dense": {None: [0.43, 0.01, 300.0]}, "gisp": {0.3: [0.40, 0.01, 310.0]}},
            "compute": {"gisp": {0.3: {"prune_s": 175.0}}, "exports": {"gisp@0.3": {"export_s": 48.0, "ppl": 74.6}}}}
    Path(args.record).write_text(json.dumps({k: quality._keys(v) for k, v in data.items()}))
    assert quality.recorded(args) == data
    # nothing in --out: the report's numbers are the record's
    assert quality.collect(args, Path(args.out)) == data
    # a cell computed again in --out replaces the recorded number; the others stay
    acc_dir = Path(args.out) / "accuracy"
    acc_dir.mkdir(parents=True)
    (acc_dir / "gisp@0.3.json").write_text(json.dumps({"row": "gisp", "sparsity": 0.3, "mean_acc": 0.41,
                                                       "mean_acc_se": 0.012, "eval_seconds": 5.0}))
    got = quality.collect(args, Path(args.out))
    assert got["acc"]["gisp"][0.3] == (0.41, 0.012, 5.0)
    assert got["acc"]["dense"][None] == [0.43, 0.01, 300.0]
    assert got["ppl"] == data["ppl"]


def test_quality_without_record_is_empty(quality: ModuleType, tmp_path: Path) -> None:
    args = _args(quality, tmp_path)
    assert quality.recorded(args) == {"ppl": {}, "acc": {}, "compute": {}}


def test_budget_recorded_cells_count_as_done(budget: ModuleType, tmp_path: Path) -> None:
    grid = ["--steps-grid", "5", "--tokens-grid", "4096", "--fixed-steps", "5", "--only-summary",
            "--doc", str(tmp_path / "doc.md")]
    args = _args(budget, tmp_path, *grid)
    cell = {"cell": "s5_t4096", "steps": 5, "tokens": 4096, "ppl": {"0.30": 98.74, "0.50": 351.64},
            "prune_time_s_recorded": 117.0, "eval_wall_s": 126.0}
    Path(args.record).write_text(json.dumps({"cells": [cell]}))
    assert budget.recorded(args) == {"s5_t4096": cell}
    argv, sys.argv = sys.argv, ["x", "--out", args.out, "--record", args.record, *grid]
    try:
        budget.main()
    finally:
        sys.argv = argv
    doc = Path(args.doc).read_text()
    assert "| 5 | 4,096 | 98.74 | 351.64 | 117 | 126 |" in doc
    assert "Not run yet" not in doc
    assert json.loads(Path(args.record).read_text())["cells"] == [cell]
