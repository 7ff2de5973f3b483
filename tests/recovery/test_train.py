"""Recovery training: same shapes and files out, a lower loss, exact resumption, one-line refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import gisp
from gisp.architectures import get_architecture
from gisp.recovery.checkpoint import checkpoint_path, read_state
from gisp.recovery.data import TrainingText
from gisp.recovery.loss import chunked_loss
from gisp.recovery.train import lr_at

FAST = dict(seq_len=16, batch_size=4, lr=5e-3, warmup=0.0, checkpoint_every=2)


def config(text_file: Path, steps: int, **kw) -> gisp.RecoverConfig:
    return gisp.RecoverConfig(tokens=steps * 4 * 16, data=str(text_file), **{**FAST, **kw})


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("kind", ["perlayer", "plain"])
def test_recovery_keeps_every_shape_the_config_and_the_files(kind, exports, text_file, tmp_path):
    src, out = exports[kind], tmp_path / "rec"
    (out / ".checkpoint.tmp1").mkdir(parents=True)  # left by a kill while the first checkpoint was written
    res = gisp.recover(src, out, config(text_file, 3, teacher_from_run=kind == "perlayer"), resume=True,
                       progress=False)
    before, after = weights(src), weights(out)
    assert {k: (v.shape, v.dtype) for k, v in before.items()} == {k: (v.shape, v.dtype) for k, v in after.items()}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    targets = tuple(f"{m}.weight" for m in get_architecture(gisp.load_model(str(src)).model).projection_modules())
    assert changed == {k for k in before if k.endswith(targets)}  # adapters merged into every projection, only
    names = {p.name for p in src.iterdir()}
    assert {p.name for p in out.iterdir()} == names  # no checkpoint left, nothing missing
    for name in names - {"model.safetensors", "gisp_export.json"}:
        assert (out / name).read_bytes() == (src / name).read_bytes(), name  # config, tokenizer: byte for byte
    rec_in, rec_out = (json.loads((d / "gisp_export.json").read_text()) for d in (src, out))
    r = rec_out.pop("recovery")
    assert rec_out == rec_in
    assert r["method"] == ("lora-kd" if kind == "perlayer" else "lora") and r["steps"] == res.steps == 3
    assert r["tokens_trained"] == 3 * 64 and r["source"]["part"] == "calib" and r["source"]["name"] == str(text_file)
    assert r["rank"] == 8 and r["seed"] == 0 and r["lr"] == 5e-3 and r["versions"]["peft"]
    assert r["final_losses"]["last_step"]["total"] > 0 and r["train_seconds"] > 0
    assert r["teacher"] is None if kind == "plain" else r["teacher"]["path"] == str(exports["dense"])
    loaded = gisp.load_pretrained(out, device="cpu")  # loads exactly as the input did
    assert loaded.model.config.model_type == ("gisp_llama" if kind == "perlayer" else "llama")


def _training_loss(path: Path, text: TrainingText, teacher: Path | None) -> float:
    """Mean loss over every training window (LM, or KD against ``teacher``)."""
    m = gisp.load_pretrained(path, device="cpu", tokenizer=False).model
    t = None if teacher is None else gisp.load_model(str(teacher), device="cpu").model
    arch = get_architecture(m)
    ids = text.windows
    with torch.no_grad():
        h = arch.final_hidden(m, ids[:, :-1])
        th = None if t is None else arch.final_hidden(t, ids[:, :-1])
        loss = chunked_loss(h, ids[:, 1:], lambda x: arch.logits(m, x), teacher_hidden=th,
                            teacher_head=None if t is None else (lambda x: arch.logits(t, x)),
                            lm_weight=1.0 if t is None else 0.0, backward=False)
    return loss.total


@pytest.mark.parametrize("distill,lr", [(False, 2e-2), (True, 5e-3)])
def test_loss_decreases_on_the_training_data(distill, lr, exports, text_file, tokenizer, tmp_path):
    src, out = exports["perlayer"], tmp_path / "rec"
    gisp.recover(src, out, config(text_file, 12, teacher_from_run=distill, lr=lr), progress=False)
    text = TrainingText.build(str(text_file), tokenizer, 16, 0)
    teacher = exports["dense"] if distill else None
    before, after = _training_loss(src, text, teacher), _training_loss(out, text, teacher)
    assert after < 0.98 * before, (before, after)


def test_resume_after_a_stop_ends_at_the_same_weights(exports, text_file, tmp_path):
    cfg = config(text_file, 7, teacher_from_run=True, dropout=0.1)
    gisp.recover(exports["perlayer"], tmp_path / "whole", cfg, progress=False)
    part = tmp_path / "part"
    gisp.recover(exports["perlayer"], part, cfg, progress=False, stop_after=5)  # checkpoint at 4, step 5 lost
    assert read_state(part)["step"] == 4 and not (part / "config.json").exists()
    with pytest.raises(gisp.GispError, match="--resume"):
        gisp.recover(exports["perlayer"], part, cfg, progress=False)
    with pytest.raises(gisp.GispError, match="different settings \\(lr\\)"):
        gisp.recover(exports["perlayer"], part, gisp.RecoverConfig(**{**cfg.to_dict(), "lr": 1e-3}), resume=True,
                     progress=False)
    res = gisp.recover(exports["perlayer"], part, cfg, resume=True, progress=False)
    a, b = weights(tmp_path / "whole"), weights(part)
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-equal
    rec_a, rec_b = (json.loads((d / "gisp_export.json").read_text())["recovery"] for d in (tmp_path / "whole", part))
    assert rec_a["history"] == rec_b["history"] and res.steps == 7
    assert [s["from_step"] for s in rec_b["sessions"]] == [0, 4]
    # a finished recovery resumes to itself
    assert gisp.recover(exports["perlayer"], part, cfg, resume=True, progress=False).steps == 7


def _cli(log: Path, *args: object) -> subprocess.Popen:
    """``gisp recover ARGS`` in a subprocess with one torch thread, its output in ``log`` (a pipe nobody reads
    would stall it once the progress bar filled it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "gisp", "recover", *map(str, args)], env=env,
                                stdout=f, stderr=subprocess.STDOUT)


