"""Task-aligned objectives: ``margin`` for multiple choice, ``answer`` for generation.

``margin`` (paper, MC tasks): for one question with all its options,
``L = CE(correct option) - mean over wrong options of CE(option)``, where each
option's CE is the mean next-token cross-entropy of its answer tokens (prompt
masked). Its gradient asks which structures separate right from wrong answers,
not which model text in general.

``answer`` (paper, GSM8K): mean cross-entropy of the response tokens given the
prompt, prompt masked.

Both compute the vocabulary projection only at answer positions (the prompt's
logits are never needed), which saves most of the logits' memory and time.

Calibration builders (``gisp.build_calibration``):

- ``margin``, source ``cmqa``: the paper's mixture of BoolQ, PIQA, HellaSwag,
  WinoGrande, ARC-e, ARC-c and OBQA with lm-eval prompts. The budget is
  ``samples * seq_len`` tokens, split equally among the seven tasks; each task
  contributes whole questions (every option included) in a seeded order from
  the *calibration part* of its split until its share is spent (the last
  question is kept if that lands closer to the share; at least one question).
  Each option sequence is capped at ``seq_len`` tokens by cutting the prompt
  from the left. A single task name or a user MC ``.jsonl`` works the same
  with the whole budget.
- ``answer``, source ``gsm8k`` (question/solution pairs from the calibration
  part of GSM8K's split) or a ``.jsonl`` of ``{prompt, response}``: ``samples``
  pairs in a seeded order (all of them if fewer), each capped at ``seq_len``
  tokens (prompt cut from the left).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gisp.core.calibration import CalibrationSet, register_calibration
from gisp.core.objectives import Objective, register_objective
from gisp.errors import GispError
from gisp.tasks import gsm8k
from gisp.tasks.evaluate import LM_EVAL_CONVENTION, TASKS, resolve_task
from gisp.tasks.loaders import DEFAULT_SPLIT_SEED, load_prompt_response, load_task_data, split_task
from gisp.tasks.scoring import decoder_and_head, encode_pair

CMQA = "cmqa"


@dataclass(frozen=True)
class TokenSeq:
    """Token ids of prompt + answer; the first ``prompt_len`` are masked out of the loss."""

    ids: tuple[int, ...]
    prompt_len: int


@dataclass(frozen=True)
class MarginSample:
    """One question: every option as a sequence, and which is correct."""

    options: tuple[TokenSeq, ...]
    gold: int


def _fit(ctx: list[int], cont: list[int], seq_len: int) -> TokenSeq:
    """Cap prompt + answer at ``seq_len`` tokens, cutting the prompt from the left (one token kept)."""
    if len(ctx) + len(cont) > seq_len:
        cont = cont[: max(1, seq_len - 1)]
        ctx = ctx[-max(1, seq_len - len(cont)):]
    return TokenSeq(tuple(ctx + cont), len(ctx))


def _rows(seqs: list[TokenSeq]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s.ids) for s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for r, s in enumerate(seqs):
        t = torch.tensor(s.ids, dtype=torch.long)
        ids[r, : len(t)] = t
        labels[r, s.prompt_len : len(t)] = t[s.prompt_len :]
    return ids, labels


def answer_token_ce(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each row's labelled tokens (``-100`` = masked); logits only where needed.

    Right padding needs no attention mask: a causal model never looks ahead.
    """
    decoder, head = decoder_and_head(model)
    hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state
    target = labels[:, 1:]
    sel = target != -100
    logits = head(hidden[:, :-1][sel]).float()
    nll = F.cross_entropy(logits, target[sel], reduction="none")
    row = torch.arange(len(labels), device=labels.device)[:, None].expand_as(target)[sel]
    total = torch.zeros(len(labels), device=nll.device, dtype=nll.dtype).index_add(0, row, nll)
    count = sel.sum(dim=1).clamp(min=1).to(nll.dtype)
    return total / count


