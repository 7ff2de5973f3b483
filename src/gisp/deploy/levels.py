"""Which model each level of a run becomes: the nested masks, rounded or made uniform, and budgets.

A run's step ``k`` is a deployable model (:class:`ExportLevel`): its mask,
sparsity, parameter count and size. ``round_to`` moves each layer's widths to
multiples of N along the run's own global order; ``uniform`` gives every layer
one shape so the model is a plain standard checkpoint; budgets
(``max_params``, ``max_size_gb``) pick the largest level that fits.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gisp.architectures import get_architecture
from gisp.architectures.slicing import count_params, plan_layers, standard_config
from gisp.core.importance import structure_sums
from gisp.core.structures import Layout, Mask
from gisp.errors import GispError
from gisp.run.trajectory import Trajectory

_UNRANKED = 1e15  # keep-priority of structures the run never removed (above every global order)


@dataclass
class Ranking:
    """Keep-priority of every head and channel (higher = kept longer).

    A structure the run removed has its global pruning order; one it never
    removed ranks above all of them. Among never-removed structures (all of a
    protected layer's) the trajectory gives no order; where one is needed
    (``uniform``) a data-free weight-magnitude proxy breaks the tie.
    """

    heads: list[torch.Tensor]
    channels: list[torch.Tensor]
    head_ranked: list[torch.Tensor]
    channel_ranked: list[torch.Tensor]

    @classmethod
    def from_trajectory(cls, traj: Trajectory, model: nn.Module | None = None) -> Ranking:
        proxy = None
        if model is not None:
            sums = structure_sums(model, traj.layout, get_architecture(model), use_grad=False)
            proxy = (sums.heads, sums.channels)
        heads, chans, hr, cr = [], [], [], []
        for i in range(traj.layout.num_layers):
            for orders, out, ranked, kind in ((traj.head_order[i], heads, hr, 0),
                                              (traj.channel_order[i], chans, cr, 1)):
                o = torch.tensor(orders, dtype=torch.float64)
                is_ranked = o >= 0
                tie = proxy[kind][i] if proxy is not None else -torch.arange(len(orders), dtype=torch.float64)
                tie_rank = torch.empty_like(tie)
                tie_rank[torch.argsort(tie, stable=True)] = torch.arange(len(orders), dtype=torch.float64)
                out.append(torch.where(is_ranked, o, _UNRANKED + tie_rank))
                ranked.append(is_ranked)
        return cls(heads, chans, hr, cr)


def _head_multiple(round_to: int, head_dim: int) -> int:
    """Heads per step so that the q/o width (heads * head_dim) is a multiple of ``round_to``."""
    return round_to // math.gcd(round_to, head_dim)


def _round_count(kept: torch.Tensor, key: torch.Tensor, ranked: torch.Tensor, multiple: int) -> torch.Tensor:
    """Move one layer's kept count to the nearest multiple along the global order.

    Adds back the last-removed structures or removes the next-ranked ones,
    whichever reaches a multiple with fewer changes (ties: add back). The
    dense width is always allowed; untouched (dense) layers stay as they are.
    """
    n, dense = int(kept.sum()), kept.numel()
    if multiple <= 1 or n == dense or n % multiple == 0:
        return kept
    add_back = torch.nonzero(~kept).flatten()
    add_back = add_back[torch.argsort(key[add_back], descending=True, stable=True)]
    removable = torch.nonzero(kept & ranked).flatten()
    removable = removable[torch.argsort(key[removable], stable=True)]
    lo = n - removable.numel()
    options = [m for m in range((lo + multiple - 1) // multiple * multiple, dense + 1, multiple)] + [dense]
    target = min(options, key=lambda m: (abs(m - n), -m))
    out = kept.clone()
    if target > n:
        out[add_back[: target - n]] = True
    else:
        out[removable[: n - target]] = False
    return out


def round_mask(mask: Mask, layout: Layout, ranking: Ranking, round_to: int) -> Mask:
    """Per-layer head and channel counts made multiples of ``round_to`` (see :func:`_round_count`).

    Channel counts become multiples of ``round_to``; head counts multiples of
    ``round_to / gcd(round_to, head_dim)``, so every projection width is a
    multiple of ``round_to``.
    """
    if round_to < 1:
        raise GispError(f"--round-to must be a positive integer, got {round_to}")
    out = mask.clone()
    for i, s in enumerate(layout.layers):
        out.heads[i] = _round_count(mask.heads[i], ranking.heads[i], ranking.head_ranked[i],
                                    _head_multiple(round_to, s.head_dim))
        out.channels[i] = _round_count(mask.channels[i], ranking.channels[i], ranking.channel_ranked[i], round_to)
    return out


UNIFORM_RULES = ("keep", "cut")


def uniform_rule(uniform: bool | str) -> str | None:
    """``uniform`` as given to :func:`levels` (``False``, ``True`` = ``"keep"``, ``"keep"``, ``"cut"``)."""
    if uniform is False or uniform is None:
        return None
    rule = "keep" if uniform is True else str(uniform)
    if rule not in UNIFORM_RULES:
        raise GispError(f"unknown uniform rule '{uniform}': use keep (default) or cut")
    return rule


def _uniform_check(layout: Layout) -> None:
    s0 = layout.layers[0]
    if any((s.num_heads, s.num_kv_heads, s.intermediate, s.head_dim) != (s0.num_heads, s0.num_kv_heads,
                                                                          s0.intermediate, s0.head_dim)
           for s in layout.layers):
        raise GispError("--uniform needs a base model whose layers all have the same widths")


def _fill(kept: torch.Tensor, key: torch.Tensor, n: int) -> torch.Tensor:
    """``kept`` plus the removed structures with the highest keep-priority (removed last) up to ``n``."""
    out = kept.clone()
    add = torch.nonzero(~kept).flatten()
    add = add[torch.argsort(key[add], descending=True, stable=True)]
    out[add[: max(0, n - int(kept.sum()))]] = True
    return out


def uniform_keep_mask(mask: Mask, layout: Layout, ranking: Ranking, base_config: Any,
                      round_to: int | None = None) -> Mask:
    """One shape for every layer that keeps every structure of ``mask`` (the default ``--uniform``).

    The common widths are the widest layer's (KV heads, query heads per KV head, MLP channels); a
    narrower layer gets back the structures the run removed from it last (its global order, newest
    first) until it has them. Nothing the level keeps is cut, so the export holds the run's model at
    this level plus structures the run ranked just below it: its quality is at least that level's in
    practice, its cost is size (recorded and printed). A run whose protected layers stay dense gives
    the base model's widths: a smaller plain checkpoint then needs ``rule="cut"``.
    """
    _uniform_check(layout)
    s0 = layout.layers[0]
    kvh, g, L = s0.num_kv_heads, s0.group_size, layout.num_layers
    arch = get_architecture(base_config)
    kv_need = max(int(mask.kv_heads(layout, i).sum()) for i in range(L))
    k_need = max(int(mask.heads[i].view(kvh, g).sum(dim=1).max()) for i in range(L))
    c_need = max(int(c.sum()) for c in mask.channels)
    hm = _head_multiple(round_to, s0.head_dim) if round_to else 1
    shapes = [(kv, k) for kv in range(max(1, kv_need), kvh + 1) for k in range(max(1, k_need), g + 1)
              if ((kv * k) % hm == 0 or (kv, k) == (kvh, g))
              and standard_config(arch, base_config, kv * k, kv, 1) is not None]
    kv_keep, k = min(shapes, key=lambda x: (x[0] * x[1], x[0]))  # the dense shape is always there
    c = max(1, c_need)
    if round_to and round_to > 1 and c % round_to:
        c = min(s0.intermediate, (c + round_to - 1) // round_to * round_to)
    out = Mask.dense(layout)
    for i in range(L):
        key = ranking.heads[i].view(kvh, g)
        kept = mask.heads[i].view(kvh, g)
        groups = _fill(kept.any(dim=1), key.max(dim=1).values, kv_keep)
        keep = torch.zeros(kvh, g, dtype=torch.bool)
        for grp in torch.nonzero(groups).flatten().tolist():
            keep[grp] = _fill(kept[grp], key[grp], k)
        out.heads[i] = keep.flatten()
        out.channels[i] = _fill(mask.channels[i], ranking.channels[i], c)
    return out


def uniform_shape_mask(mask: Mask, layout: Layout, ranking: Ranking, base_config: Any,
                       round_to: int | None = None) -> Mask:
    """One shape for every layer, close to ``mask``'s parameter count (``--uniform-cut``).

    Every layer keeps the same number of KV heads with the same number of query
    heads in each (closest to the mean kept heads and KV heads of ``mask``) and
    the same number of channels (chosen so the total decoder parameters match
    ``mask``). Within a layer the structures kept are the ones the global order
    removed last. Protected layers are cut to the same shape, and structures
    the run never ranked are chosen by a weight-magnitude proxy: this departs
    from GISP's protection, which is the price of a plain architecture of this size: the result is
    not the run's model (on SmolLM2 at 18% its perplexity was 2,000x the level's; see the README).
    """
    _uniform_check(layout)
    s0 = layout.layers[0]
    kvh, g, L = s0.num_kv_heads, s0.group_size, layout.num_layers
    arch = get_architecture(base_config)
    mean_heads = sum(int(h.sum()) for h in mask.heads) / L
    mean_kv = sum(int(mask.kv_heads(layout, i).sum()) for i in range(L)) / L
    hm = _head_multiple(round_to, s0.head_dim) if round_to else 1
    shapes = [(kv, k) for kv in range(1, kvh + 1) for k in range(1, g + 1)
              if (kv * k) % hm == 0 and standard_config(arch, base_config, kv * k, kv, 1) is not None]
    if not shapes:
        raise GispError(f"no uniform head count fits --round-to {round_to} for this model: use a smaller --round-to")
    kv_keep, k = min(shapes, key=lambda x: (abs(x[0] * x[1] - mean_heads), abs(x[0] - mean_kv), -x[0] * x[1]))
    target = mask.kept_params(layout)
    attn = sum(s.params(kv_keep * k, kv_keep, 0) for s in layout.layers)
    per_channel = s0.params(0, 0, 2) - s0.params(0, 0, 1)
    c = round((target - attn - L * (s0.params(0, 0, 1) - per_channel)) / (L * per_channel))
    c = max(1, min(s0.intermediate, c))
    if round_to and s0.intermediate >= round_to:
        c = min(s0.intermediate, max(round_to, round(c / round_to) * round_to))
    out = Mask.dense(layout)
    for i in range(L):
        key = ranking.heads[i].view(kvh, g)
        groups = torch.argsort(key.max(dim=1).values, descending=True, stable=True)[:kv_keep]
        keep = torch.zeros(kvh, g, dtype=torch.bool)
        for grp in groups.tolist():
            keep[grp, torch.argsort(key[grp], descending=True, stable=True)[:k]] = True
        out.heads[i] = keep.flatten()
        ch = torch.zeros(s0.intermediate, dtype=torch.bool)
        ch[torch.argsort(ranking.channels[i], descending=True, stable=True)[:c]] = True
        out.channels[i] = ch
    return out



@dataclass
class ExportLevel:
    """One deployable model of a run: a step, possibly rounded or made uniform."""

    step: int
    sparsity: float
    params: int
    size_bytes: int
    mask: Mask = field(repr=False)
    step_sparsity: float = 0.0
    ppl: float | None = None
    ppl_protocol: str | None = None

    def to_row(self) -> dict[str, Any]:
        return {"step": self.step, "sparsity": self.sparsity, "step_sparsity": self.step_sparsity,
                "params": self.params, "size_bytes": self.size_bytes, "ppl": self.ppl,
                "ppl_protocol": self.ppl_protocol}


SPARSITY_TOLERANCE = 5e-3  # a request this far above the run's last level still names that level


def check_sparsity(traj: Trajectory, sparsity: float) -> None:
    """Refuse a sparsity outside [0, 1) or above the run's last level (one line).

    Below the last level (or the last step's target) a request means "the last step at or below it";
    above it there is no such level, and silently delivering the last one would report a model the
    user did not ask for.
    """
    if not (isinstance(sparsity, int | float) and 0.0 <= sparsity < 1.0):
        raise GispError(f"sparsity must be in [0, 1), got {sparsity}")
    top = max(rec["sparsity"] for rec in traj.steps)
    # a step that aimed at S and landed a little below it (structure granularity) still answers a request for S
    reached = max(top, max(rec["target"] for rec in traj.steps))
    if sparsity > reached + SPARSITY_TOLERANCE:
        raise GispError(f"this run holds sparsities up to {top:.4f} (step {traj.last_step}), not {sparsity}: "
                        "prune to a higher --target (or --resume the run) or ask for less")


def check_budget(max_params: str | int | float | None = None, max_size_gb: float | None = None) -> None:
    """Budgets must be finite and positive: one line for nan, inf, zero or negative values."""
    if max_params is not None and parse_params(max_params) <= 0:
        raise GispError(f"--max-params must be positive, got {max_params}")
    if max_size_gb is not None:
        try:
            ok = math.isfinite(float(max_size_gb)) and float(max_size_gb) > 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise GispError(f"--max-size-gb must be a positive finite number of GB, got {max_size_gb}")


def check_selection(traj: Trajectory, *, sparsity: float | None = None, max_params: str | int | None = None,
                    max_size_gb: float | None = None) -> None:
    """What :func:`select_level` would refuse about the request itself, checked before a model loads."""
    if sparsity is not None:
        check_sparsity(traj, sparsity)
    check_budget(max_params, max_size_gb)


def parse_params(text: str | int | float) -> int:
    """``"90M"`` -> 90_000_000 (k, M, B/G suffixes; plain numbers too)."""
    if isinstance(text, int | float):
        if not math.isfinite(text):
            raise GispError(f"--max-params takes a finite count like 90M, 1.2B or 500000; got {text}")
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbBgG]?)\s*", str(text))
    if not m:
        raise GispError(f"--max-params takes a count like 90M, 1.2B or 500000; got '{text}'")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def known_perplexities(run_dir: str | Path | None) -> dict[int, tuple[float, str]]:
    """Perplexities that ``gisp eval`` recorded for this run (``RUN/eval.json``), by step."""
    if run_dir is None:
        return {}
    file = Path(run_dir) / "eval.json"
    if not file.is_file():
        return {}
    try:
        entries = json.loads(file.read_text()).get("entries", [])
    except (json.JSONDecodeError, AttributeError):
        return {}
    out: dict[int, tuple[float, str]] = {}
    for e in entries:
        row, proto = e.get("row", {}), e.get("protocol", {})
        if proto.get("reconstruct"):  # a reconstructed level is not the plain step an export writes by default
            continue
        ppl = row.get("ppl")
        if isinstance(ppl, dict):
            ppl = ppl.get("ppl")
        if isinstance(ppl, int | float) and isinstance(row.get("step"), int):
            out[row["step"]] = (float(ppl), f"{proto.get('ppl_source')}/{proto.get('window')}")
    return out


def _adjust(mask: Mask, layout: Layout, ranking: Ranking | None, base_config: Any, round_to: int | None,
            uniform: bool | str) -> Mask:
    rule = uniform_rule(uniform)
    if rule == "keep":
        return uniform_keep_mask(mask, layout, ranking, base_config, round_to)
    if rule == "cut":
        return uniform_shape_mask(mask, layout, ranking, base_config, round_to)
    if round_to and round_to > 1:
        return round_mask(mask, layout, ranking, round_to)
    return mask


def levels(
    traj: Trajectory,
    model: nn.Module,
    *,
    round_to: int | None = None,
    uniform: bool | str = False,
    gqa: str = "map",
    dtype: torch.dtype | None = None,
    run_dir: str | Path | None = None,
) -> list[ExportLevel]:
    """Every step of the run as an exportable model: sparsity, parameters, bytes (and ppl if known).

    ``uniform``: one shape for every layer (a plain checkpoint): ``True``/``"keep"`` keeps every
    structure of the level (:func:`uniform_keep_mask`), ``"cut"`` matches the level's size by cutting
    (:func:`uniform_shape_mask`)."""
    if round_to is not None and round_to < 1:
        raise GispError(f"--round-to must be a positive width (1: no rounding), got {round_to}")
    layout = traj.layout
    rule = uniform_rule(uniform)
    ranking = Ranking.from_trajectory(traj, model if rule == "cut" else None) if (rule or round_to) else None
    elem = torch.empty(0, dtype=dtype or next(model.parameters()).dtype).element_size()
    ppl = known_perplexities(run_dir)
    out = []
    for rec in traj.steps:
        mask = _adjust(traj.mask_at_step(rec["step"]), layout, ranking, model.config, round_to, uniform)
        params = count_params(model, layout, plan_layers(mask, layout, gqa))
        p = ppl.get(rec["step"]) if not (uniform or round_to) else None
        out.append(ExportLevel(rec["step"], mask.sparsity(layout), params, params * elem, mask, rec["sparsity"],
                         p[0] if p else None, p[1] if p else None))
    return out


def select_level(
    all_levels: Sequence[ExportLevel],
    traj: Trajectory,
    *,
    sparsity: float | None = None,
    step: int | None = None,
    max_params: str | int | None = None,
    max_size_gb: float | None = None,
) -> ExportLevel:
    """The level a budget asks for.

    ``sparsity``/``step`` name a step of the run (the last one at or below the
    sparsity). ``max_params`` / ``max_size_gb`` (1 GB = 1e9 bytes) pick the
    largest model that fits: the earliest step whose export is within budget.
    """
    given = [x is not None for x in (sparsity, step, max_params, max_size_gb)]
    if sum(given) != 1:
        raise GispError("give exactly one of --sparsity, --step, --max-params, --max-size-gb")
    by_step = {lv.step: lv for lv in all_levels}
    if step is not None:
        if step not in by_step:
            raise GispError(f"step {step} is outside this run's steps 0..{traj.last_step}")
        return by_step[step]
    check_selection(traj, sparsity=sparsity, max_params=max_params, max_size_gb=max_size_gb)
    if sparsity is not None:
        return by_step[traj.step_at(sparsity)["step"]]
    if max_params is not None:
        limit, what = parse_params(max_params), "params"
    else:
        limit, what = int(max_size_gb * 1e9), "size_bytes"
    for lv in sorted(all_levels, key=lambda x: x.step):
        if getattr(lv, what) <= limit:
            return lv
    smallest = min(all_levels, key=lambda x: getattr(x, what))
    shown = f"{smallest.params:,} params" if what == "params" else f"{smallest.size_bytes / 1e9:.4f} GB"
    raise GispError(f"no level of this run fits the budget (smallest is {shown} at step {smallest.step}): "
                    "raise the budget or prune to a higher target")