def test_resume_after_kill_9_equals_an_uninterrupted_run(exports, text_file, tmp_path):
    steps = 40
    args = [exports["perlayer"], "--tokens", steps * 64, "--seq-len", 16, "--batch-size", 4, "--data", text_file,
            "--teacher-from-run", "--checkpoint-every", 2, "--lr", 1e-3, "--device", "cpu"]
    whole = _cli(tmp_path / "whole.log", *args, "--out", tmp_path / "whole")
    killed_out = tmp_path / "killed"
    victim = _cli(tmp_path / "victim.log", *args, "--out", killed_out)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and victim.poll() is None:
        state = read_state(killed_out) if checkpoint_path(killed_out).exists() else None
        if state and state["step"] >= 4:
            break
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed_out / "config.json").exists()
    killed_at = read_state(killed_out)["step"]
    resumed = _cli(tmp_path / "resumed.log", *args, "--out", killed_out, "--resume")
    assert resumed.wait(timeout=300) == 0, (tmp_path / "resumed.log").read_text()[-2000:]
    assert whole.wait(timeout=300) == 0, (tmp_path / "whole.log").read_text()[-2000:]
    a, b = weights(tmp_path / "whole"), weights(killed_out)
    assert all(torch.equal(a[k], b[k]) for k in a), f"resumed from step {killed_at} of {steps}: not bit-equal"
    rec = json.loads((killed_out / "gisp_export.json").read_text())["recovery"]
    assert [s["from_step"] for s in rec["sessions"]] == [0, killed_at] and 0 < killed_at < steps


def test_learning_rate_warms_up_then_decays_to_zero():
    lrs = [lr_at(s, 100, 1.0, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and 0 < lrs[-1] < 0.01


def test_the_data_order_is_a_function_of_the_step(text_file, tokenizer):
    text = TrainingText.build(str(text_file), tokenizer, 16, 3)
    n = len(text.windows)
    seen = torch.cat([text.batch(s, 4) for s in range(-(-n // 4))])[:n]
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, text.windows.tolist()))  # one pass: each once
    assert torch.equal(text.batch(7, 4), TrainingText.build(str(text_file), tokenizer, 16, 3).batch(7, 4))
    assert not torch.equal(text.batch(0, 4), TrainingText.build(str(text_file), tokenizer, 16, 4).batch(0, 4))
    assert text.position(5, 4) == {"step": 5, "epoch": 20 // n, "offset": 20 % n}


def test_bad_inputs_are_refused(exports, text_file, tokenizer, tmp_path):
    cfg = config(text_file, 2)
    with pytest.raises(gisp.GispError, match="is not a gisp export"):
        gisp.recover(tmp_path, tmp_path / "o", cfg, progress=False)
    with pytest.raises(gisp.GispError, match="is the export being recovered"):
        gisp.recover(exports["plain"], exports["plain"], cfg, progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(gisp.GispError, match="already exists and is not empty"):
        gisp.recover(exports["plain"], tmp_path / "full", cfg, progress=False)
    with pytest.raises(gisp.GispError, match="--tokens must be a positive"):
        gisp.RecoverConfig(tokens=0)
    with pytest.raises(gisp.GispError, match="not both"):
        gisp.RecoverConfig(tokens=10, teacher="x", teacher_from_run=True)
    # a teacher with another vocabulary
    from tests.conftest import tiny_model

    other = tmp_path / "other"
    tiny_model("llama", vocab=len(tokenizer) - 1).save_pretrained(other)
    tokenizer.save_pretrained(other)
    with pytest.raises(gisp.GispError, match="another tokenizer or vocabulary"):
        gisp.recover(exports["plain"], tmp_path / "o2", config(text_file, 2, teacher=str(other)), progress=False)


def test_teacher_from_run_must_be_the_model_the_export_was_cut_from(exports, text_file, tokenizer, tmp_path):
    import shutil

    from tests.conftest import tiny_model

    moved = tmp_path / "export"
    shutil.copytree(exports["plain"], moved)
    record = json.loads((moved / "gisp_export.json").read_text())
    record["source"]["path"] = str(tmp_path / "changed")
    (moved / "gisp_export.json").write_text(json.dumps(record))
    tiny_model("llama", layers=4, seed=1, vocab=len(tokenizer)).save_pretrained(tmp_path / "changed")
    tokenizer.save_pretrained(tmp_path / "changed")
    with pytest.raises(gisp.GispError, match="is not the model it was cut from"):
        gisp.recover(moved, tmp_path / "o", config(text_file, 2, teacher_from_run=True), progress=False)
