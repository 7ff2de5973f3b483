"""Shared helpers of the scale benchmarks (bench_memory, bench_overhead, bench_distributed).

Each benchmark writes its own section of ``docs/bench_scale.md`` between
``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` markers (other sections are
kept), with the machine, versions and the exact command, plus a JSON file of
the raw numbers next to it when ``--json`` is given.
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "bench_scale.md"
HEADER = """# Scale benchmarks: memory, step overhead, processes

Measured by `scripts/bench_memory.py`, `scripts/bench_overhead.py`, `scripts/bench_shrink.py`,
`scripts/bench_distributed.py` and `scripts/bench_precision.py` on the real SmolLM2-135M
(`gisp.load_model("smollm2-135m")`).
Each section below is rewritten by its script; nothing here is typed by hand.
The machine had 2 CPU cores shared with other jobs, so timings are noisy: they are medians, and
ratios are measured within one run. There is no GPU here: the CUDA path of the memory benchmark
(`torch.cuda.max_memory_allocated`) exists but is not reported. See `docs/scaling.md` for what the
numbers mean for large models.
"""


def machine() -> dict[str, Any]:
    """Versions and hardware, for every result."""
    from gisp.provenance import versions

    info = dict(versions())
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()
        info["ram_gib"] = f"{int(mem[1]) / 2**20:.0f}"
    except OSError:
        pass
    info["cores_usable"] = str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    try:
        info["load_average_at_start"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        pass
    return info


def refuse_emulated(args: Any) -> None:
    """Stop an experiment before hours of emulated bf16 (its recorded cells used bf16 autocast): exit with one
    line unless ``args.autocast`` is not bf16, the CPU has native bf16, or ``--allow-emulated``/``--only-summary``."""
    from gisp.run.gradients import native_bf16

    if args.autocast == "bf16" and not args.only_summary and not args.allow_emulated and not native_bf16("cpu"):
        sys.exit("this CPU has no native bf16, so the bf16-autocast cells would take about 25x longer than fp32: "
                 "run on a machine with AVX-512/AMX, or pass --allow-emulated (or --only-summary)")


def command() -> str:
    rel = Path(sys.argv[0]).resolve()
    try:
        rel = rel.relative_to(ROOT)
    except ValueError:
        pass
    return "python " + " ".join(shlex.quote(a) for a in [str(rel), *sys.argv[1:]])


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def machine_block(info: dict[str, Any], cmd: str, seconds: float) -> str:
    keys = ("cpu", "cores_usable", "ram_gib", "load_average_at_start", "platform", "python", "torch",
            "transformers", "gisp", "cuda")
    lines = [f"- {k}: {info[k]}" for k in keys if k in info]
    return "\n".join([f"Command: `{cmd}` ({seconds:.0f} s)", "", *lines])


def write_section(name: str, body: str, raw: dict[str, Any], json_path: str | None) -> Path:
    """Replace this benchmark's section of docs/bench_scale.md (creating the file if needed)."""
    from gisp.provenance import atomic_write_json, atomic_write_text

    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = DOC.read_text() if DOC.exists() else HEADER
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    atomic_write_text(DOC, text)
    if json_path:
        atomic_write_json(json_path, raw)
    return DOC


def publish(name: str, body: str, raw: dict[str, Any], args: Any) -> None:
    """Write this benchmark's doc section (and ``--json``), or only the JSON with ``--no-doc``."""
    if not args.no_doc:
        print(f"wrote {write_section(name, body, raw, args.json)}")
    elif args.json:
        from gisp.provenance import atomic_write_json

        atomic_write_json(args.json, raw)


def last_json_line(stdout: str) -> dict[str, Any]:
    """A child process's result: the last stdout line that parses as JSON."""
    for line in reversed(stdout.strip().splitlines()):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    raise RuntimeError(f"no JSON result in child output:\n{stdout[-2000:]}")
