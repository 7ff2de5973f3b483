"""Where a run pruned: per-layer kept fractions of heads and channels, drawn and checked.

The GISP paper observes that (1) MLP layers are more redundant than attention
(pruned more in every layer) and (2) earlier layers matter more than later
ones. :func:`write_layer_report` reads any trajectory (a GISP run or a masking
baseline), computes per-layer kept fractions at chosen sparsities, draws a
heatmap and a line plot, and states both observations with the numbers behind
them, over unprotected layers only (protected layers are kept by construction).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gisp.core.structures import Layout, Mask
from gisp.errors import GispError
from gisp.provenance import atomic_write_json, atomic_write_text, save_figure
from gisp.run.trajectory import Trajectory

DEFAULT_LEVELS = (0.2, 0.3, 0.4, 0.5)


@dataclass
class LevelLayers:
    """Per-layer kept fractions at one level of a run."""

    requested: float
    step: int
    sparsity: float
    heads: list[float]
    channels: list[float]
    params: list[float]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class LayerReport:
    run: str
    model: str
    protected: list[int]
    levels: list[LevelLayers]
    observations: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)

    def statements(self) -> list[str]:
        return [o["statement"] for o in self.observations]

    def to_dict(self) -> dict[str, Any]:
        return {"run": self.run, "model": self.model, "protected": self.protected,
                "levels": [lv.to_dict() for lv in self.levels], "observations": self.observations,
                "files": self.files}


def level_layers(traj: Trajectory, mask: Mask, requested: float, step: int) -> LevelLayers:
    """Kept fraction of heads, channels and linear parameters in every layer."""
    layout = traj.layout
    heads, chans, params = [], [], []
    for i, s in enumerate(layout.layers):
        h, c = int(mask.heads[i].sum()), int(mask.channels[i].sum())
        heads.append(h / s.num_heads)
        chans.append(c / s.intermediate)
        params.append(s.params(h, int(mask.kv_heads(layout, i).sum()), c) / s.dense_params)
    return LevelLayers(requested, step, mask.sparsity(layout), heads, chans, params)


def _levels(traj: Trajectory, sparsities: list[float] | None) -> list[tuple[float, int]]:
    """(requested, step) pairs: the asked sparsities, else the run's natural levels."""
    final = traj.steps[-1]["sparsity"]
    if sparsities is None:
        if traj.config.get("method", "gisp") != "gisp":  # a baseline's trajectory: one step per level
            return [(rec["target"], rec["step"]) for rec in traj.steps[1:]]
        sparsities = [s for s in DEFAULT_LEVELS if s <= final + 1e-9] or [final]
    out = []
    for s in sparsities:
        if s > final + 0.01:
            raise GispError(f"this run reaches sparsity {final:.3f}; {s} is beyond it "
                            f"(use --sparsity up to {final:.2f})")
        out.append((s, traj.step_at(s)["step"]))
    return out


