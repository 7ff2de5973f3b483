"""Property tests of trajectory.json as commands read it: a corrupted run is refused in one line or gives
exactly what the intact run gives, and is never changed.

A copy of the tiny run's trajectory (tests/properties.py) is mutated (a key deleted, a value of another
type, a step out of range, a list of the wrong length, an edited step record, truncated text, bytes
that are not UTF-8) and read by ``gisp eval``, ``gisp export`` (a level, ``--list``) and
``gisp prune --resume``. Each result is compared with the one of the intact run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tests.conftest import one_thread_fixture
from tests.properties import (
    KNOWN_OPEN,
    World,
    budget,
    changed,
    digest,
    invoke,
    judge,
    leftovers,
    rule_violations,
    scratch,
)

# the fields that say which structures a step removed, how steps are recorded and what the run was
SEMANTIC = ("layout", "steps", "head_step", "channel_step", "head_order", "channel_order", "config", "model",
            "calibration", "completed")
COMMANDS = ("eval", "export", "list", "resume")
LEVELS = ("0", "0.25", "0.5")


one_thread = one_thread_fixture("module")


def command(world: World, which: str, run: Path, level: str, tmp: Path) -> tuple[list[Any], Path | None]:
    """The command line and the file or directory holding its result."""
    if which == "eval":
        out = tmp / "eval.json"
        return ["eval", run, "--sparsity", level, "--ppl", world.text, "--window", 16, "--max-windows", 2,
                "--device", "cpu", "--json", out], out
    if which == "export":
        return ["export", run, "--sparsity", level, "--out", tmp / "exported"], tmp / "exported"
    if which == "list":
        return ["export", run, "--list"], None
    return ["prune", world.model, "--out", run, "--resume", "--calib", world.text, "--calib-samples", 2,
            "--seq-len", 16, "--steps", 3, "--target", 0.5, "--device", "cpu"], None


def result(which: str, o, out: Path | None, run: Path) -> Any:
    """What must not differ from the intact run: the levels' numbers, the exported weights, the listing."""
    if which == "eval":
        return [(r["step"], r["sparsity"], round(r["ppl"]["ppl"], 6)) for r in json.loads(out.read_text())["rows"]]
    if which == "export":
        rec = json.loads((out / "gisp_export.json").read_text())
        return rec["step"], rec["layers"], [hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(
            out.glob("*.safetensors"))]
    if which == "list":
        return o.stdout
    traj = json.loads((run / "trajectory.json").read_text())
    return {k: traj[k] for k in ("head_step", "channel_step", "head_order", "channel_order")}, [
        (r["step"], r["sparsity"], r["kept_params"]) for r in traj["steps"]]


def baseline(world: World, which: str, level: str) -> Any:
    """The intact run's result (computed once per command and level)."""
    key = ("trajectory", which, level)
    if key not in world.baseline:
        with scratch(world) as tmp:
            run = world.copy_run(tmp / "run")
            args, out = command(world, which, run, level, tmp)
            o = invoke(*args)
            assert o.code == 0, o.stderr
            world.baseline[key] = result(which, o, out, run)
    return world.baseline[key]


# mutations -------------------------------------------------------------------------------------------------------

ODD_VALUES = st.sampled_from(["x", None, [], {}, -1, 10**9, True, 0.5, [[1]], float("1e308")])


