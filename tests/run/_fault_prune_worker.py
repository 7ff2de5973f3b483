"""Forks GISP runs on a tiny model for tests/run/test_fault_injection.py to kill.

usage: python tests/run/_fault_prune_worker.py CONFIG_JSON, then one line per run on stdin:
``RUN_DIR`` or ``RUN_DIR POINT N``.

It imports torch and gisp once and forks a child per line (a kill costs no
re-import); each child continues the run in RUN_DIR (``resume=True``; it starts
the run when there is none) and exits. The worker prints ``pid PID`` when a
child starts and ``exit PID CODE`` when it ended (``CODE`` -9: SIGKILLed).
With ``POINT N`` the child SIGKILLs itself inside its N-th trajectory write:
``fsync`` (the temporary file written, not yet renamed) or ``replace`` (synced,
about to be renamed), where a kill from outside rarely lands.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.conftest import random_calib, tiny_model  # noqa: E402

import gisp  # noqa: E402
import gisp.run.loop  # noqa: E402, F401  (imported before forking: children start at once)

CALIB = dict(n=24, seq_len=32, seed=0)


def die_inside_write(point: str, n: int) -> None:
    """Patch ``os.fsync``/``os.replace`` (what gisp.provenance's atomic write calls) to SIGKILL this process at
    its n-th trajectory write."""
    real = getattr(os, point)
    seen = {"writes": 0}

    def patched(*args, **kwargs):
        if point == "fsync" or str(args[1]).endswith("trajectory.json"):
            seen["writes"] += 1
            if seen["writes"] == n:
                os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    setattr(os, point, patched)


def child(run_dir: Path, config: gisp.PruneConfig, fault: list[str]) -> None:
    try:
        if fault:
            die_inside_write(fault[0], int(fault[1]))
        gisp.prune(tiny_model(), config, random_calib(**CALIB), run_dir=run_dir, resume=True, progress=False)
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def main() -> None:
    config = gisp.PruneConfig(**json.loads(sys.argv[1]))
    torch.set_num_threads(1)  # every child computes alike, whichever was killed before it
    for line in sys.stdin:
        run_dir, *fault = line.split()
        pid = os.fork()
        if pid == 0:
            child(Path(run_dir), config, fault)
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"exit {pid} {os.waitstatus_to_exitcode(status)}", flush=True)


if __name__ == "__main__":
    main()
