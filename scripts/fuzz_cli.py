"""The long run of the property tests: more examples per property, not derandomised, figures to a file.

    python scripts/fuzz_cli.py --scale 10 --out fuzz_figures.json [--timeout 600]

runs tests/cli/test_properties.py, tests/run/test_trajectory_properties.py and
tests/deploy/test_export_properties.py with the hypothesis profile ``long`` (``--scale`` times the
examples of ``make test`` per property, fresh random examples each time) and writes, per property, the
cases generated, how they ended (exit 0 / exit 2) and every violation (with the command and the
known-open failure it belongs to, if any). It prints a short table of the same figures. ``--timeout``
stops the run after that many seconds and keeps the figures so far.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = ["tests/cli/test_properties.py", "tests/run/test_trajectory_properties.py",
           "tests/deploy/test_export_properties.py"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=int, default=10, help="examples per property: this times the make-test count")
    ap.add_argument("--out", type=Path, default=ROOT / "fuzz_figures.json", help="figures file (JSON)")
    ap.add_argument("-k", default=None, help="only the properties matching this pytest -k expression")
    ap.add_argument("--timeout", type=float, default=None, help="stop after this many seconds (figures so far kept)")
    args = ap.parse_args()
    env = {**os.environ, "GISP_HYPOTHESIS_PROFILE": "long", "GISP_HYPOTHESIS_SCALE": str(args.scale),
           "GISP_FUZZ_REPORT": str(args.out.resolve()),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *MODULES]
    if args.k:
        cmd += ["-k", args.k]
    t0 = time.time()
    try:
        rc: int | str = subprocess.call(cmd, cwd=ROOT, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        rc = "timeout"
    seconds = time.time() - t0
    figures = json.loads(args.out.read_text()) if args.out.is_file() else {}
    figures = {"seconds": round(seconds, 1), "scale": args.scale, "pytest_exit": rc, "properties": figures}
    args.out.write_text(json.dumps(figures, indent=1) + "\n")
    print(f"\n{'property':40} {'cases':>6} {'exit 0':>7} {'exit 2':>7} {'violations':>10} {'known':>6}")
    for name, f in figures["properties"].items():
        known = sum(1 for v in f["violations"] if v["known_open"])
        print(f"{name:40} {f['cases']:6} {f['exit0']:7} {f['exit2']:7} {len(f['violations']):10} {known:6}")
    print(f"{seconds:.0f} s; figures in {args.out}")
    return rc if isinstance(rc, int) else 124


if __name__ == "__main__":
    sys.exit(main())
