"""GSM8K: bits per byte of gold solutions, and k-shot generation with exact match.

A 135M model solves almost no GSM8K problem, so exact match cannot tell two
pruned small models apart; the loss of the gold solution given the question
can. ``gsm8k`` reports that loss (nats per token) and bits per byte of the
solution text; ``gsm8k_gen`` generates greedily after k chain-of-thought
exemplars and checks the answer, for models large enough to solve problems.

Prompt format (both): ``Question: {question}\\nAnswer:`` and the solution after
a space, exemplars separated by blank lines (the 8 exemplars of Wei et al.,
2022, also used by lm-eval's ``gsm8k_cot`` and OLMo's evaluation). A gold
solution is GSM8K's ``answer`` with the calculator annotations ``<<...>>``
removed, its lines joined by spaces and ``#### N`` replaced by
``So the answer is N.``, the exemplars' style.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from gisp.errors import GispError
from gisp.tasks.scoring import encode_pair, loglikelihoods

EXEMPLARS: tuple[tuple[str, str], ...] = (
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
     "there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have "
     "been 21 - 15 = 6. So the answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. So the answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, "
     "they had 74 - 35 = 39. So the answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did "
     "Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. "
     "So the answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have "
     "now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. "
     "So the answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to "
     "thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers "
     "were added. 9 + 20 is 29. So the answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
     "balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, "
     "he had 35 - 2 = 33 golf balls. So the answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
     "left. 23 - 15 is 8. So the answer is 8."),
)
STOP = ("Question:", "\n\n", "</s>", "<|im_end|>")
_NUM = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_STRICT = re.compile(r"[Tt]he answer is \$?(-?[\d,]*\.?\d+)")


def gold_solution(answer: str) -> str:
    """GSM8K's worked answer as one paragraph ending in 'So the answer is N.'."""
    body, _, final = answer.rpartition("####")
    body = re.sub(r"<<[^>]*>>", "", body)
    body = " ".join(line.strip() for line in body.splitlines() if line.strip())
    final = final.strip()
    return f"{body} So the answer is {final}." if body else f"So the answer is {final}."


def question_prompt(question: str, shots: int = 0) -> str:
    """k exemplars, then the question, ending in 'Answer:'."""
    if not 0 <= shots <= len(EXEMPLARS):
        raise GispError(f"GSM8K few-shot must be 0..{len(EXEMPLARS)}, got {shots}")
    parts = [f"Question: {q}\nAnswer: {a}" for q, a in EXEMPLARS[:shots]]
    parts.append(f"Question: {question}\nAnswer:")
    return "\n\n".join(parts)


def bits_per_byte(model: nn.Module, tokenizer, docs: Sequence[dict[str, Any]], *, shots: int = 0,
                  batch_size: int = 16, progress: bool = True, autocast: str = "none") -> dict[str, Any]:
    """Loss and bits per byte of the gold solutions given their questions."""
    requests = [(question_prompt(d["question"], shots), " " + gold_solution(d["answer"])) for d in docs]
    lls = loglikelihoods(model, tokenizer, requests, batch_size=batch_size, progress=progress, autocast=autocast,
                         desc="gsm8k bpb")
    per_item = []
    for (ctx, cont), (ll, _) in zip(requests, lls, strict=True):
        per_item.append({"nll": -ll, "bytes": len(cont.encode("utf-8")), "tokens": len(encode_pair(tokenizer, ctx,
                                                                                                    cont)[1])})
    nll = sum(p["nll"] for p in per_item)
    nbytes = sum(p["bytes"] for p in per_item)
    ntok = sum(p["tokens"] for p in per_item)
    bpb = nll / math.log(2) / nbytes
    return {"bpb": bpb, "bpb_stderr": ratio_stderr([p["nll"] / math.log(2) for p in per_item],
                                                    [p["bytes"] for p in per_item]),
            "loss": nll / ntok, "tokens": ntok, "bytes": nbytes, "per_item": per_item}


def ratio_stderr(num: Sequence[float], den: Sequence[float]) -> float:
    """Standard error of sum(num)/sum(den) over items (delta method)."""
    n = len(num)
    if n < 2:
        return float("nan")
    r = sum(num) / sum(den)
    mean_den = sum(den) / n
    resid = [a - r * b for a, b in zip(num, den, strict=True)]
    mu = sum(resid) / n
    var = sum((x - mu) ** 2 for x in resid) / (n - 1)
    return math.sqrt(var / n) / mean_den


def _number(text: str) -> float | None:
    t = text.replace(",", "").replace("$", "").rstrip(".")
    try:
        return float(t)
    except ValueError:
        return None


def score_generation(output: str, gold: str) -> dict[str, float]:
    """acc: the gold number appears in the output (the paper's rule); strict: after 'The answer is';
    flexible: the last number of the output."""
    target = _number(gold)
    nums = [_number(m) for m in _NUM.findall(output)]
    strict = _STRICT.search(output)
    return {
        "acc": float(target is not None and any(n == target for n in nums)),
        "strict_match": float(strict is not None and _number(strict.group(1)) == target),
        "flexible_match": float(bool(nums) and nums[-1] == target),
    }


def cut_at_stop(text: str, stops: Sequence[str] = STOP) -> str:
    cut = min((text.find(s) for s in stops if s in text), default=len(text))
    return text[:cut].strip()


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 256, batch_size: int = 8,
             progress: bool = True) -> list[str]:
    """Greedy continuations of each prompt, cut at the first stop sequence."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outs: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    bar = tqdm(total=len(prompts), desc="gsm8k generate", disable=not progress, leave=False)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = [tokenizer(prompts[i])["input_ids"] for i in idx]
            width = max(len(e) for e in enc)
            ids = torch.full((len(enc), width), pad, dtype=torch.long)
            mask = torch.zeros((len(enc), width), dtype=torch.long)
            for r, e in enumerate(enc):  # left padding, so every prompt ends where generation starts
                ids[r, width - len(e):] = torch.tensor(e)
                mask[r, width - len(e):] = 1
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad, stop_strings=list(STOP),
                                 tokenizer=tokenizer)
            for r, i in enumerate(idx):
                outs[i] = cut_at_stop(tokenizer.decode(gen[r, width:], skip_special_tokens=True))
            bar.update(len(idx))
    finally:
        bar.close()
    return outs
