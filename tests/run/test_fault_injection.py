"""kill -9 a prune at random points and resume until done: the uninterrupted run's trajectory, a valid
trajectory.json whenever one exists, and no leftovers in the run folder.

The runs are children forked by tests/run/_fault_prune_worker.py (torch imported once, so eight kills cost
seconds). Timed kills come from outside at seeded random moments spread over the measured run time; kills
inside a trajectory write (the temporary file written but not renamed) come from the child itself, since a
write lasts milliseconds and a timed kill rarely lands in one.

A timed kill waits until the run has saved 0 or 1 more steps, then a random part of a step (timed from the
uninterrupted run): anywhere from start-up to the next write, on a fast or a busy machine alike.
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from gisp.run.trajectory import Trajectory

WORKER = Path(__file__).with_name("_fault_prune_worker.py")
CFG = dict(target=0.5, steps=16, batch_size=8, protect_first=0.25, protect_last=1)
TIMING = ("seconds", "gradient_seconds", "timing")  # wall-clock measurements: differ from run to run
# timed kills from outside, and self-kills inside the n-th trajectory write of a resumed process
PLAN = ["timed", ("fsync", 2), "timed", ("replace", 1), "timed", "timed", ("fsync", 1), "timed"]


class Worker:
    """The forking worker: ``start`` a run in a directory, ``wait`` for its exit code (-9: killed)."""

    def __init__(self, stderr: Path) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2] / "src"),
                                                           os.environ.get("PYTHONPATH", "")])}
        self.err = stderr.open("w")
        self.proc = subprocess.Popen([sys.executable, str(WORKER), json.dumps(CFG)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.err, text=True, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(x.strip()) for x in self.proc.stdout], daemon=True).start()

    def _line(self, prefix: str, timeout: float = 120.0) -> list[str]:
        words = self.lines.get(timeout=timeout).split()
        assert words[0] == prefix, words
        return words[1:]

    def start(self, run_dir: Path, *fault: object) -> int:
        self.proc.stdin.write(" ".join(map(str, (run_dir, *fault))) + "\n")
        self.proc.stdin.flush()
        return int(self._line("pid")[0])

    def wait(self, pid: int) -> int:
        got, code = self._line("exit")
        assert int(got) == pid
        return int(code)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.err.close()


class Reader(threading.Thread):
    """Reads trajectory.json as often as it can while runs write it: every read must be whole JSON."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path, self.reads, self.broken, self.stop = path, 0, [], threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                text = self.path.read_text()
            except FileNotFoundError:
                time.sleep(0.001)
                continue
            self.reads += 1
            try:
                json.loads(text)
            except json.JSONDecodeError as e:
                self.broken.append(f"{e}: {text[:80]!r}")


def without_timing(d: dict) -> dict:
    d = {k: v for k, v in d.items() if k not in ("checksum", "versions")}
    d["steps"] = [{k: v for k, v in s.items() if k not in TIMING} for s in d["steps"]]
    return d


def saved_step(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "trajectory.json").read_text())["steps"][-1]["step"]
    except (FileNotFoundError, json.JSONDecodeError):  # (a broken read is the Reader's to report)
        return 0


def kill_at_random(pid: int, run_dir: Path, rng: random.Random, step_seconds: float) -> None:
    """SIGKILL ``pid`` once the run saved ``0`` or ``1`` more steps, a random part of a step later."""
    goal = min(saved_step(run_dir) + rng.randint(0, 1), CFG["steps"] - 1)
    delay = rng.uniform(0.0, step_seconds)
    deadline = time.monotonic() + 60
    while saved_step(run_dir) < goal and time.monotonic() < deadline:
        time.sleep(0.002)
    time.sleep(delay)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def temporaries(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name != "trajectory.json")


def test_kill_9_at_random_points_then_resume_equals_an_uninterrupted_run(tmp_path):
    rng = random.Random(13)
    worker = Worker(tmp_path / "worker.err")
    ref, run = tmp_path / "reference", tmp_path / "run"
    reader = Reader(run / "trajectory.json")
    log: list[str] = []
    try:
        t0 = time.monotonic()
        assert worker.wait(worker.start(ref)) == 0, (tmp_path / "worker.err").read_text()
        # one step's time as the reference recorded it (the whole run's time includes start-up, and a delay that
        # long lets several steps pass, so the run can finish before the plan's kills have landed)
        step_seconds = statistics.median(st["seconds"] for st in json.loads((ref / "trajectory.json").read_text())
                                         ["steps"] if st.get("seconds"))
        reader.start()
        last, kills = 0, 0
        for fault in PLAN:
            if (run / "trajectory.json").exists() and Trajectory.load(run).completed:
                break
            if fault == "timed":
                pid = worker.start(run)
                kill_at_random(pid, run, rng, step_seconds)
            else:
                pid = worker.start(run, *fault)
            code = worker.wait(pid)
            assert code in (0, -9), (tmp_path / "worker.err").read_text()
            kills += code == -9
            left = temporaries(run) if run.exists() else []
            if (run / "trajectory.json").exists():  # whole, valid, and never behind what was saved before
                traj = Trajectory.load(run)
                assert traj.last_step >= last
                last = traj.last_step
            log.append(f"{fault}: exit {code}, step {last}, left {left}")
            if fault != "timed" and code == -9:
                assert left, "a kill inside a write leaves its temporary file"
        for _ in range(3):  # resume until done
            if Trajectory.load(run).completed:
                break
            assert worker.wait(worker.start(run)) == 0, (tmp_path / "worker.err").read_text()
        reader.stop.set()
        reader.join()
    finally:
        worker.close()
    print(f"{kills} kills survived in {time.monotonic() - t0:.1f} s; {reader.reads} reads while running:", *log,
          sep="\n")
    assert kills >= 6, log  # every self-kill, and most timed ones, landed
    assert not reader.broken, reader.broken[:3]
    assert temporaries(run) == [], "nothing but trajectory.json in the run folder"
    done, expected = (json.loads((d / "trajectory.json").read_text()) for d in (run, ref))
    assert done["completed"] and without_timing(done) == without_timing(expected)
