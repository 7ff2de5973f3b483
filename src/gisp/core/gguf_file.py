"""A GGUF file's header, read without loading the file: its architecture and whether it is complete.

Loading a GGUF through transformers dequantises every tensor first (a minute and gigabytes for a 0.5B
model) and only then says the architecture is unusable, or fails deep inside on a truncated file. This
reads the key-value header and the tensor table (a few hundred kilobytes, no tensor data) so a wrong or
incomplete file is refused in well under a second. ``gguf.GGUFReader`` parses every vocabulary string
into its own array (seconds for a large vocabulary), hence this small reader of the documented format
(https://github.com/ggml-org/ggml/blob/master/docs/gguf.md).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from gisp.errors import GispError

_MAGIC = b"GGUF"
# value type -> struct code of its fixed-size scalar (STRING = 8 and ARRAY = 9 are variable-size)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_DEFAULT_ALIGNMENT = 32
# GGUF architecture -> transformers model type, where they differ (transformers' GGUF loader renames these)
_MODEL_TYPES = {"gemma3": "gemma3_text", "gemma4": "gemma4_text", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe",
                "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}


@dataclass(frozen=True)
class GGUFHeader:
    """What a GGUF file says about itself before any tensor is read."""

    architecture: str
    name: str | None
    tensors: int
    data_end: int  # the byte where the last tensor ends: the file must be at least this long

    @property
    def model_type(self) -> str:
        """The transformers ``model_type`` this file loads as."""
        return _MODEL_TYPES.get(self.architecture, self.architecture)


class _Cursor:
    def __init__(self, buf: mmap.mmap | bytes, endian: str) -> None:
        self.buf, self.pos, self.endian = buf, 0, endian

    def read(self, code: str) -> int | float | bool:
        fmt = self.endian + code
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> bytes:
        n = int(self.read("Q"))
        if self.pos + n > len(self.buf):
            raise struct.error("string runs past the end of the file")
        s = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return s

    def value(self, vtype: int) -> object:
        """One value; arrays are skipped (``None``), fixed-size ones without reading their elements."""
        if vtype in _SCALARS:
            return self.read(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            raise ValueError(f"unknown value type {vtype}")
        etype, count = int(self.read("I")), int(self.read("Q"))
        if etype in _SCALARS:
            self.pos += count * struct.calcsize(_SCALARS[etype])
            if self.pos > len(self.buf):
                raise struct.error("array runs past the end of the file")
        else:
            for _ in range(count):
                self.value(etype)
        return None


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """The header of the GGUF file ``path``; one line if it is empty, truncated or not a GGUF file.

    Completeness is checked against the tensor table: every tensor's data must lie inside the file.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    fix = "copy or download it again"
    try:
        size = path.stat().st_size
    except OSError as e:
        raise GispError(f"cannot read GGUF file {path} ({e.strerror or type(e).__name__})") from e
    if size == 0:
        raise GispError(f"{path} is empty, not a GGUF model: {fix}")
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != _MAGIC:
            raise GispError(f"{path} is not a GGUF file (it does not start with 'GGUF'): give a .gguf model file")
        try:
            # a big-endian file reads as an absurd version little-endian (gguf.GGUFReader's rule)
            endian = "<" if struct.unpack_from("<I", buf, 4)[0] & 0xFFFF else ">"
            cur = _Cursor(buf, endian)
            cur.pos = 4
            version = int(cur.read("I"))
            if version < 2:
                raise GispError(f"{path} is GGUF version {version}, which is no longer read: convert it again "
                                "with a current llama.cpp")
            n_tensors, n_kv = int(cur.read("Q")), int(cur.read("Q"))
            fields: dict[str, object] = {}
            for _ in range(n_kv):
                key = cur.string().decode("utf-8", "replace")
                value = cur.value(int(cur.read("I")))
                if key in ("general.architecture", "general.name", "general.alignment"):
                    fields[key] = value
            end = 0
            tensors = []
            for _ in range(n_tensors):
                cur.string()
                dims = [int(cur.read("Q")) for _ in range(int(cur.read("I")))]
                qtype, offset = int(cur.read("I")), int(cur.read("Q"))
                tensors.append((dims, qtype, offset))
            alignment = int(fields.get("general.alignment") or _DEFAULT_ALIGNMENT)
            data_start = -(-cur.pos // alignment) * alignment
            for dims, qtype, offset in tensors:
                try:
                    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
                except (ValueError, KeyError) as e:
                    raise GispError(f"{path} holds tensors of an unknown type ({qtype}): it needs a newer gguf "
                                    "package, or the file is damaged") from e
                n = 1
                for d in dims:
                    n *= d
                end = max(end, data_start + offset + n // block * type_size)
        except (struct.error, ValueError, OverflowError, MemoryError) as e:
            raise GispError(f"{path} is truncated or damaged (its header ends early or is malformed): {fix}") from e
    arch = fields.get("general.architecture")
    if not isinstance(arch, bytes):
        raise GispError(f"{path} does not say its architecture (no general.architecture): not a model file")
    if end > size:
        raise GispError(f"{path} is truncated ({size:,} of {end:,} bytes): {fix}")
    name = fields.get("general.name")
    return GGUFHeader(arch.decode("utf-8", "replace"), name.decode("utf-8", "replace") if isinstance(name, bytes)
                      else None, n_tensors, end)
