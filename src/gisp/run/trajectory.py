"""The trajectory: one pruning run, from which every sparsity level is read.

For every structure it stores the step that removed it (0 = never) and its
position in the global pruning order, plus each step's :class:`StepRecord`
(measured sparsity, calibration loss and time), the configuration, versions,
the base model's fingerprint and the calibration tokens' hash. Masks are nested
by construction: the mask of step ``k`` keeps exactly the structures removed
after ``k``.

:meth:`Trajectory.load` validates the whole file (types, shapes, steps within
the run, nothing removed from a protected layer, one gap-free pruning order, and
step records that say what the masks imply), so an edited or damaged file fails
with one line naming the field instead of masking a model wrongly behind
plausible numbers. The file carries a ``checksum`` of its content (the base
model's name and path excluded, so a moved model can be pointed at): a file
changed after gisp wrote it loads with a warning, and the fingerprint check
then blames the file, not the model.

Only :meth:`Trajectory.start`, :meth:`Trajectory.record_step`,
:meth:`Trajectory.set_loss` and :meth:`Trajectory.set_timing` write a
trajectory; ``steps`` holds each record as the plain dict saved in the file
(:meth:`StepRecord.to_dict`), which is what every reader indexes.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gisp.architectures import apply_mask, layout_of
from gisp.core.fingerprint import fingerprint
from gisp.core.ranking import Pick
from gisp.core.structures import LayerShape, Layout, Mask, protected_layers
from gisp.errors import GispError
from gisp.provenance import atomic_write_json

FILENAME = "trajectory.json"
FORMAT = 1
CALIB_HASH = "tokens_sha256"
"""The key of the calibration record that holds :meth:`gisp.CalibrationSet.fingerprint` (absent in old runs)."""
RELOCATABLE = ("name", "path")
"""Entries of ``model`` a user may edit (to point at a moved base model): outside the checksum."""


@dataclass
class StepRecord:
    """What one step of a run measured; step 0 is the dense model.

    Saved as a dict with the keys in this order (:meth:`to_dict`); the optional
    fields are left out when unset, as runs and methods that do not measure them
    always did.
    """

    step: int
    target: float
    """The schedule's target sparsity of this step."""
    sparsity: float
    """Measured sparsity of the step's mask (:meth:`gisp.Mask.sparsity`)."""
    kept_params: int
    calib_loss: float | None = None
    """Calibration loss of the step's mask: filled in by the next step's gradient pass (:meth:`Trajectory.set_loss`)."""
    heads_removed: int = 0
    channels_removed: int = 0
    seconds: float = 0.0
    """Wall-clock seconds of the step, without the trajectory write."""
    gradient_seconds: float | None = None
    """Forward+backward over the calibration set (all-reduce included)."""
    timing: dict[str, float] | None = None
    """The rest of ``seconds`` by phase, plus ``processes`` and ``save`` (the previous write of the file)."""
    work_params: int | None = None
    """Parameters of the network the gradients ran on (``shrink_every`` runs only)."""

    @classmethod
    def of_mask(cls, step: int, target: float, mask: Mask, layout: Layout, **measured: Any) -> StepRecord:
        """The record of ``mask``: sparsity, kept parameters and removed structures counted from it."""
        return cls(step=step, target=target, sparsity=mask.sparsity(layout), kept_params=mask.kept_params(layout),
                   heads_removed=sum(int((~h).sum()) for h in mask.heads),
                   channels_removed=sum(int((~c).sum()) for c in mask.channels), **measured)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "step": self.step, "target": self.target, "sparsity": self.sparsity, "kept_params": self.kept_params,
            "calib_loss": self.calib_loss, "heads_removed": self.heads_removed,
            "channels_removed": self.channels_removed,
        }
        if self.work_params is not None:
            d["work_params"] = self.work_params
        d["seconds"] = self.seconds
        if self.gradient_seconds is not None:
            d["gradient_seconds"] = self.gradient_seconds
        if self.timing is not None:
            d["timing"] = dict(self.timing)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StepRecord:
        """A saved record; keys this version does not know are ignored, missing optional ones left unset."""
        return cls(
            step=d["step"], target=d["target"], sparsity=d["sparsity"], kept_params=d["kept_params"],
            calib_loss=d.get("calib_loss"), heads_removed=d.get("heads_removed", 0),
            channels_removed=d.get("channels_removed", 0), seconds=d.get("seconds", 0.0),
            gradient_seconds=d.get("gradient_seconds"),
            timing=dict(d["timing"]) if d.get("timing") is not None else None, work_params=d.get("work_params"),
        )


