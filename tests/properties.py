"""Shared machinery of the property tests (hypothesis): the tiny world, the in-process CLI, the verdict.

Every property drives the real ``gisp`` command (:func:`gisp.cli.main`, in process) and holds it to one
rule: exit 0 with a correct result, or exit 2 with exactly one ``gisp: error:`` line on stderr; never
another exit code or a traceback, never a changed input file, never a partial result under the final
name. :data:`KNOWN_OPEN` is the one list of failures being fixed elsewhere; an example that touches one
of them may fail (it is counted, not raised) until the list is emptied.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
import traceback
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Failures being fixed elsewhere: an example whose inputs touch one of these may violate the rule without
# failing the test. Empty since the fixes of issue #13 were merged; add an entry only with an open issue.
KNOWN_OPEN: dict[str, str] = {}

FIGURES: dict[str, dict[str, Any]] = defaultdict(lambda: {"cases": 0, "exit0": 0, "exit2": 0, "violations": []})
"""Per property: cases run, how they ended, and every violation (known-open ones included)."""


# running the command ---------------------------------------------------------------------------------------


@dataclass
class Outcome:
    args: list[str]
    code: int
    stdout: str
    stderr: str

    @property
    def error_line(self) -> str:
        lines = [ln for ln in self.stderr.splitlines() if ln.startswith("gisp: error:")]
        return lines[-1] if lines else ""


def invoke(*args: Any) -> Outcome:
    """``gisp ARGS`` in this process: exit code, stdout and stderr (an escaping exception: code 1 + traceback,
    as the real process would end)."""
    from gisp.cli import main

    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    old_argv = sys.argv
    sys.argv = ["gisp", *argv]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:  # what a real process would print before exit code 1
                traceback.print_exc(file=err)
                code = 1
    finally:
        sys.argv = old_argv
    return Outcome(argv, code, out.getvalue(), err.getvalue())


# Lines a command may print on stderr before its error line: progress bars and its own one-line log.
_LOG_LINE = re.compile(r"^(gisp \w+ |compare |.*\d+%\|.*|\s*$)")


def rule_violations(o: Outcome, expect_error: bool | None) -> list[str]:
    """How ``o`` breaks the exit-code and error-line rule; ``expect_error``: True (the input is invalid: exit 2),
    False (valid: exit 0), None (either)."""
    problems = []
    if o.code not in (0, 2):
        problems.append(f"exit code {o.code}")
    if "Traceback" in o.stderr:
        problems.append("traceback: " + _last_line(o.stderr))
    if o.code == 2:
        lines = [ln for ln in o.stderr.splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("gisp: error:")]
        if len(errors) != 1 or lines[-1] != errors[0]:
            problems.append(f"exit 2 without exactly one final error line: {o.stderr[-300:]!r}")
        elif any(not _LOG_LINE.match(ln) for ln in lines[:-1]):
            problems.append(f"exit 2 with more than the error line: {o.stderr[-300:]!r}")
    if expect_error is True and o.code == 0:
        problems.append("accepted an invalid input (exit 0)")
    if expect_error is False and o.code == 2:
        problems.append(f"refused a valid input: {o.error_line}")
    return problems


def _last_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


def judge(prop: str, o: Outcome, problems: list[str], tags: set[str] = frozenset()) -> None:
    """Count the case; fail on a violation unless the example touches a :data:`KNOWN_OPEN` failure."""
    fig = FIGURES[prop]
    fig["cases"] += 1
    fig["exit0"] += o.code == 0
    fig["exit2"] += o.code == 2
    known = sorted(set(tags) & KNOWN_OPEN.keys())
    if problems:
        fig["violations"].append({"args": o.args, "exit": o.code, "problems": problems, "known_open": known,
                                  "error_line": o.error_line or _last_line(o.stderr)})
    if os.environ.get("GISP_FUZZ_REPORT"):  # kept current, so a long run cut short still has its figures
        write_figures(os.environ["GISP_FUZZ_REPORT"])
    if not problems or known:
        return
    raise AssertionError(f"gisp {' '.join(o.args)} -> exit {o.code}: " + "; ".join(problems)
                         + f"\n--- stderr ---\n{o.stderr[-3000:]}")


def write_figures(path: str | Path) -> None:
    """The per-property figures as JSON (the long run's record)."""
    Path(path).write_text(json.dumps(FIGURES, indent=1) + "\n")


# inputs stay as they were, outputs are whole --------------------------------------------------------------


def digest(*paths: Path) -> dict[str, str]:
    """A fingerprint of every file under ``paths``: SHA-256 up to 1 MB, size and modification time above."""
    out = {}
    for p in paths:
        for f in sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p] if p.is_file() else []:
            st = f.stat()
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest() if st.st_size < 2**20 else \
                f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
    return out


