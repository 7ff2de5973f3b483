"""Where a command may write: checked before any model loads, staged next to the final name, swapped in.

Every command that writes a directory (``gisp prune``, ``gisp export``, ``gisp compare``) or a file
(``gisp export --format gguf``, ``gisp eval --json``) checks its output first, in milliseconds, so a
wrong ``--out`` fails with one line before a model takes 20-40 s to load. Exports are written into a
staging folder next to the final name and renamed into place: the final name holds either nothing, the
previous export or the new complete one, never a partial result.

``--overwrite`` may only replace an empty directory or a previous export of ours: a directory holding
``gisp_export.json`` (and no ``trajectory.json``), or a ``.gguf`` file carrying gisp's metadata. An output
that is, contains or lies inside one of the command's inputs (the run, the base model, a source export)
is always refused.

Staging folders are named ``.NAME.gisp-tmp-PID-XXXX`` (and ``.NAME.gisp-old-PID-XXXX`` for a previous
export while it is swapped out); the next write to ``NAME`` removes those of processes no longer alive,
so an export killed at any point leaves nothing behind for long. Only that pattern is ever removed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from gisp.errors import GispError

EXPORT_RECORD = "gisp_export.json"
RUN_FILE = "trajectory.json"
_STAGING = re.compile(r"^\.(?P<name>.+)\.gisp-(?:tmp|old)-(?P<pid>\d+)-[0-9a-f]+$")


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def _overlaps(out: Path, other: Path) -> bool:
    """``out`` is ``other``, lies inside it, or contains it."""
    return out == other or out in other.parents or other in out.parents


def refuse_inputs(out: str | Path, inputs: Iterable[str | Path | None], option: str = "--out") -> None:
    """One line if ``out`` is, contains or lies inside one of ``inputs`` (run, base model, source export)."""
    o = _resolved(out)
    for given in inputs:
        if given is None or str(given) == "":
            continue
        p = Path(given).expanduser()
        if not p.exists():
            continue
        if _overlaps(o, p.resolve()):
            raise GispError(f"{option} {out} would overwrite the input {given}: "
                            "write to a new path outside the run and the model")


def _writable_parent(out: Path, option: str) -> None:
    probe = out.parent
    while not probe.exists():
        if probe == probe.parent:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise GispError(f"cannot write {option} {out}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise GispError(f"cannot write {option} {out}: {probe} is not writable (choose another path)")


def check_output_dir(out: str | Path, *, overwrite: bool = False, inputs: Iterable[str | Path | None] = (),
                     option: str = "--out", resumable: bool = False) -> Path:
    """Refuse, in one line, a directory output that cannot or must not be written; returns ``out``.

    ``resumable``: the command continues what it finds there itself (``gisp prune``, ``gisp compare``
    check their own files); exports only replace their own earlier exports (see the module docstring).
    """
    out = Path(out).expanduser()
    refuse_inputs(out, inputs, option)
    if out.exists() and not out.is_dir():
        raise GispError(f"{option} {out} is a file, not a directory: give a directory path")
    _writable_parent(out, option)
    if out.is_dir():
        if not os.access(out, os.W_OK | os.X_OK):
            raise GispError(f"cannot write {option} {out}: the directory is not writable")
        if not resumable and any(out.iterdir()):
            if not overwrite:
                raise GispError(f"{out} already exists and is not empty: choose another {option} or pass --overwrite")
            if (out / RUN_FILE).exists() or not (out / EXPORT_RECORD).is_file():
                raise GispError(f"--overwrite replaces only an earlier gisp export (a directory with "
                                f"{EXPORT_RECORD}) and {out} is not one: choose another {option}")
    return out


def _is_our_gguf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                return False
        from gguf import GGUFReader

        return "gisp.version" in GGUFReader(str(path)).fields
    except Exception:
        return False


def check_output_file(out: str | Path, *, overwrite: bool = False, inputs: Iterable[str | Path | None] = (),
                      option: str = "--out", ours: str = "gguf") -> Path:
    """Refuse, in one line, a file output that cannot or must not be written; returns ``out``.

    ``ours``: what an existing file must be for ``overwrite`` to replace it: ``gguf`` (a GGUF file gisp
    wrote) or ``eval`` (a ``gisp eval --json`` result).
    """
    out = Path(out).expanduser()
    refuse_inputs(out, inputs, option)
    if out.is_dir():
        raise GispError(f"{option} {out} is a directory: give a file name")
    _writable_parent(out, option)
    if out.exists():
        if ours == "gguf":
            if not overwrite:
                raise GispError(f"{out} already exists: choose another {option} or pass --overwrite")
            if not _is_our_gguf(out):
                raise GispError(f"--overwrite replaces only a GGUF file gisp wrote, and {out} is not one: "
                                f"choose another {option}")
        elif ours == "eval" and not _is_eval_result(out):
            raise GispError(f"{option} {out} exists and is not a gisp eval result: choose another file")
        if not os.access(out, os.W_OK):
            raise GispError(f"cannot write {option} {out}: the file is not writable")
    return out


def _is_eval_result(path: Path) -> bool:
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "protocol" in data and "rows" in data


# staging ---------------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(out: str | Path) -> list[Path]:
    """Remove staging leftovers of ``out`` (our naming pattern only) whose process is gone."""
    out = Path(out).expanduser()
    removed = []
    if not out.parent.is_dir():
        return removed
    for p in out.parent.iterdir():
        m = _STAGING.match(p.name)
        if m and m.group("name") == out.name and not _alive(int(m.group("pid"))):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def staging_name(out: Path, kind: str = "tmp") -> Path:
    return out.parent / f".{out.name}.gisp-{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def disk_full_error(out: Path, e: OSError) -> GispError:
    return GispError(f"no space left on the device while writing {out}: partial output removed, "
                     f"{'the previous export at ' + str(out) + ' left intact' if out.exists() else 'nothing written'}"
                     "; free some space and export again")


@contextlib.contextmanager
def staged(out: str | Path, *, directory: bool = True) -> Iterator[Path]:
    """A staging path next to ``out`` (a new directory, or a file name when ``directory`` is false) that
    becomes ``out`` when the block ends without error; on any error it is removed and ``out`` is left as
    it was. A full disk (ENOSPC, EDQUOT) becomes one line."""
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    tmp = staging_name(out)
    if directory:
        os.mkdir(tmp)  # not mkdtemp: the export gets the user's umask, not 0700
    try:
        try:
            yield tmp
            swap_in(tmp, out)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                _remove(tmp)
                raise disk_full_error(out, e) from e
            raise
    finally:
        _remove(tmp)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink(missing_ok=True)


def swap_in(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out``; a previous ``out`` is moved aside first and removed after
    (restored if the rename fails)."""
    old = None
    if out.exists() or out.is_symlink():
        if out.is_dir() and not out.is_symlink():
            old = staging_name(out, "old")
            os.replace(out, old)
        else:
            os.replace(tmp, out)  # files replace atomically
            return
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None and not out.exists():
            os.replace(old, out)
            old = None
        raise
    finally:
        if old is not None:
            _remove(old)
