"""The margin and answer objectives and their calibration builders."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import tiny_model

import gisp
from gisp.core.objectives import get_objective
from gisp.errors import GispError
from gisp.tasks import TASKS, load_task_data, split_task
from gisp.tasks.objectives import MarginSample, TokenSeq


def option_ce(model, ids: list[int], prompt_len: int) -> float:
    """Mean CE of the answer tokens, the long way: full logits of the whole sequence."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    nll = F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")
    return float(nll[prompt_len - 1 :].mean())


def test_margin_equals_hand_computed_value():
    model = tiny_model("llama", kv_heads=2)
    q1 = MarginSample((TokenSeq((5, 6, 7, 8, 9), 3), TokenSeq((5, 6, 7, 10), 3), TokenSeq((5, 6, 7, 11, 12, 13), 3)), 1)
    q2 = MarginSample((TokenSeq((20, 21, 22), 2), TokenSeq((20, 21, 23, 24), 2)), 0)
    obj = get_objective("margin")
    with torch.no_grad():
        got = obj.sample_losses(model, obj.collate([q1, q2]))

    def expected(q: MarginSample) -> float:
        ces = [option_ce(model, list(o.ids), o.prompt_len) for o in q.options]
        wrong = [c for j, c in enumerate(ces) if j != q.gold]
        return ces[q.gold] - sum(wrong) / len(wrong)

    assert got.shape == (2,)
    assert got[0].item() == pytest.approx(expected(q1), abs=1e-5)
    assert got[1].item() == pytest.approx(expected(q2), abs=1e-5)


def test_answer_objective_masks_the_prompt():
    model = tiny_model("qwen2", kv_heads=2)
    obj = get_objective("answer")
    a = TokenSeq((3, 4, 5, 6, 7, 8), 4)
    b = TokenSeq((50, 60, 70, 6, 7), 3)  # different prompt and length, padded in the batch
    batch = obj.collate([a, b])
    assert (batch["labels"][0, :4] == -100).all() and (batch["labels"][1, :3] == -100).all()
    assert (batch["labels"][1, 5:] == -100).all()  # padding
    with torch.no_grad():
        got = obj.sample_losses(model, batch)
    assert got[0].item() == pytest.approx(option_ce(model, list(a.ids), 4), abs=1e-5)
    assert got[1].item() == pytest.approx(option_ce(model, list(b.ids), 3), abs=1e-5)
    full = option_ce(model, list(a.ids), 1)  # every token but the first
    assert abs(full - got[0].item()) > 1e-3


def test_margin_gradient_flows_to_prunable_weights():
    model = tiny_model("llama", kv_heads=4)
    obj = get_objective("margin")
    q = MarginSample((TokenSeq((1, 2, 3), 2), TokenSeq((1, 2, 4, 5), 2)), 0)
    obj.sample_losses(model, obj.collate([q])).sum().backward()
    assert model.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0


def test_cmqa_calibration_budget_options_and_disjoint_split(smol_tokenizer):
    calib = gisp.build_calibration("margin", "cmqa", smol_tokenizer, 14, 96, 0)
    prov = calib.provenance
    assert set(prov["tasks"]) == set(TASKS)
    assert prov["budget_tokens"] == 14 * 96 and prov["per_task_budget_tokens"] == 14 * 96 // 7
    assert sum(t["questions"] for t in prov["tasks"].values()) == len(calib)
    for t in prov["tasks"].values():
        assert t["questions"] >= 1
        assert t["tokens"] <= 2 * prov["per_task_budget_tokens"] or t["questions"] == 1
        assert t["split"]["part"] == "calib" and t["split"]["split_seed"] == 0
    for s in calib.samples:
        assert len(s.options) >= 2 and 0 <= s.gold < len(s.options)
        assert all(len(o.ids) <= 96 and o.prompt_len < len(o.ids) for o in s.options)
    again = gisp.build_calibration("margin", "cmqa", smol_tokenizer, 14, 96, 0)
    assert again.samples == calib.samples and again.provenance == prov
    other = gisp.build_calibration("margin", "cmqa", smol_tokenizer, 14, 96, 1)
    assert other.samples != calib.samples