def _paths(d: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path into ``d`` (lists: a few indices)."""
    out = []
    items = d.items() if isinstance(d, dict) else enumerate(d[:3] + d[-1:]) if isinstance(d, list) else []
    for k, v in items:
        k = k if isinstance(d, dict) else (k if k < 3 else len(d) - 1)
        out.append((*prefix, k))
        out += _paths(v, (*prefix, k))
    return out


def _parent(d: Any, path: tuple) -> Any:
    for k in path[:-1]:
        d = d[k]
    return d


@st.composite
def mutation(draw, pristine: dict) -> tuple[str, bytes, set[str]]:
    """(what was done, the new file content, known-open tags)."""
    kind = draw(st.sampled_from(["delete", "retype", "step-range", "length", "edit-step", "truncate", "bytes",
                                 "format", "versions"]))
    d = json.loads(json.dumps(pristine))
    text = None
    if kind in ("delete", "retype"):
        paths = sorted(_paths(d), key=str)
        path = draw(st.sampled_from(paths))
        parent = _parent(d, path)
        if kind == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif kind == "delete":
            parent.pop(path[-1])
        else:
            parent[path[-1]] = draw(ODD_VALUES)
        what = f"{kind} {'.'.join(map(str, path))}"
        semantic = path[0] in SEMANTIC
    elif kind == "step-range":
        key = draw(st.sampled_from(["head_step", "channel_step", "head_order", "channel_order"]))
        layer = draw(st.integers(0, len(d[key]) - 1))
        i = draw(st.integers(0, len(d[key][layer]) - 1))
        d[key][layer][i] = draw(st.sampled_from([-1, -7, d["steps"][-1]["step"] + 1, 10**6, 2**63]))
        what, semantic = f"{key}[{layer}][{i}] = {d[key][layer][i]}", True
    elif kind == "length":
        key = draw(st.sampled_from(["head_step", "channel_step", "head_order", "channel_order", "steps"]))
        target = d[key] if key == "steps" or draw(st.booleans()) else d[key][draw(st.integers(0, len(d[key]) - 1))]
        if draw(st.booleans()) and target:
            target.pop(draw(st.integers(0, len(target) - 1)))
        else:
            target.append(json.loads(json.dumps(target[-1])) if target else 0)
        what, semantic = f"length of {key}", True
    elif kind == "edit-step":
        k = draw(st.integers(0, len(d["steps"]) - 1))
        field = draw(st.sampled_from(["step", "sparsity", "kept_params", "target"]))
        d["steps"][k][field] = draw(st.sampled_from([-1, 0, 0.49, 2, 1.5, 10**7]))
        what, semantic = f"steps[{k}].{field} = {d['steps'][k][field]}", True
    elif kind == "format":
        d["format"] = draw(st.sampled_from([2, 0, "1", None]))
        what, semantic = f"format = {d['format']!r}", False
    elif kind == "versions":
        d["versions"] = draw(st.sampled_from([{}, {"gisp": "9.9"}, {"torch": 1}]))
        what, semantic = "versions edited", False
    else:
        full = json.dumps(pristine, indent=1).encode()
        if kind == "truncate":
            text = full[: draw(st.integers(0, len(full) - 1))]
        else:
            text = draw(st.sampled_from([b"\xff\xfe" + full, full[:100] + b"\x80\x81" + full[100:], b"\x00" * 64]))
        what, semantic = kind, kind == "bytes"
    data = text if text is not None else json.dumps(d, indent=1).encode()
    return what, data, {"trajectory-validation"} if semantic else set()


@pytest.fixture(scope="module")
def pristine(world) -> dict:
    return json.loads((world.run / "trajectory.json").read_text())


@budget(16)
@given(data=st.data(), which=st.sampled_from(COMMANDS), level=st.sampled_from(LEVELS))
def test_corrupted_trajectory(world, pristine, data, which, level):
    """A mutated trajectory.json: exit 2 in one line, or exactly the intact run's result; the file unchanged."""
    what, content, tags = data.draw(mutation(pristine), label="mutation")
    with scratch(world) as tmp:
        run = world.copy_run(tmp / "run")
        (run / "trajectory.json").write_bytes(content)
        args, out = command(world, which, run, level, tmp)
        before = digest(run, world.model, world.text)
        o = invoke(*args)
        problems = rule_violations(o, expect_error=None) + leftovers(tmp)
        if o.code != 0:
            problems += changed(before)
            if out is not None and out.exists():
                problems.append(f"failed but wrote {out.name}")
        elif not problems:
            if which != "resume":
                problems += changed(before)
            try:
                got = result(which, o, out, run)
            except (KeyError, ValueError, TypeError) as e:
                got = f"unreadable: {e!r}"
            if got != baseline(world, which, level):  # the intact run's result, computed on first need
                problems.append(f"exit 0 with a result that differs from the intact run's ({what})")
        o.args.append(f"# {what}")
        judge(f"corrupted trajectory ({which})", o, problems, tags)


@pytest.mark.xfail("resume-changed-calibration" in KNOWN_OPEN, strict=True,
                   reason=KNOWN_OPEN.get("resume-changed-calibration", ""))
def test_resume_with_changed_calibration(world):
    """--resume with a calibration file whose content changed since the run started: refused in one line."""
    with scratch(world) as tmp:
        text = tmp / "calib.txt"
        shutil.copy(world.text, text)
        args = ["prune", world.model, "--out", tmp / "run", "--calib", text, "--calib-samples", 2, "--seq-len", 16,
                "--steps", 1, "--target", 0.2, "--device", "cpu"]
        assert invoke(*args).code == 0
        before = digest(tmp / "run")
        text.write_text(text.read_text()[::-1])  # same size, other text
        o = invoke(*args, "--resume")
        problems = rule_violations(o, expect_error=True) + changed(before)
    assert not problems, (problems, o.stderr)
