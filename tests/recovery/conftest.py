"""Tiny exports (per-layer and plain) of a tiny Llama with SmolLM2's tokenizer, and a small training text."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from tests.conftest import one_thread_fixture, random_calib, tiny_model

import gisp

WORDS = ("the model keeps every head that matters and the pruned layers learn again from text that "
         "repeats a few plain sentences about cats dogs rivers and small towns in the north").split()


one_thread = one_thread_fixture()


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from gisp.loading import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m")[0])


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    """Forty short paragraphs of a small vocabulary: the first 32 are the training (calibration) part."""
    g = torch.Generator().manual_seed(0)
    paras = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (40,), generator=g)) for _ in range(40)]
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text("\n\n".join(paras))
    return path


@pytest.fixture(scope="session")
def exports(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """``dense`` (the unpruned tiny model), ``perlayer`` and ``plain`` (--uniform) exports of one run."""
    root = tmp_path_factory.mktemp("exports")
    base = tiny_model("llama", kv_heads=2, layers=4, vocab=len(tokenizer))
    base.save_pretrained(root / "dense")
    tokenizer.save_pretrained(root / "dense")
    info = {"name": str(root / "dense"), "path": str(root / "dense")}
    traj = gisp.prune(copy.deepcopy(base), gisp.PruneConfig(target=0.5, steps=3, batch_size=4, protect_first=0.25),
                      random_calib(n=4, seq_len=16, vocab=len(tokenizer)), progress=False, model_info=info)
    gisp.export(traj, root / "perlayer", sparsity=0.4, model=base, tokenizer=tokenizer)
    gisp.export(traj, root / "plain", sparsity=0.4, uniform=True, model=base, tokenizer=tokenizer)
    return {"dense": root / "dense", "perlayer": root / "perlayer", "plain": root / "plain"}
