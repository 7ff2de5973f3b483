"""Deploy many: write one level of a run as a physically smaller, loadable model directory.

Format: a Hugging Face directory (safetensors, ``config.json``, tokenizer,
generation config, ``gisp_export.json``). When every layer ends with the same
standard widths (or ``uniform=True`` makes them so) it is a plain checkpoint of
the base family that loads without gisp; otherwise its config is the family's
per-layer config (model type ``gisp_<family>``, see
:mod:`gisp.architectures.perlayer`), which loads with ``AutoModelForCausalLM``
after ``import gisp`` (no ``trust_remote_code``). How uneven GQA groups are
written (``gqa``): :mod:`gisp.architectures.slicing`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gisp.architectures import layout_of
from gisp.architectures.slicing import OutputBiases, count_params, plan_layers, slim_model
from gisp.core.structures import Layout, Mask
from gisp.deploy.compensation import compensation_for_step
from gisp.deploy.levels import check_selection, levels, select_level, uniform_rule
from gisp.errors import GispError
from gisp.loading import load_base_model, torch_dtype
from gisp.outputs import check_output_dir, staged
from gisp.provenance import atomic_write_text, versions
from gisp.run.trajectory import Trajectory

EXPORT_FILE = "gisp_export.json"
EXPORT_FORMAT = 1


@dataclass
class ExportResult:
    """Where the export went and what it holds."""

    path: Path
    step: int
    sparsity: float
    step_sparsity: float
    params: int
    size_bytes: int
    plain: bool
    model_type: str
    mask: Mask = field(repr=False)
    adjustment: dict[str, Any] | None = None
    record: dict[str, Any] = field(default_factory=dict, repr=False)


def _copy_tokenizer(tokenizer: Any, source_path: str | None, out: Path) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
        return
    if source_path and Path(source_path).is_dir():
        for f in Path(source_path).iterdir():
            if f.is_file() and f.name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
                shutil.copy2(f, out / f.name)


def save_slim(
    model: nn.Module,
    mask: Mask,
    out: str | Path,
    *,
    gqa: str = "map",
    tokenizer: Any = None,
    source_path: str | None = None,
    record: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    biases: OutputBiases | None = None,
) -> tuple[Path, nn.Module]:
    """Slice ``model`` by ``mask`` and write the directory atomically (staged next to it, then renamed;
    see :mod:`gisp.outputs` for what ``overwrite`` may replace)."""
    out = check_output_dir(out, overwrite=overwrite, inputs=[source_path])
    slim = slim_model(model, mask, gqa=gqa, dtype=dtype, biases=biases)
    plans = plan_layers(mask, layout_of(model), gqa)
    rec = dict(record or {})
    rec.update({
        "format": EXPORT_FORMAT,
        "gqa": gqa,
        "plain": not slim.config.model_type.startswith("gisp_"),
        "params": sum(p.numel() for p in slim.parameters()),
        "dtype": str(next(slim.parameters()).dtype).replace("torch.", ""),
        "versions": versions(),
        "layers": [{"heads": p.heads, "kv_heads": p.kv_heads, "kv_head_map": p.kv_map, "channels": p.channels}
                   for p in plans],
        "note": "kept indices refer to the base model's layer, in the exported order",
    })
    with staged(out) as tmp:
        slim.save_pretrained(tmp, safe_serialization=True)
        _copy_tokenizer(tokenizer, source_path, tmp)
        write_record(tmp / EXPORT_FILE, rec)
    return out, slim


def write_record(path: Path, rec: dict[str, Any]) -> None:
    """JSON with one line per layer, so thousands of kept indices stay readable."""
    head = json.dumps({k: v for k, v in rec.items() if k != "layers"}, indent=1)
    layers = ",\n".join("  " + json.dumps(layer, separators=(",", ":")) for layer in rec.get("layers", []))
    atomic_write_text(path, head[:-2] + ',\n "layers": [\n' + layers + "\n ]\n}\n")


def export(
    run: str | Path | Trajectory,
    out: str | Path,
    *,
    sparsity: float | None = None,
    step: int | None = None,
    max_params: str | int | None = None,
    max_size_gb: float | None = None,
    round_to: int | None = None,
    uniform: bool | str = False,
    gqa: str = "map",
    model: nn.Module | None = None,
    tokenizer: Any = None,
    dtype: str | None = None,
    overwrite: bool = False,
    reconstruct: str | None = None,
    recon_options: dict[str, Any] | None = None,
) -> ExportResult:
    """Write one level of a run as a physically smaller, loadable model directory.

    ``model`` defaults to a fresh load of the run's base model (it must be
    unpruned: its fingerprint is checked). ``round_to`` makes per-layer widths
    multiples of N along the global order; ``uniform`` gives every layer one
    shape so the directory is a plain standard checkpoint: ``True``/``"keep"``
    keeps every structure of the level (larger), ``"cut"`` matches its size by
    cutting, protected layers included (not the run's model; see
    :mod:`gisp.deploy.levels`). ``gqa`` says how
    uneven GQA groups are written: ``map`` (each KV head once, per-layer
    query-to-KV map, smallest KV cache) or ``duplicate`` (KV heads repeated
    into equal groups: standard attention, larger KV cache); see the module
    docstring. ``dtype`` (fp32/bf16/fp16) converts the weights; default: the
    base model's dtype. ``reconstruct`` (``bias``, ``lsq``, ``lsq-bias``) refits the level
    before slicing (:mod:`gisp.deploy.reconstruct`; it replaces any compensation the level
    carries); ``recon_options``: ``source``, ``samples``, ``seq_len``, ``seed`` of its
    calibration windows (default: the run's) and ``damping``.
    """
    traj = run if isinstance(run, Trajectory) else Trajectory.load(run)
    run_dir = None if isinstance(run, Trajectory) else Path(run)
    # everything a user can get wrong is refused before the base model loads (20-40 s for a real one)
    check_output_dir(out, overwrite=overwrite, inputs=[run_dir, traj.model.get("path")])
    check_selection(traj, sparsity=sparsity, max_params=max_params, max_size_gb=max_size_gb)
    source_path = None
    if model is None:
        loaded = load_base_model(traj.model)
        model, tokenizer, source_path = loaded.model, tokenizer or loaded.tokenizer, loaded.path
    traj.check_model(model)
    weight_dtype = torch_dtype(dtype) if dtype else None
    all_levels = levels(traj, model, round_to=round_to, uniform=uniform, gqa=gqa, dtype=weight_dtype, run_dir=run_dir)
    level = select_level(all_levels, traj, sparsity=sparsity, step=step, max_params=max_params,
                         max_size_gb=max_size_gb)
    compensation, comp_path = compensation_for_step(run_dir, level.step)
    recon, replaced = None, None
    if reconstruct is not None:  # computed for this level's exact mask, on a copy of the base model
        model, recon = reconstruct_level(traj, model, level.mask, tokenizer, reconstruct, recon_options)
        compensation, comp_path, replaced = recon.biases, None, comp_path
    if comp_path is not None and (uniform or (round_to and round_to > 1)):
        raise GispError("this level carries FLAP's bias compensation, which holds for its exact mask only: "
                        "export it without --uniform/--round-to")
    adjustment = None
    rule = uniform_rule(uniform)
    if rule or (round_to and round_to > 1):
        adjustment = _adjustment(model, traj, level, gqa, rule, round_to)
    record = {
        "source": {"name": traj.model.get("name"), "path": traj.model.get("path"),
                   "fingerprint": traj.model.get("fingerprint"), "model_type": model.config.model_type},
        "run": str(run_dir.resolve()) if run_dir is not None else None,
        "step": level.step,
        "sparsity": level.sparsity,
        "step_sparsity": level.step_sparsity,
        "sparsity_definition": "fraction of decoder-layer linear parameters removed (KV heads counted once)",
        "selection": {"sparsity": sparsity, "step": step, "max_params": max_params, "max_size_gb": max_size_gb},
        "round_to": round_to,
        "uniform": rule or False,
        "adjustment": adjustment,
        "prune_config": traj.config,
        "calibration": traj.calibration,
        "compensation": None if comp_path is None else {
            "file": str(comp_path.resolve()), "kind": "FLAP bias compensation",
            "attn_layers": sorted(compensation.attn), "mlp_layers": sorted(compensation.mlp),
            "written_as": "o/down projection biases (attention_bias=mlp_bias=True, zero q/k/v/gate/up biases)"},
        "reconstruction": None if recon is None else {
            **recon.record, "written_as": "; ".join(
                (["refit o/down weights"] if recon.record["changes_weights"] else [])
                + (["o/down projection biases (attention_bias=mlp_bias=True)"] if recon.biases is not None else [])),
            "replaced_compensation": None if replaced is None else str(replaced.resolve())},
    }
    path, slim = save_slim(model, level.mask, out, gqa=gqa, tokenizer=tokenizer, source_path=source_path,
                           record=record, dtype=weight_dtype, overwrite=overwrite, biases=compensation)
    params = sum(p.numel() for p in slim.parameters())
    return ExportResult(path, level.step, level.sparsity, level.step_sparsity, params,
                        params * next(slim.parameters()).element_size(), not slim.config.model_type.startswith("gisp_"),
                        slim.config.model_type, level.mask, adjustment, record)


def _protected_removed(mask: Mask, layout: Layout) -> int:
    return sum(int((~mask.heads[i]).sum() + (~mask.channels[i]).sum()) for i in layout.protected)


def _adjustment(model: nn.Module, traj: Trajectory, level: Any, gqa: str, rule: str | None,
                round_to: int | None) -> dict[str, Any]:
    """What ``--uniform``/``--round-to`` changed against the run's own model at that step: the export is
    the run's model only when nothing was cut and nothing added (``is_run_model``)."""
    layout = traj.layout
    mask = traj.mask_at_step(level.step)
    before = count_params(model, layout, plan_layers(mask, layout, gqa))
    cut = sum(int((mask.heads[i] & ~level.mask.heads[i]).sum() + (mask.channels[i] & ~level.mask.channels[i]).sum())
              for i in range(layout.num_layers))
    added = sum(int((~mask.heads[i] & level.mask.heads[i]).sum() + (~mask.channels[i] & level.mask.channels[i]).sum())
                for i in range(layout.num_layers))
    return {"kind": f"uniform-{rule}" if rule else "round_to", "rule": rule, "round_to": round_to,
            "params_before": before, "params_after": level.params, "params_delta": level.params - before,
            "params_change": (level.params - before) / before,
            "sparsity_before": level.step_sparsity, "sparsity_after": level.sparsity,
            "level_structures_removed": cut, "structures_added": added,
            "protected_structures_removed": _protected_removed(level.mask, layout),
            "is_run_model": cut == 0 and added == 0}


def reconstruct_level(traj: Trajectory, model: nn.Module, mask: Mask, tokenizer: Any, method: str,
                      options: dict[str, Any] | None = None) -> tuple[nn.Module, Any]:
    """A reconstructed, masked copy of the (dense) ``model`` for ``mask``, and its
    :class:`~gisp.deploy.reconstruct.Reconstruction` (the input model is untouched)."""
    import copy

    from gisp.deploy.reconstruct import LevelReconstructor

    recon = LevelReconstructor(traj.config, traj.calibration, tokenizer, method, options)
    work = copy.deepcopy(model)
    return work, recon(work, mask)
