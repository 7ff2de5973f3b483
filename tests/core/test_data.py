"""Text sources: packaged corpora, calibration/eval disjointness, seeded windows."""

import torch
from tests.conftest import CharTokenizer

from gisp.core.data import consecutive_windows, random_windows, read_documents, token_stream


def test_packaged_corpora_split_disjoint():
    for name in ("c4", "wiki"):
        calib, ev = read_documents(name, "calib"), read_documents(name, "eval")
        assert len(calib) > 100 and len(ev) > 20
        assert not set(calib) & set(ev)
        assert not any("<doc" in d for d in calib[:50])


def test_windows_are_seeded_and_in_range():
    stream = torch.arange(1000)
    a, b = random_windows(stream, 5, 16, seed=3), random_windows(stream, 5, 16, seed=3)
    assert torch.equal(a, b) and a.shape == (5, 16)
    assert not torch.equal(a, random_windows(stream, 5, 16, seed=4))
    assert bool(((a[:, 1:] - a[:, :-1]) == 1).all())  # contiguous slices
    w = consecutive_windows(stream, 100, 4)
    assert w.shape == (4, 100) and int(w[1, 0]) == 100


def test_jsonl_and_txt_sources(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(f'{{"text": "document number {i}"}}' for i in range(10)))
    assert read_documents(str(f), "calib") == [f"document number {i}" for i in range(8)]
    ids, src = token_stream(str(f), "eval", CharTokenizer())
    assert src.documents == 2 and src.part == "eval" and ids.numel() == src.tokens


def test_binary_files_are_one_line(tmp_path):
    """A binary --calib file (any suffix) used to end in a UnicodeDecodeError traceback."""
    import pytest

    from gisp.core.calibration import build_calibration
    from gisp.errors import GispError

    binary = bytes(range(256)) * 8
    for name in ("model.bin", "data.txt", "data.jsonl"):
        f = tmp_path / name
        f.write_bytes(binary)
        with pytest.raises(GispError, match=f"{name} is not UTF-8 text"):
            build_calibration("lm", str(f), CharTokenizer(), 2, 8, 0)
    zeros = tmp_path / "zeros.txt"  # valid UTF-8, but not text
    zeros.write_bytes(b"\0" * 4096)
    with pytest.raises(GispError, match="NUL bytes"):
        read_documents(str(zeros), "calib")
    with pytest.raises(GispError, match="is a directory"):
        read_documents(str(tmp_path), "calib")


def test_invalid_json_lines_say_so(tmp_path):
    """A line that is not JSON used to be reported as a missing 'text' field."""
    import pytest

    from gisp.errors import GispError

    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "fine"}\n\n{"text": "broken\n{"other": 1}\n')
    with pytest.raises(GispError, match=r"d.jsonl:3: line 3 is not valid JSON \(Unterminated string"):
        read_documents(str(f), "calib")
    f.write_text('{"text": "fine"}\n{"other": 1}\n[1, 2]\n')
    with pytest.raises(GispError, match=r"d.jsonl:2: expected a JSON object with a 'text' field"):
        read_documents(str(f), "calib")
    f.write_text('{"text": "fine"}\n[1, 2]\n')
    with pytest.raises(GispError, match=r"d.jsonl:2: expected a JSON object"):
        read_documents(str(f), "calib")
    f.write_text('{"text": "fine"}\n{"text": null}\n')  # used to become the document "None"
    with pytest.raises(GispError, match=r"d.jsonl:2: the 'text' field must be a string, got NoneType \(null\)"):
        read_documents(str(f), "calib")


def test_a_changed_file_is_read_again(tmp_path):
    """The token cache used to return a file's old tokens after it changed in the same process."""
    import os

    f, tok = tmp_path / "d.txt", CharTokenizer()
    f.write_text("\n\n".join(f"first version {i}" for i in range(10)))
    old, _ = token_stream(str(f), "calib", tok)
    f.write_text("\n\n".join(f"second version {i}" for i in range(10)))
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))  # coarse clocks: surely newer
    new, _ = token_stream(str(f), "calib", tok)
    assert not torch.equal(old, new)
