"""Versions, machine and atomic file writes: what every saved number carries."""

from __future__ import annotations

import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_STARTED = time.time()
"""When this process imported gisp: a pid-less temporary older than that belongs to a process that died."""
_TEMP_RE = re.compile(r"^(?P<name>.+)\.[a-z0-9_]{8}(\.(?P<pid>\d+))?\.tmp(\.png)?$")
"""Names of our temporaries: ``NAME.XXXXXXXX.PID.tmp`` (``.tmp.png`` for figures; without ``.PID`` before
gisp recorded the writer), ``XXXXXXXX`` as ``tempfile`` draws it."""


def _temp_suffix(ext: str = "") -> str:
    """The suffix of our temporaries: the writer's pid tells a later run whether the writer is gone."""
    return f".{os.getpid()}.tmp{ext}"


def _writer_gone(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours: another thread may be writing it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # alive, another user's
    return False


def versions() -> dict[str, str]:
    import torch
    import transformers

    from gisp.version import __version__

    return {
        "gisp": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": str(os.cpu_count()),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }


def default_mode(directory: bool = False) -> int:
    """The mode ``open``/``mkdir`` would give a new file (0666) or directory (0777) under the user's umask.

    ``tempfile`` creates 0600 files and 0700 directories; what we rename into place gets this mode instead,
    as other tools' outputs do.
    """
    mask = os.umask(0o022)  # the only portable way to read the umask is to set it ...
    os.umask(mask)  # ... and put it back at once
    return (0o777 if directory else 0o666) & ~mask


def make_final(path: str | Path, directory: bool = False) -> None:
    """Give a temporary file (or directory) made by ``tempfile`` the mode of a normally created one."""
    os.chmod(path, default_mode(directory))


def remove_stale_temporaries(directory: str | Path, names: tuple[str, ...] | None = None) -> list[Path]:
    """Delete the temporaries our atomic writes left in ``directory`` when a process was killed mid-write.

    Only files named as :func:`atomic_write_text` and :func:`save_figure` name them (for ``names``, when
    given), and only those whose writing process is gone (older gisp's temporaries, without a pid: those last
    modified before this process started): a concurrent writer's are kept. Returns what was removed.
    """
    removed = []
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _TEMP_RE.match(p.name)
        if m is None or (names is not None and m["name"] not in names) or not p.is_file() or p.is_symlink():
            continue
        try:
            stale = _writer_gone(int(m["pid"])) if m["pid"] else p.stat().st_mtime < _STARTED
            if stale:
                p.unlink()
                removed.append(p)
        except OSError:
            continue
    return removed


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temporary file and rename, so a crash never leaves half a file; the file gets the mode the
    user's umask gives new files. A kill can leave the temporary: :func:`remove_stale_temporaries`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, (path.name,))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=_temp_suffix())
    try:
        os.fchmod(fd, default_mode())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def save_figure(fig: Any, path: str | Path, *, tight: bool = True) -> Path:
    """Save a matplotlib figure as PNG atomically (``tight``: tight layout first) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, (path.name,))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=_temp_suffix(".png"))
    os.close(fd)
    try:
        make_final(tmp)
        if tight:
            fig.tight_layout()
        fig.savefig(tmp)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
