"""Atomic writes: the user's umask decides modes, and temporaries a kill left behind are cleaned up."""

from __future__ import annotations

import os
import stat
import tempfile
import time
from pathlib import Path

import pytest

from gisp.outputs import staged
from gisp.provenance import atomic_write_json, atomic_write_text, remove_stale_temporaries


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_and_directories_follow_the_umask(tmp_path, umask_027):
    """tempfile gives 0600 files and 0700 directories; what we rename into place used to keep those."""
    atomic_write_text(tmp_path / "a.txt", "x")
    atomic_write_json(tmp_path / "b.json", {"x": 1})
    assert mode(tmp_path / "a.txt") == 0o640 and mode(tmp_path / "b.json") == 0o640
    with staged(tmp_path / "out") as tmp:
        (tmp / "f").write_text("x")
    assert mode(tmp_path / "out") == 0o750
    os.umask(0o002)
    atomic_write_text(tmp_path / "a.txt", "y")  # replacing a file gives the new one the current umask's mode
    assert mode(tmp_path / "a.txt") == 0o664


def test_figures_follow_the_umask(tmp_path, umask_027):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gisp.provenance import save_figure

    fig, _ = plt.subplots()
    save_figure(fig, tmp_path / "p.png", tight=False)
    assert mode(tmp_path / "p.png") == 0o640


def _temp(directory: Path, name: str, age: float) -> Path:
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=name + ".", suffix=".tmp")
    os.close(fd)
    t = time.time() - age
    os.utime(tmp, (t, t))
    return Path(tmp)


def test_stale_temporaries_are_removed_fresh_ones_and_others_kept(tmp_path):
    stale = _temp(tmp_path, "trajectory.json", age=10**8)
    other = _temp(tmp_path, "eval.json", age=10**8)
    fresh = _temp(tmp_path, "trajectory.json", age=-5)  # a concurrent writer's, after this process started
    mine = tmp_path / "notes.tmp"
    mine.write_text("not ours")
    os.utime(mine, (0, 0))
    assert remove_stale_temporaries(tmp_path, ("trajectory.json",)) == [stale]
    assert other.exists() and fresh.exists() and mine.exists()
    assert remove_stale_temporaries(tmp_path) == [other]


def test_temporaries_of_a_dead_writer_are_stale_whatever_their_age(tmp_path):
    """The writer's pid is in the name: a killed process's temporary goes even when written after we started."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: gone
    dead = proc.pid
    names = {pid: tmp_path / f"trajectory.json.abcd_123.{pid}.tmp" for pid in (dead, os.getppid(), os.getpid())}
    for f in names.values():
        f.write_text("{")
    assert remove_stale_temporaries(tmp_path) == [names[dead]]
    assert names[os.getppid()].exists() and names[os.getpid()].exists()  # a live writer's, and our own


def test_the_next_write_of_a_file_removes_its_stale_temporaries(tmp_path):
    """A kill during a write used to leave NAME.XXXXXXXX.tmp beside NAME forever."""
    stale = _temp(tmp_path, "results.json", age=10**8)
    atomic_write_json(tmp_path / "results.json", [1])
    assert not stale.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
