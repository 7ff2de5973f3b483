"""The GGUF header reader: architecture and completeness, without reading tensor data."""

from pathlib import Path

import gguf
import numpy as np
import pytest

from gisp.core.gguf_file import read_gguf_header
from gisp.errors import GispError


def write(path: Path, arch: str = "llama", name: str = "tiny", vocab: int = 50) -> Path:
    w = gguf.GGUFWriter(path, arch)
    w.add_name(name)
    w.add_block_count(1)
    w.add_token_list([f"t{i}" for i in range(vocab)])  # an array of strings before the tensor table
    w.add_tensor("token_embd.weight", np.ones((vocab, 8), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_reads_the_architecture_and_where_the_data_ends(tmp_path):
    f = write(tmp_path / "m.gguf")
    h = read_gguf_header(f)
    assert (h.architecture, h.name, h.tensors, h.model_type) == ("llama", "tiny", 2, "llama")
    assert h.data_end == f.stat().st_size  # the tensor table accounts for every byte of data
    assert read_gguf_header(write(tmp_path / "g.gguf", arch="gemma3")).model_type == "gemma3_text"


@pytest.mark.parametrize("keep,match", [
    (0, "is empty"), (3, "not a GGUF file"), (12, "truncated or damaged"), (200, "truncated or damaged"),
    (-100, r"truncated \("), (-1, r"truncated \("),
])
def test_an_incomplete_file_is_one_line(tmp_path, keep, match):
    data = write(tmp_path / "m.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])
    with pytest.raises(GispError, match=match) as e:
        read_gguf_header(cut)
    assert "\n" not in str(e.value)


def test_not_a_gguf_file(tmp_path):
    f = tmp_path / "notes.gguf"
    f.write_text("just some text that happens to end in .gguf")
    with pytest.raises(GispError, match="not a GGUF file"):
        read_gguf_header(f)