def test_margin_calibration_items_come_from_the_calibration_part(smol_tokenizer, monkeypatch):
    """Every question drawn is in the calibration part, never in the held-out part."""
    from gisp.tasks import objectives

    drawn: list[int] = []
    real = objectives._seeded

    def spy(indices, key, seed):
        order = real(indices, key, seed)
        drawn.extend(order)
        return order

    monkeypatch.setattr(objectives, "_seeded", spy)
    gisp.build_calibration("margin", "arc_challenge", smol_tokenizer, 4, 64, 0)
    split = split_task("arc_challenge", len(load_task_data("arc_challenge")))
    assert drawn and set(drawn) <= set(split.calib) and not set(drawn) & set(split.held_out)


def test_answer_calibration_from_gsm8k(smol_tokenizer):
    calib = gisp.build_calibration("answer", "gsm8k", smol_tokenizer, 6, 256, 3)
    assert len(calib) == 6
    prov = calib.provenance
    assert prov["split"]["part"] == "calib" and prov["split"]["items_used"] == 6
    text = smol_tokenizer.decode(list(calib.samples[0].ids))
    assert text.startswith("Question: ") and "\nAnswer: " in text and "So the answer is" in text
    for s in calib.samples:
        response = smol_tokenizer.decode(list(s.ids[s.prompt_len :]))
        assert "Question:" not in response and response.startswith(" ")


def test_answer_calibration_from_user_jsonl(tmp_path, smol_tokenizer):
    f = tmp_path / "pairs.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": f"Q{i}: 2+{i}=", "response": f" {2 + i}"}) for i in range(5)))
    calib = gisp.build_calibration("answer", str(f), smol_tokenizer, 10, 32, 0)
    assert len(calib) == 5 and calib.provenance["samples_requested"] == 10
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(GispError, match="bad.jsonl:1"):
        gisp.build_calibration("answer", str(bad), smol_tokenizer, 2, 32, 0)
    with pytest.raises(GispError, match="answer objective"):
        gisp.build_calibration("answer", "piqa", smol_tokenizer, 2, 32, 0)
    with pytest.raises(GispError, match="multiple-choice"):
        gisp.build_calibration("margin", "gsm8k", smol_tokenizer, 2, 32, 0)


def test_prune_with_margin_records_the_split(smol_tokenizer):
    model = tiny_model("llama", kv_heads=2, layers=4, vocab=len(smol_tokenizer))
    calib = gisp.build_calibration("margin", "cmqa", smol_tokenizer, 7, 64, 0)
    cfg = gisp.PruneConfig(target=0.3, steps=2, objective="margin", calib="cmqa", calib_samples=7, seq_len=64,
                           batch_size=4, protect_first=0.25)
    traj = gisp.prune(model, cfg, calib, progress=False)
    assert traj.completed and traj.steps[-1]["sparsity"] > 0.2
    assert traj.calibration["tasks"]["piqa"]["split"]["part"] == "calib"
    assert all(s["calib_loss"] is not None for s in traj.steps)


def test_prune_with_answer_objective(smol_tokenizer):
    model = tiny_model("mistral", kv_heads=2, layers=4, vocab=len(smol_tokenizer))
    calib = gisp.build_calibration("answer", "gsm8k", smol_tokenizer, 4, 96, 0)
    cfg = gisp.PruneConfig(target=0.3, steps=2, objective="answer", calib="gsm8k", calib_samples=4, seq_len=96,
                           batch_size=2, protect_first=0.25)
    traj = gisp.prune(model, cfg, calib, progress=False)
    assert traj.completed and traj.calibration["objective"] == "answer"
