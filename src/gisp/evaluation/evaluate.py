"""Evaluate a run at chosen sparsities, or a model directory, with full provenance.

A run is evaluated on one freshly loaded base model: levels are visited from
sparse-less to sparse-most and, because masks are nested, each level's mask is
applied on top of the previous one (zeroing is idempotent), so no reload is
needed between levels.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from gisp.architectures import apply_mask
from gisp.core.fingerprint import fingerprint
from gisp.deploy.compensation import apply_compensation, compensation_for_step
from gisp.deploy.levels import check_sparsity
from gisp.errors import GispError
from gisp.evaluation.perplexity import perplexity
from gisp.loading import load_base_model, load_model, resolve_model_path
from gisp.provenance import atomic_write_json, versions
from gisp.run.trajectory import FILENAME, Trajectory


def _evaluate_loaded(model, tokenizer, *, ppl: str | None, window: int, max_windows: int | None,
                     tasks: list[str] | None, limit: int | None, batch_size: int, progress: bool) -> dict[str, Any]:
    row: dict[str, Any] = {}
    if ppl:
        row["ppl"] = perplexity(model, tokenizer, ppl, window=window, max_windows=max_windows,
                                batch_size=batch_size, progress=progress)
    if tasks:
        try:
            from gisp.tasks import evaluate_tasks
        except ImportError as e:
            raise GispError("task evaluation is not available in this installation of gisp") from e
        row["tasks"] = evaluate_tasks(model, tokenizer, tasks, limit=limit, progress=progress)
    return row


def _check_window(model, window: int, ppl: str | None) -> None:
    """A window longer than the model's context would score positions it was never trained on."""
    ctx = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if ppl and isinstance(ctx, int) and window > ctx:
        raise GispError(f"--window {window} exceeds this model's context length of {ctx} tokens: "
                        f"use --window {ctx} or less")


