"""Plots and markdown reports of a run's evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gisp.provenance import atomic_write_text, save_figure


def plot_perplexity(result: dict[str, Any], path: str | Path) -> Path:
    """Perplexity against measured sparsity, one point per evaluated level (PNG)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seen: set[int] = set()
    rows = []  # one point per distinct step (two requested levels can map to the same step)
    for r in result["rows"]:
        if "ppl" in r and r.get("step") not in seen:
            seen.add(r.get("step"))
            rows.append(r)
    xs = [100 * r["sparsity"] for r in rows]
    ys = [r["ppl"]["ppl"] for r in rows]
    p = result["protocol"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(xs, ys, "o-", label="GISP")
    for x, y in zip(xs, ys):
        ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xlabel("parameter sparsity of decoder layers (%)")
    ax.set_ylabel(f"{p['ppl_source']} perplexity ({p['window']}-token windows)")
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_title(f"{result['model']['name']}: one GISP run, every level", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return save_figure(fig, path)


def markdown_report(result: dict[str, Any], command: str, plot: str | None = None) -> str:
    """A short, self-describing report: what was run, on what, and what came out."""
    p, cfg, cal, v = result["protocol"], result["prune_config"], result["calibration"], result["versions"]
    lines = [
        f"# GISP run on {result['model']['name']}",
        "",
        f"Command: `{command}`",
        "",
        "| requested | step | sparsity | linear params kept | ppl |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['requested_sparsity']:.2f} | {r['step']} | {r['sparsity']:.4f} | "
                     f"{r['linear_params']:,} | {r['ppl']['ppl']:.3f} |")
    src = result["rows"][0]["ppl"]["source"]
    lines += [
        "",
        f"- Perplexity: `{p['ppl_source']}` eval part ({src['documents']} documents, {src['tokens']:,} tokens), "
        f"first {result['rows'][0]['ppl']['windows']} non-overlapping {p['window']}-token windows, "
        f"each scored independently, {p['eval_dtype']}.",
        f"- Sparsity: {result['sparsity_definition']} (embeddings, norms, lm_head excluded).",
        f"- Pruning: objective `{cfg['objective']}`, {cfg['steps']} steps, `{cfg['schedule']}` schedule in "
        f"{cfg['schedule_unit']}, normalisation `{cfg['normalize']}`, protected first {cfg['protect_first']:.0%} "
        f"and last {cfg['protect_last']} layer(s), autocast {cfg['autocast']}.",
        f"- Calibration: `{cal.get('name')}` {cal.get('part')} part, {cal.get('samples')} samples x "
        f"{cal.get('seq_len')} tokens, seed {cal.get('seed')}.",
        f"- Model fingerprint {result['model']['fingerprint']}, {result['model']['dense_params']:,} decoder "
        "linear parameters dense.",
        f"- Versions: gisp {v['gisp']}, torch {v['torch']}, transformers {v['transformers']}, python "
        f"{v['python']}; machine {v['platform']}, {v['cpu_count']} CPUs, CUDA {v['cuda']}.",
    ]
    if plot:
        lines += ["", f"![perplexity against sparsity]({plot})"]
    return "\n".join(lines) + "\n"


def write_report(result: dict[str, Any], run_dir: str | Path, command: str) -> tuple[Path, Path]:
    run_dir = Path(run_dir)
    png = plot_perplexity(result, run_dir / "perplexity.png")
    md = run_dir / "report.md"
    atomic_write_text(md, markdown_report(result, command, plot=png.name))
    return md, png
