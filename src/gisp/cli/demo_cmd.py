"""``gisp demo``: the main job on the embedded default model, end to end."""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import typer
from rich.console import Console

from gisp.cli.app import app
from gisp.cli.common import with_config
from gisp.cli.eval_cmd import results_table
from gisp.cli.prune_cmd import run_prune, steps_table
from gisp.loading import DEFAULT_MODEL, resolve_device
from gisp.provenance import atomic_write_json
from gisp.run import PruneConfig

# The demo's own defaults: sized so that the slowest 2-core CPU seen here (AVX2, no bf16: about 15 ms per token
# of forward+backward in fp32, docs/bench_scale.md "precision") finishes in about ten minutes. The budget curve
# (docs/exp_budget.md) says how to spend that: steps barely matter at a fixed calibration budget (5 steps over 4k
# tokens did as well as 10-20), and 5 steps to 50% land exactly on the 10/20/30/40/50% levels the demo shows.
# More calibration tokens is the lever with time to spare (10 steps over 16k tokens: wiki ppl 90 / 259 at 30% / 50%
# against 99 / 352 for these defaults).
_DEMO = {"steps": 5, "calib_samples": 16, "seq_len": 256}
_FIXED = {"target": 0.5, "calib": "c4", "shrink_every": 1}


def demo_autocast() -> str:
    """bf16 autocast where the hardware has bf16, else none: emulated bf16 is about 25x slower than fp32."""
    from gisp.run.gradients import native_bf16

    return "bf16" if native_bf16(resolve_device("auto")) else "none"


@app.command("demo")
@with_config(PruneConfig, only=tuple(_DEMO), defaults=_DEMO, fixed=_FIXED,
             notes=dict.fromkeys(_DEMO, "(The demo's default fits a CPU budget.)"))
def demo_command(
    out: Path = typer.Option(Path("runs/demo"), help="Run directory."),
    max_windows: int = typer.Option(64, help="wiki evaluation windows of 128 tokens."),
    fresh: bool = typer.Option(False, help="Delete --out first instead of reusing/resuming it."),
    *,
    config: PruneConfig,
) -> None:
    """Prune SmolLM2-135M to 50% on c4, evaluate wiki perplexity at 0-50% from the one run, plot, report."""
    from gisp.evaluation.evaluate import evaluate
    from gisp.layer_report import write_layer_report
    from gisp.report import write_report

    t0 = time.perf_counter()
    if fresh and out.exists():
        shutil.rmtree(out)
    config = dataclasses.replace(config, autocast=demo_autocast())
    traj = run_prune(DEFAULT_MODEL, out, config, dtype="fp32", device="auto", resume=True)
    console = Console()
    console.print(steps_table(traj))
    result = evaluate(out, [0.0, 0.1, 0.2, 0.3, 0.4, 0.5], ppl="wiki", window=128, max_windows=max_windows)
    console.print(results_table(result))
    atomic_write_json(out / "demo_eval.json", result)
    command = (f"gisp demo --out {out} --steps {config.steps} --calib-samples {config.calib_samples} "
               f"--seq-len {config.seq_len} --max-windows {max_windows}")
    md, png = write_report(result, out, command)
    layers = write_layer_report(out, [0.2, 0.3, 0.4, 0.5])
    for obs in layers.observations:
        console.print(f"- {obs['statement']}")
    console.print(f"report: {md}\nplot: {png}\nper-layer report: {layers.files['markdown']}\n"
                  f"total {time.perf_counter() - t0:.0f} s")