def _decoder_linear_params(model) -> int:
    """Weights and biases of every Linear but the LM head (the decoder layers' projections, whatever the
    family; works for exported per-layer widths too). GPT-2-style models write theirs as ``Conv1D``."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    return sum(p.numel() for m in model.modules() if isinstance(m, (nn.Linear, Conv1D)) and m is not head
               for p in m.parameters(recurse=False))


def evaluate(
    target: str | Path,
    sparsities: list[float] | None = None,
    *,
    ppl: str | None = "wiki",
    window: int = 128,
    max_windows: int | None = 256,
    tasks: list[str] | None = None,
    limit: int | None = None,
    dtype: str = "fp32",
    device: str = "auto",
    batch_size: int = 8,
    progress: bool = True,
    reconstruct: str | None = None,
    recon_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate a run directory at ``sparsities`` or a model directory/name as it is.

    ``reconstruct`` (``bias``, ``lsq``, ``lsq-bias``): each level of a run is reconstructed
    in memory before it is evaluated (:mod:`gisp.deploy.reconstruct`, replacing any compensation
    the level carries), exactly as ``gisp export --reconstruct`` writes it; ``recon_options``
    as :class:`~gisp.deploy.reconstruct.LevelReconstructor` takes them.
    """
    if window < 2:
        raise GispError(f"--window must be at least 2 tokens, got {window}")
    if max_windows is not None and max_windows < 1:
        raise GispError(f"--max-windows must be at least 1, got {max_windows}")
    if batch_size < 1:
        raise GispError(f"--batch-size must be at least 1, got {batch_size}")
    if not ppl and not tasks:
        raise GispError("nothing to evaluate: give --ppl SOURCE and/or --tasks")
    path = Path(target)
    is_run = (path / FILENAME).is_file()
    protocol = {"ppl_source": ppl, "window": window, "max_windows": max_windows, "tasks": tasks, "limit": limit,
                "eval_dtype": dtype}
    result: dict[str, Any] = {"target": str(target), "protocol": protocol, "versions": versions(), "rows": []}
    if not is_run:
        resolve_model_path(str(target))  # an unknown name says so first
        if any(s != 0.0 for s in sparsities or ()):
            raise GispError(f"{target} is a model, not a pruning run: it is evaluated as it is, so leave out "
                            "--sparsity (levels apply to runs)")
        if reconstruct:
            raise GispError("--reconstruct applies to the levels of a run: give a run directory")
        # evaluating a model as it is needs no gisp adapter: any causal LM transformers loads will do
        loaded = load_model(str(target), dtype=dtype, device=device, any_architecture=True)
        _check_window(loaded.model, window, ppl)
        t0 = time.perf_counter()
        row = _evaluate_loaded(loaded.model, loaded.tokenizer, ppl=ppl, window=window, max_windows=max_windows,
                               tasks=tasks, limit=limit, batch_size=batch_size, progress=progress)
        row.update({"sparsity": None, "linear_params": _decoder_linear_params(loaded.model),
                    "seconds": time.perf_counter() - t0})
        result["model"] = {"name": str(target), "fingerprint": fingerprint(loaded.model)}
        result["rows"].append(row)
        return result

    traj = Trajectory.load(path)
    levels = sorted(set(sparsities if sparsities is not None else [0.0]))
    for s in levels:
        check_sparsity(traj, s)  # in [0, 1) and not above the run's last level
    loaded = load_base_model(traj.model, dtype=dtype, device=device)
    traj.check_model(loaded.model)
    _check_window(loaded.model, window, ppl)
    result.update({"run": str(path), "model": traj.model, "calibration": traj.calibration,
                   "prune_config": traj.config, "prune_versions": traj.versions,
                   "sparsity_definition": "fraction of decoder-layer linear parameters removed"})
    recon, dense_state = None, None
    if reconstruct:
        from gisp.deploy.reconstruct import LevelReconstructor

        recon = LevelReconstructor(traj.config, traj.calibration, loaded.tokenizer, reconstruct, recon_options)
        protocol["reconstruct"] = recon.describe()
        dense_state = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
    for s in levels:
        rec = traj.step_at(s)
        comp, comp_path = compensation_for_step(path, rec["step"])  # FLAP levels of a gisp compare directory
        done = None
        if recon is not None:  # reconstruction changes weights: start each level from the dense model
            loaded.model.load_state_dict(dense_state)
            done = recon(loaded.model, traj.mask_at_step(rec["step"]))
            comp = done.biases
        else:
            apply_mask(loaded.model, traj.mask_at_step(rec["step"]))
        t0 = time.perf_counter()
        with apply_compensation(loaded.model, comp):
            row = _evaluate_loaded(loaded.model, loaded.tokenizer, ppl=ppl, window=window, max_windows=max_windows,
                                   tasks=tasks, limit=limit, batch_size=batch_size, progress=progress)
        row.update({"requested_sparsity": s, "step": rec["step"], "sparsity": rec["sparsity"],
                    "linear_params": rec["kept_params"], "seconds": time.perf_counter() - t0,
                    "compensation": None if comp_path is None or done is not None else str(comp_path)})
        if done is not None:
            row["reconstruction"] = {**done.record, "replaced_compensation": None if comp_path is None
                                     else str(comp_path)}
        result["rows"].append(row)
    _remember(path, result)
    return result


def _remember(run: Path, result: dict[str, Any]) -> None:
    """Keep the latest result per (protocol, step) in RUN/eval.json for listings and reports."""
    import json

    file = run / "eval.json"
    saved = json.loads(file.read_text()) if file.exists() else {"entries": []}
    key = json.dumps(result["protocol"], sort_keys=True)
    steps = {r["step"] for r in result["rows"]}
    saved["entries"] = [e for e in saved["entries"] if not (e["protocol_key"] == key and e["row"]["step"] in steps)]
    for r in result["rows"]:
        saved["entries"].append({"protocol_key": key, "protocol": result["protocol"], "row": r,
                                 "versions": result["versions"]})
    atomic_write_json(file, saved)