class Margin(Objective):
    """CE of the correct option minus the mean CE of the wrong ones, answer tokens only."""

    name = "margin"

    def collate(self, samples: list[MarginSample]) -> dict[str, torch.Tensor]:
        seqs, owner, correct = [], [], []
        for s_idx, s in enumerate(samples):
            for o_idx, opt in enumerate(s.options):
                seqs.append(opt)
                owner.append(s_idx)
                correct.append(o_idx == s.gold)
        ids, labels = _rows(seqs)
        return {"input_ids": ids, "labels": labels, "owner": torch.tensor(owner),
                "correct": torch.tensor(correct, dtype=torch.bool)}

    def sample_losses(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ce = answer_token_ce(model, batch["input_ids"], batch["labels"])
        owner, correct = batch["owner"], batch["correct"]
        n = int(owner.max()) + 1
        wrong = ~correct

        def mean_of(which: torch.Tensor) -> torch.Tensor:
            s = torch.zeros(n, device=ce.device, dtype=ce.dtype).index_add(0, owner[which], ce[which])
            c = torch.zeros(n, device=ce.device, dtype=ce.dtype).index_add(0, owner[which], torch.ones_like(ce[which]))
            return s / c.clamp(min=1)

        return mean_of(correct) - mean_of(wrong)


class Answer(Objective):
    """Cross-entropy of the response tokens given the prompt."""

    name = "answer"

    def collate(self, samples: list[TokenSeq]) -> dict[str, torch.Tensor]:
        ids, labels = _rows(list(samples))
        return {"input_ids": ids, "labels": labels}

    def sample_losses(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return answer_token_ce(model, batch["input_ids"], batch["labels"])


register_objective(Margin)
register_objective(Answer)


def _check(samples: int, seq_len: int) -> None:
    if samples < 1:
        raise GispError(f"calibration needs at least one sample, got {samples}")
    if seq_len < 2:
        raise GispError(f"--seq-len must be at least 2 tokens, got {seq_len}")


def _seeded(indices: tuple[int, ...] | list[int], key: str, seed: int) -> list[int]:
    order = list(indices)
    random.Random(f"gisp-calib:{key}:{seed}").shuffle(order)
    return order


@register_calibration("margin")
def margin_calibration(source: str, tokenizer, samples: int, seq_len: int, seed: int) -> CalibrationSet:
    """Whole questions from the calibration part of each task, an equal token budget per task."""
    _check(samples, seq_len)
    names = list(TASKS) if source == CMQA else [source]
    budget = samples * seq_len
    share = budget // len(names)
    out: list[MarginSample] = []
    per_task: dict[str, Any] = {}
    for name in names:
        spec, data = resolve_task(name)
        if spec is None:
            raise GispError(f"the margin objective needs multiple-choice data ({CMQA}, one of {', '.join(TASKS)} "
                            f"or a .jsonl of {{context, choices, answer}}), not '{name}'")
        split = split_task(data.name, len(data), DEFAULT_SPLIT_SEED)
        if not split.calib:
            raise GispError(f"task '{name}' has too few items ({len(data)}) to reserve any for calibration")
        used, tokens, seqs = [], 0, 0
        for i in _seeded(split.calib, data.name, seed):
            item = spec.to_item(data.docs[i])
            opts = tuple(_fit(*encode_pair(tokenizer, c, k), seq_len) for c, k in item.requests)
            n = sum(len(o.ids) for o in opts)
            over = tokens + n > share
            if used and over and tokens + n - share >= share - tokens:
                break  # stopping here is closer to the share than taking this question
            out.append(MarginSample(opts, item.gold))
            used.append(i)
            tokens += n
            seqs += len(opts)
            if over:
                break
        per_task[name] = {"questions": len(used), "sequences": seqs,
                          "tokens": tokens, "exhausted": len(used) == len(split.calib),
                          "split": split.record("calib", used, data.source)}
    out.sort(key=lambda s: max(len(o.ids) for o in s.options))  # less padding; the mean gradient is order-free
    prov = {
        "objective": "margin", "source": source, "samples": len(out), "budget_tokens": budget,
        "per_task_budget_tokens": share, "seq_len": seq_len, "seed": seed, "split_seed": DEFAULT_SPLIT_SEED,
        "prompt": LM_EVAL_CONVENTION, "tasks": per_task,
        "sampling": "samples*seq_len tokens split equally among tasks; whole questions with every option, in a "
                    "seeded order from each task's calibration part, until the share is reached (closest total); "
                    "options capped at seq_len (prompt cut left)",
        "loss": "per question: mean CE of the correct option's answer tokens - mean over wrong options of theirs",
    }
    return CalibrationSet(out, prov)


@register_calibration("answer")
def answer_calibration(source: str, tokenizer, samples: int, seq_len: int, seed: int) -> CalibrationSet:
    """Prompt/response pairs: GSM8K's calibration part or a user's JSONL."""
    _check(samples, seq_len)
    prov: dict[str, Any] = {"objective": "answer", "source": source, "seq_len": seq_len, "seed": seed,
                            "samples_requested": samples}
    if source == "gsm8k":
        data = load_task_data("gsm8k")
        split = split_task(data.name, len(data), DEFAULT_SPLIT_SEED)
        chosen = _seeded(split.calib, data.name, seed)[:samples]
        pairs = [(gsm8k.question_prompt(data.docs[i]["question"]), " " + gsm8k.gold_solution(data.docs[i]["answer"]))
                 for i in chosen]
        prov.update(split=split.record("calib", chosen, data.source), split_seed=DEFAULT_SPLIT_SEED,
                    format="Question: {question}\\nAnswer: -> ' {gold solution}' (see gisp.tasks.gsm8k)")
    elif source.endswith(".jsonl") or Path(source).is_file():
        rows = load_prompt_response(source)
        chosen = _seeded(range(len(rows)), Path(source).name, seed)[:samples]
        pairs = [(rows[i]["prompt"], rows[i]["response"]) for i in chosen]
        prov.update(file=str(source), pairs_in_file=len(rows))
    else:
        raise GispError(f"unknown calibration source '{source}' for the answer objective: use gsm8k or a .jsonl "
                        "of {prompt, response}")
    seqs = [_fit(*encode_pair(tokenizer, p, r), seq_len) for p, r in pairs]
    prov.update(samples=len(seqs), tokens=sum(len(s.ids) for s in seqs),
                answer_tokens=sum(len(s.ids) - s.prompt_len for s in seqs),
                loss="mean CE of the response tokens, prompt masked")
    seqs.sort(key=lambda s: len(s.ids))
    return CalibrationSet(seqs, prov)
