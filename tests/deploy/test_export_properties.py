"""Property tests of export directories as commands read them: a damaged export is refused in one line or
gives exactly what the intact one gives, and is never changed.

A copy of one of the tiny run's exports (per-layer widths, or ``--uniform``: a plain llama checkpoint) is
damaged (safetensors deleted, truncated, its header altered, a tensor removed or of another shape;
config.json with a key deleted, a width changed, truncated; gisp_export.json or the tokenizer deleted) and
read by ``gisp eval`` and ``gisp export --format gguf|vllm``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tests.conftest import one_thread_fixture
from tests.properties import (
    World,
    budget,
    changed,
    digest,
    invoke,
    judge,
    leftovers,
    rule_violations,
    scratch,
)

COMMANDS = ("eval", "gguf", "vllm")


one_thread = one_thread_fixture("module")


def command(world: World, which: str, export: Path, tmp: Path) -> tuple[list[Any], Path]:
    if which == "eval":
        out = tmp / "eval.json"
        return ["eval", export, "--ppl", world.text, "--window", 16, "--max-windows", 2, "--device", "cpu",
                "--json", out], out
    if which == "gguf":
        return ["export", export, "--format", "gguf", "--out", tmp / "m.gguf"], tmp / "m.gguf"
    return ["export", export, "--format", "vllm", "--out", tmp / "vllm"], tmp / "vllm"


def result(which: str, out: Path) -> Any:
    """What a damage that exit 0 may not change: the perplexity, the weights written (names, shapes, bytes)."""
    if which == "eval":
        return round(json.loads(out.read_text())["rows"][0]["ppl"]["ppl"], 6)
    if which == "gguf":
        from gguf import GGUFReader

        return [(t.name, [int(x) for x in t.shape], hashlib.sha256(t.data.tobytes()).hexdigest())
                for t in GGUFReader(out).tensors]
    return hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()


def baseline(world: World, which: str, source: str) -> Any:
    key = ("export", which, source)
    if key not in world.baseline:
        with scratch(world) as tmp:
            args, out = command(world, which, getattr(world, source), tmp)
            o = invoke(*args)
            assert o.code == 0, o.stderr
            world.baseline[key] = result(which, out)
    return world.baseline[key]


# damage ------------------------------------------------------------------------------------------------------------


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, path, metadata={"format": "pt"})


@st.composite
def damage(draw, export: Path) -> tuple[str, Any, set[str]]:
    """(what, a function that damages a copy of the export, known-open tags)."""
    weights = "model.safetensors"
    kind = draw(st.sampled_from(["delete-weights", "truncate-weights", "header-bytes", "drop-tensor",
                                 "reshape-tensor", "config-key", "config-width", "config-text", "delete-record",
                                 "delete-tokenizer"]))
    size = (export / weights).stat().st_size
    (header_len,) = struct.unpack("<Q", (export / weights).read_bytes()[:8])
    if kind == "delete-weights":
        return kind, lambda d: (d / weights).unlink(), {"export-files"}
    if kind == "truncate-weights":
        n = draw(st.integers(0, size - 1))
        return f"{kind} to {n} bytes", lambda d: (d / weights).write_bytes((d / weights).read_bytes()[:n]), {
            "export-files"}
    if kind == "header-bytes":
        at = draw(st.integers(0, 8 + header_len - 1))
        byte = draw(st.integers(0, 255))

        def flip(d: Path) -> None:
            data = bytearray((d / weights).read_bytes())
            data[at] = byte if data[at] != byte else (byte + 1) % 256
            (d / weights).write_bytes(bytes(data))

        return f"{kind} [{at}] = {byte}", flip, {"export-files"}
    if kind in ("drop-tensor", "reshape-tensor"):
        names = sorted(_tensors(export / weights))
        name = draw(st.sampled_from(names))

        def edit(d: Path) -> None:
            t = _tensors(d / weights)
            if kind == "drop-tensor":
                del t[name]
            else:
                t[name] = t[name].flatten()[:-1].clone() if t[name].numel() > 1 else torch.zeros(2)
            _save(t, d / weights)

        return f"{kind} {name}", edit, {"export-files"}
    cfg = json.loads((export / "config.json").read_text())
    plain = set() if cfg.get("model_type", "").startswith("gisp_") else {"export-files"}  # weights vs config
    if kind == "config-key":
        key = draw(st.sampled_from(sorted(cfg)))

        def drop(d: Path) -> None:
            c = json.loads((d / "config.json").read_text())
            del c[key]
            (d / "config.json").write_text(json.dumps(c))

        return f"{kind} {key}", drop, plain
    if kind == "config-width":
        key = draw(st.sampled_from(sorted(k for k, v in cfg.items() if isinstance(v, (int, list))
                                          and not isinstance(v, bool))))
        value = draw(st.sampled_from([0, -1, 3, 10**6, "x", None]))

        def widen(d: Path) -> None:
            c = json.loads((d / "config.json").read_text())
            c[key] = value if not isinstance(c[key], list) or not c[key] else [value] + c[key][1:]
            (d / "config.json").write_text(json.dumps(c))

        return f"{kind} {key} = {value!r}", widen, plain
    if kind == "config-text":
        cut = draw(st.integers(0, len(json.dumps(cfg)) - 1))

        def cut_text(d: Path) -> None:
            (d / "config.json").write_text((d / "config.json").read_text()[:cut])

        return f"{kind} cut at {cut}", cut_text, set()
    name = "gisp_export.json" if kind == "delete-record" else "tokenizer.json"
    return kind, lambda d: (d / name).unlink(), set()


@budget(14)
@given(data=st.data(), which=st.sampled_from(COMMANDS), source=st.sampled_from(["export", "plain"]))
def test_damaged_export(world, data, which, source):
    """A damaged export directory: exit 2 in one line, or the intact export's result; the directory unchanged."""
    what, apply, tags = data.draw(damage(getattr(world, source)), label="damage")
    with scratch(world) as tmp:
        export = tmp / "export"
        shutil.copytree(getattr(world, source), export)
        apply(export)
        args, out = command(world, which, export, tmp)
        before = digest(export)
        o = invoke(*args)
        problems = rule_violations(o, expect_error=None) + changed(before) + leftovers(tmp)
        if o.code != 0 and out.exists():
            problems.append(f"failed but wrote {out.name}")
        elif o.code == 0 and not problems and result(which, out) != baseline(world, which, source):
            problems.append(f"exit 0 with a result that differs from the intact export's ({what})")
        o.args.append(f"# {source}: {what}")
        judge(f"damaged export ({which})", o, problems, tags)


@pytest.mark.parametrize("head_dim", [0, -1])
def test_impossible_config_width_is_one_line(world, head_dim):
    """A per-layer export whose config.json gives a width no model can have: exit 2, one line (was a traceback)."""
    with scratch(world) as tmp:
        export = tmp / "export"
        shutil.copytree(world.export, export)
        cfg = json.loads((export / "config.json").read_text())
        cfg["head_dim"] = head_dim
        (export / "config.json").write_text(json.dumps(cfg))
        o = invoke("eval", export, "--ppl", world.text, "--window", 16, "--max-windows", 2, "--device", "cpu")
    assert o.code == 2 and not rule_violations(o, expect_error=True), o.stderr
    assert "can be built" in o.error_line