@dataclass
class Trajectory:
    layout: Layout
    config: dict[str, Any]
    model: dict[str, Any]
    calibration: dict[str, Any]
    versions: dict[str, str]
    head_step: list[list[int]]
    channel_step: list[list[int]]
    head_order: list[list[int]]
    channel_order: list[list[int]]
    steps: list[dict[str, Any]] = field(default_factory=list)
    """One :meth:`StepRecord.to_dict` per step, step ``k`` at index ``k`` (read-only outside this class)."""
    completed: bool = False
    edited: bool = False
    """Loaded from a file whose content no longer matches the checksum gisp wrote into it."""
    source: str | None = None
    """The file this trajectory was loaded from, for messages."""

    @classmethod
    def start(cls, layout: Layout, config: dict, model: dict, calibration: dict, versions: dict) -> Trajectory:
        """A new run: nothing removed yet, and the dense model recorded as step 0."""
        traj = cls(
            layout=layout, config=config, model=model, calibration=calibration, versions=versions,
            head_step=[[0] * s.num_heads for s in layout.layers],
            channel_step=[[0] * s.intermediate for s in layout.layers],
            head_order=[[-1] * s.num_heads for s in layout.layers],
            channel_order=[[-1] * s.intermediate for s in layout.layers],
        )
        traj.steps.append(StepRecord(0, 0.0, 0.0, layout.dense_params).to_dict())
        return traj

    # recording ----------------------------------------------------------------
    def record_step(self, record: StepRecord, picks: Sequence[Pick], first_order: int) -> int:
        """Append the next step: ``picks`` (in removal order) were removed by ``record.step`` and take
        positions ``first_order, first_order + 1, ...`` of the global pruning order. Returns the position
        the next removed structure takes."""
        if record.step != self.last_step + 1 or not self.steps:
            raise GispError(f"internal error: step {record.step} recorded after step {self.last_step}")
        order = first_order
        for p in picks:
            steps, orders = (self.head_step, self.head_order) if p.kind == "head" else \
                (self.channel_step, self.channel_order)
            if steps[p.layer][p.index] != 0:
                raise GispError(f"internal error: {p.kind} {p.layer}.{p.index} removed twice")
            steps[p.layer][p.index] = record.step
            orders[p.layer][p.index] = order
            order += 1
        self.steps.append(record.to_dict())
        return order

    def set_loss(self, step: int, loss: float) -> None:
        """The calibration loss of ``step``'s mask, measured after the step was recorded."""
        self._record(step)["calib_loss"] = loss

    def set_timing(self, step: int, part: str, seconds: float) -> None:
        """One timing part of ``step`` measured after it was recorded (the trajectory write: ``save``)."""
        rec = self._record(step)
        if rec.get("timing") is None:
            raise GispError(f"internal error: step {step} has no timing")
        rec["timing"][part] = seconds

    def next_order(self) -> int:
        """The position in the global pruning order that the next removed structure takes."""
        return 1 + max((max(o) for o in self.head_order + self.channel_order if o), default=-1)

    def record(self, step: int) -> StepRecord:
        """Step ``step``'s record, typed."""
        return StepRecord.from_dict(self._record(step))

    def _record(self, step: int) -> dict[str, Any]:
        if not 0 <= step < len(self.steps) or self.steps[step]["step"] != step:
            raise GispError(f"step {step} is outside this run's steps 0..{self.last_step}")
        return self.steps[step]

    # masks ------------------------------------------------------------------
    @property
    def last_step(self) -> int:
        return self.steps[-1]["step"] if self.steps else 0

    def mask_at_step(self, step: int) -> Mask:
        """Structures kept after ``step`` (step 0 = dense)."""
        if not 0 <= step <= self.last_step:
            raise GispError(f"step {step} is outside this run's steps 0..{self.last_step}")

        def kept(arr: list[int]) -> torch.Tensor:
            t = torch.tensor(arr, dtype=torch.long)
            return (t == 0) | (t > step)

        return Mask([kept(h) for h in self.head_step], [kept(c) for c in self.channel_step])

    def step_at(self, sparsity: float) -> dict[str, Any]:
        """The last step whose measured sparsity is at or below ``sparsity``."""
        if not 0.0 <= sparsity < 1.0:
            raise GispError(f"sparsity must be in [0, 1), got {sparsity}")
        best = self.steps[0]
        for rec in self.steps:
            if rec["sparsity"] <= sparsity + 1e-9:
                best = rec
        return best

    def mask_at(self, sparsity: float) -> Mask:
        """The nested mask of the last step at or below ``sparsity``."""
        return self.mask_at_step(self.step_at(sparsity)["step"])

    def check_model(self, model: nn.Module) -> None:
        """Refuse a model that is not this run's base model, blaming the run file when it was changed after
        gisp wrote it (its checksum no longer matches) and the model otherwise."""
        name, saved = self.model.get("name"), self.model.get("fingerprint")
        where = self.source or "the run file"
        layout = layout_of(model)
        if layout.layers != self.layout.layers:
            if self.edited:
                raise GispError(f"{where} was changed after gisp wrote it (checksum mismatch) and its layout no "
                                "longer fits the base model's layer shapes: restore the file or re-run gisp prune")
            raise GispError(
                f"this trajectory was made for '{name}' and does not fit this model's "
                "layer shapes: load the run's base model"
            )
        fp = fingerprint(model)
        if fp != saved:
            if self.edited:
                raise GispError(f"{where} was changed after gisp wrote it (checksum mismatch) and its model "
                                f"fingerprint {saved} is not this model's {fp}: restore the file or re-run gisp prune")
            raise GispError(
                f"this model (fingerprint {fp}) is not the run's base model '{name}' (fingerprint {saved}): the run "
                "was made from another model or this one was modified; apply it to a freshly loaded base model"
            )

    def apply(self, model: nn.Module, sparsity: float | None = None, *, step: int | None = None) -> dict[str, Any]:
        """Mask a freshly loaded base model in place; returns the chosen step's record."""
        self.check_model(model)
        rec = self._record(step) if step is not None else self.step_at(sparsity if sparsity is not None else 0.0)
        apply_mask(model, self.mask_at_step(rec["step"]))
        return rec

    # persistence --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The file's content, ``checksum`` last (:func:`checksum` of the rest)."""
        d = {
            "format": FORMAT,
            "completed": self.completed,
            "model": self.model,
            "config": self.config,
            "calibration": self.calibration,
            "versions": self.versions,
            "sparsity_definition": "fraction of decoder-layer linear parameters (q,k,v,o,gate,up,down, "
            "biases included) removed; embeddings, norms and lm_head excluded; protected layers count",
            "layout": self.layout.to_dict(),
            "steps": self.steps,
            "head_step": self.head_step,
            "channel_step": self.channel_step,
            "head_order": self.head_order,
            "channel_order": self.channel_order,
        }
        d["checksum"] = checksum(d)
        return d

    def save(self, run_dir: str | Path) -> Path:
        path = Path(run_dir) / FILENAME
        atomic_write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, run: str | Path) -> Trajectory:
        path = Path(run)
        if path.is_dir():
            path = path / FILENAME
        if not path.is_file():
            raise GispError(f"no pruning run at {run} (expected {FILENAME}): run 'gisp prune' first")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise GispError(f"{path} is not a valid trajectory file ({getattr(e, 'msg', None) or e.reason}): "
                            "restore it or re-run gisp prune") from e
        except OSError as e:
            raise GispError(f"cannot read {path} ({e.strerror}): check its permissions") from e
        if not isinstance(d, dict):
            raise GispError(f"{path} is not a valid trajectory file (not a JSON object): "
                            "restore it or re-run gisp prune")
        if d.get("format") != FORMAT:
            raise GispError(f"{path} has trajectory format {d.get('format')}, this gisp reads {FORMAT}")
        layout = _Validator(path, d).run()
        edited = "checksum" in d and d["checksum"] != checksum(d)
        if edited:
            warnings.warn(f"{path} was changed after gisp wrote it (its checksum does not match its content)",
                          stacklevel=2)
        return cls(
            layout=layout, config=d["config"], model=d["model"],
            calibration=d["calibration"], versions=d["versions"], head_step=d["head_step"],
            channel_step=d["channel_step"], head_order=d["head_order"], channel_order=d["channel_order"],
            steps=d["steps"], completed=d["completed"], edited=edited, source=str(path),
        )


