"""Prompts, answer choices and metrics of lm-eval-harness 0.4, written out per task.

Each function turns one document (hub schema) into an :class:`MCItem`: one
``(context, continuation)`` request per answer option, as lm-eval's task
configs build them zero-shot (``target_delimiter`` is a space). Normal tasks
share one context and put each choice in the continuation; WinoGrande uses
partial scoring (the blank filled with each option is the context, the rest of
the sentence the shared continuation). ``tests/tasks/test_lm_eval_agreement.py``
checks every request against lm-eval's own task objects.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

DELIMITER = " "


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question, ready to score."""

    requests: tuple[tuple[str, str], ...]
    """(context, continuation) per option, in option order."""
    gold: int
    choices: tuple[str, ...]
    """lm-eval's ``doc_to_choice``; ``len(choice)`` is acc_norm's divisor."""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    to_item: Callable[[dict[str, Any]], MCItem]
    metrics: tuple[str, ...]
    headline: str
    prompt: str  # documentation of the template, saved with results


def _shared(context: str, choices: list[str], gold: int) -> MCItem:
    return MCItem(tuple((context, DELIMITER + c) for c in choices), gold, tuple(choices))


def boolq(doc: dict[str, Any]) -> MCItem:
    return _shared(f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", ["no", "yes"], int(doc["label"]))


def piqa(doc: dict[str, Any]) -> MCItem:
    return _shared(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"]))


def hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag text clean-up (WikiHow ``[title]`` and bracket artefacts)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag(doc: dict[str, Any]) -> MCItem:
    context = hellaswag_clean(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
    return _shared(context, [hellaswag_clean(e) for e in doc["endings"]], int(doc["label"]))


def winogrande(doc: dict[str, Any]) -> MCItem:
    sentence = doc["sentence"]
    blank = sentence.index("_")
    contexts = [sentence[:blank] + opt for opt in (doc["option1"], doc["option2"])]
    rest = DELIMITER + sentence[blank + 1 :].strip()
    return MCItem(tuple((c, rest) for c in contexts), {"1": 0, "2": 1}[doc["answer"]], tuple(contexts))


def arc(doc: dict[str, Any]) -> MCItem:
    labels = list(doc["choices"]["label"])
    gold = labels.index(doc["answerKey"])
    return _shared(f"Question: {doc['question']}\nAnswer:", list(doc["choices"]["text"]), gold)


def openbookqa(doc: dict[str, Any]) -> MCItem:
    labels = list(doc["choices"]["label"])
    return _shared(doc["question_stem"], list(doc["choices"]["text"]), labels.index(doc["answerKey"].lstrip()))


def user(doc: dict[str, Any]) -> MCItem:
    return _shared(doc["context"], list(doc["choices"]), int(doc["answer"]))


_BOTH = ("acc", "acc_norm")
SPECS: dict[str, TaskSpec] = {
    "boolq": TaskSpec("boolq", boolq, ("acc",), "acc", "{passage}\\nQuestion: {question}?\\nAnswer: -> ' no'|' yes'"),
    "piqa": TaskSpec("piqa", piqa, _BOTH, "acc_norm", "Question: {goal}\\nAnswer: -> ' {sol}'"),
    "hellaswag": TaskSpec("hellaswag", hellaswag, _BOTH, "acc_norm",
                          "clean({activity_label}: {ctx_a} {ctx_b.capitalize()}) -> ' clean({ending})'"),
    "winogrande": TaskSpec("winogrande", winogrande, ("acc",), "acc",
                           "partial scoring: {sentence up to _}{option} -> ' {rest of sentence}'"),
    "arc_easy": TaskSpec("arc_easy", arc, _BOTH, "acc_norm", "Question: {question}\\nAnswer: -> ' {choice}'"),
    "arc_challenge": TaskSpec("arc_challenge", arc, _BOTH, "acc_norm", "Question: {question}\\nAnswer: -> ' {choice}'"),
    "openbookqa": TaskSpec("openbookqa", openbookqa, _BOTH, "acc_norm", "{question_stem} -> ' {choice}'"),
}
USER_SPEC = TaskSpec("user", user, _BOTH, "acc", "{context} -> ' {choice}'")