def _corr(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    return sxy / (sxx * syy) ** 0.5 if sxx > 0 and syy > 0 else 0.0


def observe(lv: LevelLayers, layout: Layout) -> list[dict[str, Any]]:
    """The paper's two observations at one level, with the numbers that decide them."""
    idx = layout.prunable
    out: list[dict[str, Any]] = []
    if not idx:
        return out
    h_rm = 1 - sum(lv.heads[i] * layout.layers[i].num_heads for i in idx) / sum(layout.layers[i].num_heads
                                                                                 for i in idx)
    c_rm = 1 - sum(lv.channels[i] * layout.layers[i].intermediate for i in idx) / sum(
        layout.layers[i].intermediate for i in idx)
    more = sum(1 for i in idx if 1 - lv.channels[i] > 1 - lv.heads[i] + 1e-12)
    mlp_more = c_rm > h_rm
    out.append({
        "level": lv.requested, "observation": "mlp_pruned_more_than_attention", "holds": mlp_more,
        "channels_removed": c_rm, "heads_removed": h_rm, "layers_where_mlp_more": more, "layers": len(idx),
        "statement": (f"at {lv.sparsity:.1%} sparsity MLP is pruned {'more' if mlp_more else 'no more'} than "
                      f"attention: {c_rm:.1%} of MLP channels vs {h_rm:.1%} of heads removed in unprotected layers "
                      f"(channels pruned more in {more} of {len(idx)} layers)"),
    })
    half = len(idx) // 2
    if half >= 1:
        early, late = idx[:half], idx[len(idx) - half:]
        ke = sum(lv.params[i] for i in early) / len(early)
        kl = sum(lv.params[i] for i in late) / len(late)
        r = _corr([float(i) for i in idx], [lv.params[i] for i in idx])
        out.append({
            "level": lv.requested, "observation": "early_layers_kept_more", "holds": ke > kl,
            "early_kept": ke, "late_kept": kl, "early_layers": early, "late_layers": late,
            "corr_layer_vs_kept": r,
            "statement": (f"at {lv.sparsity:.1%} sparsity early layers are kept {'more' if ke > kl else 'no more'} "
                          f"than late ones: layers {early[0]}-{early[-1]} keep {ke:.1%} of their parameters, layers "
                          f"{late[0]}-{late[-1]} keep {kl:.1%} (correlation of layer index with kept fraction "
                          f"{r:+.2f})"),
        })
    return out


def _plots(rep: LayerReport, out: Path, title: str) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(rep.levels[0].heads)
    files = {}
    fig, axes = plt.subplots(1, 2, figsize=(8, max(3.5, 0.18 * n + 1.5)), dpi=120, sharey=True)
    for ax, what in zip(axes, ("heads", "channels")):
        data = np.array([getattr(lv, what) for lv in rep.levels]).T  # layers x levels
        im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="lower")
        ax.set_xticks(range(len(rep.levels)), [f"{lv.sparsity:.0%}" for lv in rep.levels])
        ax.set_xlabel("model sparsity")
        ax.set_title(f"kept fraction of {'attention heads' if what == 'heads' else 'MLP channels'}", fontsize=9)
    axes[0].set_ylabel("layer")
    fig.colorbar(im, ax=axes, fraction=0.04)
    fig.suptitle(title, fontsize=9)
    files["heatmap"] = str(save_figure(fig, out / "layers_heatmap.png", tight=False))

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    colors = plt.cm.plasma(np.linspace(0, 0.85, len(rep.levels)))
    for lv, col in zip(rep.levels, colors):
        ax.plot(range(n), lv.channels, "-", color=col, label=f"MLP channels @ {lv.sparsity:.0%}")
        ax.plot(range(n), lv.heads, "--", color=col, label=f"heads @ {lv.sparsity:.0%}")
    for i in rep.protected:
        ax.axvspan(i - 0.5, i + 0.5, color="grey", alpha=0.12, lw=0)
    ax.set_xlabel("layer (grey: protected)")
    ax.set_ylabel("kept fraction")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    files["lines"] = str(save_figure(fig, out / "layers_lines.png"))
    return files


def markdown(rep: LayerReport) -> str:
    lines = [f"# Where {rep.model} was pruned ({rep.run})", "",
             f"Protected layers (never pruned): {rep.protected or 'none'}.", "",
             "| sparsity | step | heads kept | channels kept |", "|---|---|---|---|"]
    for lv in rep.levels:
        lines.append(f"| {lv.sparsity:.4f} | {lv.step} | {sum(lv.heads) / len(lv.heads):.3f} | "
                     f"{sum(lv.channels) / len(lv.channels):.3f} |")
    lines += ["", "Observations (unprotected layers):", ""] + [f"- {s}" for s in rep.statements()]
    lines += [""] + [f"![{k}]({Path(v).name})" for k, v in rep.files.items() if v.endswith(".png")]
    return "\n".join(lines) + "\n"


def _make_dir(path: Path) -> None:
    """``path`` as a directory to write into, or one line saying why it cannot be."""
    if path.exists() and not path.is_dir():
        raise GispError(f"--out {path} is a file: give a directory for the report")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GispError(f"cannot create --out {path} ({e.strerror}): choose another directory") from e


def write_layer_report(run: str | Path, sparsities: list[float] | None = None, out: str | Path | None = None,
                       plots: bool = True) -> LayerReport:
    """Per-layer kept fractions of a run at ``sparsities``, plots, markdown and JSON (default: in the run)."""
    traj = Trajectory.load(run)
    out_dir = Path(out) if out is not None else (Path(run) if Path(run).is_dir() else Path(run).parent)
    layout = traj.layout
    levels = [level_layers(traj, traj.mask_at_step(step), s, step) for s, step in _levels(traj, sparsities)]
    if not levels:
        raise GispError(f"{run} has no pruned level to report")
    _make_dir(out_dir)
    method = traj.config.get("method", "gisp")
    rep = LayerReport(str(run), str(traj.model.get("name")), sorted(layout.protected), levels)
    for lv in levels:
        rep.observations += observe(lv, layout)
    if plots:
        rep.files.update(_plots(rep, out_dir, f"{rep.model}: {method}, per-layer kept fractions"))
    rep.files["markdown"] = str(out_dir / "layers.md")
    rep.files["json"] = str(out_dir / "layers.json")
    atomic_write_text(out_dir / "layers.md", markdown(rep))
    atomic_write_json(out_dir / "layers.json", rep.to_dict())
    return rep