def checksum(d: dict[str, Any]) -> str:
    """SHA-256 (16 hex digits) of a trajectory dict's content: everything but ``checksum`` itself and the
    base model's :data:`RELOCATABLE` entries, as canonical JSON."""
    content = {k: v for k, v in d.items() if k != "checksum"}
    if isinstance(content.get("model"), dict):
        content["model"] = {k: v for k, v in content["model"].items() if k not in RELOCATABLE}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# validation -------------------------------------------------------------------------------------------------

_SHAPE_INTS = ("num_heads", "num_kv_heads", "head_dim", "hidden", "intermediate")
_SHAPE_BOOLS = ("qkv_bias", "o_bias", "mlp_bias")
_TOP = ("completed", "model", "config", "calibration", "versions", "layout", "steps", "head_step", "channel_step",
        "head_order", "channel_order")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class _Validator:
    """Checks a parsed trajectory file against itself: its layout, its steps and its masks."""

    def __init__(self, path: Path, d: dict[str, Any]) -> None:
        self.path, self.d = path, d

    def fail(self, field: str, problem: str) -> GispError:
        return GispError(f"{self.path}: field '{field}' {problem}: the file was edited or damaged; "
                         "restore it or re-run gisp prune")

    def run(self) -> Layout:
        d = self.d
        for key in _TOP:
            if key not in d:
                raise self.fail(key, "is missing")
        if not isinstance(d["completed"], bool):
            raise self.fail("completed", "must be true or false")
        for key in ("model", "config", "calibration", "versions"):
            if not isinstance(d[key], dict):
                raise self.fail(key, "must be a JSON object")
        fp = d["model"].get("fingerprint")
        if fp is not None and not isinstance(fp, str):
            raise self.fail("model.fingerprint", "must be a string")
        if "checksum" in d and not isinstance(d["checksum"], str):
            raise self.fail("checksum", "must be a string")
        layout = self.layout()
        last = self.steps(layout)
        heads = self.rows("head_step", [s.num_heads for s in layout.layers], layout, last)
        channels = self.rows("channel_step", [s.intermediate for s in layout.layers], layout, last)
        self.orders(heads, channels, layout)
        self.records(layout, heads, channels, last)
        return layout

    def layout(self) -> Layout:
        lay = self.d["layout"]
        if not isinstance(lay, dict) or not isinstance(lay.get("layers"), list) or not lay["layers"]:
            raise self.fail("layout.layers", "must be a non-empty list of layer shapes")
        shapes = []
        for i, s in enumerate(lay["layers"]):
            where = f"layout.layers[{i}]"
            if not isinstance(s, dict):
                raise self.fail(where, "must be a JSON object")
            unknown = set(s) - set(_SHAPE_INTS) - set(_SHAPE_BOOLS)
            if unknown:
                raise self.fail(f"{where}.{sorted(unknown)[0]}", "is not a layer-shape field")
            for k in _SHAPE_INTS:
                if not _is_int(s.get(k)) or s[k] < 1:
                    raise self.fail(f"{where}.{k}", f"must be a positive integer, got {s.get(k)!r}")
            for k in _SHAPE_BOOLS:
                if k in s and not isinstance(s[k], bool):
                    raise self.fail(f"{where}.{k}", "must be true or false")
            if s["num_heads"] % s["num_kv_heads"]:
                raise self.fail(f"{where}.num_kv_heads", "must divide num_heads")
            shapes.append(LayerShape(**s))
        prot = lay.get("protected")
        n = len(shapes)
        if not isinstance(prot, list) or not all(_is_int(i) and 0 <= i < n for i in prot) \
                or len(set(prot)) != len(prot):
            raise self.fail("layout.protected", f"must list distinct layer indices in 0..{n - 1}")
        if len(prot) == n:
            raise self.fail("layout.protected", "protects every layer")
        layout = Layout(tuple(shapes), frozenset(prot))
        cfg = self.d["config"]
        if _is_num(cfg.get("protect_first")) and _is_int(cfg.get("protect_last")):
            try:
                expected = protected_layers(n, cfg["protect_first"], cfg["protect_last"])
            except GispError:
                raise self.fail("config.protect_first", "and protect_last do not fit the layout") from None
            if expected != layout.protected:
                raise self.fail("layout.protected", f"is {sorted(prot)}, but the run's protect_first/protect_last "
                                f"protect {sorted(expected)}")
        return layout

    def steps(self, layout: Layout) -> int:
        steps = self.d["steps"]
        if not isinstance(steps, list) or not steps:
            raise self.fail("steps", "must be a non-empty list of step records")
        for k, rec in enumerate(steps):
            where = f"steps[{k}]"
            if not isinstance(rec, dict):
                raise self.fail(where, "must be a JSON object")
            for key in ("step", "target", "sparsity", "kept_params"):
                if key not in rec:
                    raise self.fail(f"{where}.{key}", "is missing")
            if not _is_int(rec["step"]) or rec["step"] != k:
                raise self.fail(f"{where}.step", f"must be {k} (records are stored in step order), "
                                f"got {rec['step']!r}")
            for key, low, high in (("target", 0.0, 1.0), ("sparsity", 0.0, 1.0)):
                if not _is_num(rec[key]) or not low <= rec[key] <= high:
                    raise self.fail(f"{where}.{key}", f"must be a number in [{low:g}, {high:g}], got {rec[key]!r}")
            for key in ("kept_params", "heads_removed", "channels_removed", "work_params"):
                if key in rec and not (rec[key] is None and key == "work_params") \
                        and (not _is_int(rec[key]) or rec[key] < 0):
                    raise self.fail(f"{where}.{key}", f"must be a non-negative integer, got {rec[key]!r}")
            for key in ("calib_loss", "gradient_seconds", "seconds"):
                v = rec.get(key)
                if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool)):
                    raise self.fail(f"{where}.{key}", f"must be a number or null, got {v!r}")
            timing = rec.get("timing")
            if timing is not None and (not isinstance(timing, dict) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in timing.values())):
                raise self.fail(f"{where}.timing", "must map phases to numbers")
        last = len(steps) - 1
        cfg = self.d["config"]
        if "method" not in cfg and _is_int(cfg.get("steps")):  # a GISP run: its steps are the config's
            if last > cfg["steps"]:
                raise self.fail("steps", f"holds {last} steps, more than the run's {cfg['steps']}")
            if self.d["completed"] and last != cfg["steps"]:
                raise self.fail("completed", f"is true after step {last} of {cfg['steps']}")
        return last

    def rows(self, key: str, widths: list[int], layout: Layout, last: int) -> list[list[int]]:
        rows = self.d[key]
        if not isinstance(rows, list) or len(rows) != len(widths):
            raise self.fail(key, f"must hold one row per layer ({len(widths)})")
        for i, (row, width) in enumerate(zip(rows, widths)):
            if not isinstance(row, list) or len(row) != width:
                raise self.fail(f"{key}[{i}]", f"must be a list of {width} steps (the layer's width)")
            for j, x in enumerate(row):
                if not _is_int(x) or not 0 <= x <= last:
                    raise self.fail(f"{key}[{i}][{j}]", f"must be a step in 0..{last} (0: never removed), got {x!r}")
            if i in layout.protected and any(row):
                raise self.fail(f"{key}[{i}]", f"removes structures of protected layer {i}")
        return rows

    def orders(self, heads: list[list[int]], channels: list[list[int]], layout: Layout) -> None:
        removed: list[tuple[int, int, str]] = []  # (order, step, field)
        for key, steps in (("head_order", heads), ("channel_order", channels)):
            rows = self.d[key]
            if not isinstance(rows, list) or len(rows) != len(steps):
                raise self.fail(key, f"must hold one row per layer ({len(steps)})")
            for i, (row, srow) in enumerate(zip(rows, steps)):
                if not isinstance(row, list) or len(row) != len(srow):
                    raise self.fail(f"{key}[{i}]", f"must be a list of {len(srow)} positions (the layer's width)")
                for j, (o, st) in enumerate(zip(row, srow)):
                    where = f"{key}[{i}][{j}]"
                    if not _is_int(o):
                        raise self.fail(where, f"must be an integer, got {o!r}")
                    if (o == -1) != (st == 0) or o < -1:
                        raise self.fail(where, "must be -1 exactly for a structure never removed, else its position "
                                        f"in the pruning order (got {o} for removal step {st})")
                    if st:
                        removed.append((o, st, where))
        removed.sort()
        for pos, (o, st, where) in enumerate(removed):
            if o != pos:
                raise self.fail(where, f"is {o}: the pruning order must number the {len(removed)} removed "
                                f"structures 0..{len(removed) - 1} once each")
            if pos and st < removed[pos - 1][1]:
                raise self.fail(where, f"puts a structure of step {st} after one of step {removed[pos - 1][1]}")

    def records(self, layout: Layout, heads: list[list[int]], channels: list[list[int]], last: int) -> None:
        """Every record's kept parameters, sparsity and removed counts are what its step's mask gives."""
        big = last + 1

        def removal(row: list[int]) -> torch.Tensor:
            return torch.tensor([x if x else big for x in row], dtype=torch.long)

        per_layer = []  # per layer: (kept heads, kept kv heads, kept channels) at every step 0..last
        head_gone = torch.zeros(big, dtype=torch.long)
        chan_gone = torch.zeros(big, dtype=torch.long)
        ks = torch.arange(big)
        for s, hrow, crow in zip(layout.layers, heads, channels):
            h, c = removal(hrow), removal(crow)
            kv = h.view(s.num_kv_heads, s.group_size).max(dim=1).values
            kept = [(h[None, :] > ks[:, None]).sum(1), (kv[None, :] > ks[:, None]).sum(1),
                    (c[None, :] > ks[:, None]).sum(1)]
            per_layer.append([t.tolist() for t in kept])
            head_gone += s.num_heads - kept[0]
            chan_gone += s.intermediate - kept[2]
        dense = layout.dense_params
        for k, rec in enumerate(self.d["steps"]):
            kept = sum(s.params(hk[k], kvk[k], ck[k]) for s, (hk, kvk, ck) in zip(layout.layers, per_layer))
            where = f"steps[{k}]"
            if rec["kept_params"] != kept:
                raise self.fail(f"{where}.kept_params", f"is {rec['kept_params']}, but the step's mask keeps {kept}")
            sparsity = 1.0 - kept / dense
            if abs(rec["sparsity"] - sparsity) > 1e-9:
                raise self.fail(f"{where}.sparsity", f"is {rec['sparsity']}, but the step's mask has {sparsity}")
            for key, gone in (("heads_removed", head_gone), ("channels_removed", chan_gone)):
                if key in rec and rec[key] != int(gone[k]):
                    raise self.fail(f"{where}.{key}", f"is {rec[key]}, but the step's mask removed {int(gone[k])}")