def changed(before: dict[str, str]) -> list[str]:
    """The files of ``before`` (a :func:`digest`) that are now different or gone."""
    diff = []
    for name, fp in before.items():
        now = digest(Path(name)).get(name, "missing")
        if now != fp:
            diff.append(name + (" (deleted)" if now == "missing" else ""))
    return [f"changed an input: {', '.join(diff[:3])}"] if diff else []


def leftovers(folder: Path) -> list[str]:
    """Temporary files or directories a command left behind in ``folder`` (recursively)."""
    left = [str(p) for p in folder.rglob("*") if ".tmp" in p.name or p.name.startswith(".") and ".old" in p.name]
    return [f"left temporary files: {', '.join(left[:3])}"] if left else []


@contextlib.contextmanager
def scratch(world: World) -> Iterator[Path]:
    """A fresh directory for one example."""
    d = Path(tempfile.mkdtemp(dir=world.root / "scratch"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# the tiny world: a model on disk with a real tokenizer, a run and its exports -------------------------------


@dataclass
class World:
    root: Path
    model: Path
    text: Path
    """A valid plain-text calibration/perplexity file (paragraphs of the packaged C4)."""
    run: Path
    export: Path
    """An HF export of the run (per-layer widths)."""
    plain: Path
    """A --uniform export of the run (a plain llama checkpoint)."""
    context: int
    baseline: dict[str, Any] = field(default_factory=dict)

    def copy_run(self, dest: Path) -> Path:
        shutil.copytree(self.run, dest, ignore=shutil.ignore_patterns("eval.json", "*.png", "layers.*"))
        return dest


def build_world(root: Path) -> World:
    """Build the tiny model (SmolLM2's tokenizer, 4 layers of width 64), a 3-step run of it, two exports."""
    from tests.conftest import tiny_model
    from transformers import AutoTokenizer

    from gisp.core.assets import package_dir
    from gisp.loading import DEFAULT_MODEL, resolve_model_path

    (root / "scratch").mkdir(parents=True, exist_ok=True)
    source = Path(resolve_model_path(DEFAULT_MODEL)[0])
    model = root / "tiny"
    tok = AutoTokenizer.from_pretrained(source)
    tiny_model("llama", kv_heads=2, layers=4, vocab=len(tok)).save_pretrained(model)
    for f in source.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, model / f.name)
    c4 = package_dir("exllamav3") / "conversion" / "standard_cal_data" / "c4.utf8"
    docs = c4.read_text(encoding="utf-8").splitlines()[:40]
    text = root / "text.txt"
    text.write_text("\n\n".join(d.strip() for d in docs if d.strip()) + "\n", encoding="utf-8")
    run, export, plain = root / "run", root / "export", root / "plain"
    for args in (
        ("prune", model, "--out", run, "--calib", text, "--calib-samples", 2, "--seq-len", 16, "--steps", 3,
         "--target", 0.5, "--device", "cpu"),
        ("export", run, "--sparsity", 0.5, "--out", export),
        ("export", run, "--sparsity", 0.5, "--uniform", "--out", plain),
    ):
        o = invoke(*args)
        assert o.code == 0, o.stderr
    return World(root, model, text, run, export, plain, context=128)


# helpers for checks -------------------------------------------------------------------------------------------


def finite_positive(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def budget(ci: int) -> Any:
    """A property's examples: ``ci`` in `make test`; GISP_HYPOTHESIS_SCALE (default 10) times that in the long
    profile (GISP_HYPOTHESIS_PROFILE=long, scripts/fuzz_cli.py)."""
    from hypothesis import settings

    if os.environ.get("GISP_HYPOTHESIS_PROFILE", "ci") == "ci":
        return settings(max_examples=ci)
    return settings(max_examples=ci * int(os.environ.get("GISP_HYPOTHESIS_SCALE", "10")))
