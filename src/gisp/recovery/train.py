"""``recover``: LoRA recovery training of an exported level, merged back into an export of the same shape.

1. **read** the export (a ``gisp export`` directory: per-layer or plain) and
   load it in fp32 with its tokenizer; with distillation, load the teacher
   (default: the dense model the export was cut from) and check it shares the
   tokenizer;
2. **adapt**: PEFT LoRA adapters on every attention and MLP projection (the
   module names come from the family's :class:`~gisp.architectures.Architecture`);
   everything else stays frozen;
3. **train** for a fixed token budget on the calibration part of a text source
   (:mod:`gisp.recovery.data`) with AdamW (linear warm-up, cosine decay), the
   loss computed a chunk of positions at a time (:mod:`gisp.recovery.loss`),
   checkpointing every K steps (:mod:`gisp.recovery.checkpoint`);
4. **merge** the adapters into the weights (``merge_and_unload``) and write the
   export again: the input's config, tokenizer and other files byte for byte,
   weights of the same names, shapes and dtype, and the input's record with a
   ``recovery`` section. The directory replaces ``OUT`` (and its checkpoint)
   atomically.

``--resume`` continues from the last checkpoint: the batch of a step is a pure
function of the step, and adapters, AdamW state and the RNG state (dropout) are
restored exactly, so on the same machine and thread count the result is
bit-identical to an uninterrupted run (tested).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from gisp.architectures import Architecture, get_architecture
from gisp.core.fingerprint import fingerprint
from gisp.deploy.export import EXPORT_FILE, write_record
from gisp.errors import GispError
from gisp.loading import LoadedModel, load_model, load_pretrained, resolve_device
from gisp.outputs import staged
from gisp.provenance import versions
from gisp.recovery.checkpoint import (
    checkpoint_path,
    load_checkpoint,
    load_optimizer,
    read_state,
    restore_rng,
    save_checkpoint,
)
from gisp.recovery.config import RecoverConfig, resume_conflicts
from gisp.recovery.data import TrainingText
from gisp.recovery.loss import Losses, chunked_loss
from gisp.run.gradients import warn_if_emulated

RECORD_KEY = "recovery"
HISTORY_POINTS = 100
"""At most this many (evenly strided) per-step losses are kept in the export record."""
WEIGHT_FILES = ("*.safetensors", "model.safetensors.index.json")


@dataclass
class RecoverResult:
    """Where the recovered export went and how training went."""

    path: Path
    steps: int
    tokens: int
    first: dict[str, float | None]
    final: dict[str, float | None]
    train_seconds: float
    record: dict[str, Any] = field(repr=False, default_factory=dict)


# reading the input ----------------------------------------------------------------------------------------


def read_export(path: str | Path) -> dict[str, Any]:
    """The record of a ``gisp export`` directory that recovery can train; one line for anything else."""
    path = Path(path).expanduser()
    if (path / "trajectory.json").is_file():
        raise GispError(f"{path} is a pruning run, not an export: export a level first "
                        f"(gisp export {path} --sparsity S --out DIR) and recover that")
    if not (path / "config.json").is_file() or not (path / EXPORT_FILE).is_file():
        raise GispError(f"{path} is not a gisp export (no config.json and {EXPORT_FILE}): give a directory "
                        "written by gisp export")
    try:
        record = json.loads((path / EXPORT_FILE).read_text())
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (json.JSONDecodeError, OSError) as e:
        raise GispError(f"{path}: {EXPORT_FILE} or config.json is unreadable ({type(e).__name__}): "
                        "re-export the model") from e
    if "vllm" in record or model_type == "gisp_decilm":
        raise GispError(f"{path} is a vLLM export: recover the Hugging Face export of the level "
                        "(gisp export RUN --sparsity S --out DIR), then convert the result with --format vllm")
    return record


def _check_out(src: Path, out: Path) -> None:
    a, b = src.resolve(), out.resolve()
    if a == b or a in b.parents or b in a.parents:
        raise GispError(f"--out {out} is the export being recovered (or inside it): give a new directory")


def _done(out: Path) -> bool:
    return (out / EXPORT_FILE).is_file() and RECORD_KEY in json.loads((out / EXPORT_FILE).read_text())


def _existing(out: Path, resume: bool, config: RecoverConfig, input_print: str) -> dict[str, Any] | None:
    """The checkpoint state to continue from (``None``: start afresh); refuses what must not be overwritten."""
    state = read_state(out)
    if state is None:
        ours = checkpoint_path(out).name  # the checkpoint and its temporary directories (a kill while writing)
        if out.exists() and (not out.is_dir() or any(not p.name.lstrip(".").startswith(ours) for p in out.iterdir())):
            raise GispError(f"{out} already exists and is not empty: choose another --out")
        return None
    if not resume:
        raise GispError(f"{out} holds an unfinished recovery (step {state['step']} of {state['steps']}): pass "
                        "--resume to continue it, or choose another --out")
    diff = resume_conflicts(state["config"], config)
    if diff:
        raise GispError(f"{out} holds a recovery with different settings ({', '.join(diff)}): use another --out")
    if state["input_fingerprint"] != input_print:
        raise GispError(f"{out} holds a recovery of another export ({state['input']}): use another --out")
    return state


# models ---------------------------------------------------------------------------------------------------


@dataclass
class _Teacher:
    model: nn.Module
    arch: Architecture
    info: dict[str, Any]


def _teacher(config: RecoverConfig, record: dict[str, Any], student: LoadedModel, device: str) -> _Teacher | None:
    if not config.distill:
        return None
    name = config.teacher
    if name is None:
        source = record.get("source") or {}
        name = source.get("path") or source.get("name")
        if not name or name == "model":
            raise GispError("this export does not record a loadable source model: give --teacher MODEL")
    loaded = load_model(name, device=device)
    t_vocab = loaded.model.get_output_embeddings().weight.shape[0]
    s_vocab = student.model.get_output_embeddings().weight.shape[0]
    if t_vocab != s_vocab or loaded.tokenizer.get_vocab() != student.tokenizer.get_vocab():
        raise GispError(f"teacher '{name}' has another tokenizer or vocabulary ({t_vocab} logits, "
                        f"{len(loaded.tokenizer)} tokens) than the export ({s_vocab} logits, "
                        f"{len(student.tokenizer)} tokens): distil from the dense model the export was cut from")
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    print_ = fingerprint(loaded.model)
    expected = (record.get("source") or {}).get("fingerprint")
    if config.teacher_from_run and expected and print_ != expected:
        raise GispError(f"the export's source model '{name}' is not the model it was cut from (fingerprint "
                        f"{print_}, the export records {expected}): give the dense model with --teacher MODEL")
    info = {"name": name, "path": loaded.path, "fingerprint": print_,
            "dtype": str(next(loaded.model.parameters()).dtype).replace("torch.", "")}
    return _Teacher(loaded.model.eval(), get_architecture(loaded.model), info)


def _with_adapters(model: nn.Module, arch: Architecture, config: RecoverConfig) -> tuple[nn.Module, list[str]]:
    """``model`` with LoRA adapters on its projections (seeded init); returns the PEFT wrapper and targets."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise GispError("gisp recover needs PEFT: pip install 'gisp[recover]' (or pip install peft)") from e
    targets = arch.projection_modules()
    torch.manual_seed(config.seed)
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=targets,
                      bias="none")
    with warnings.catch_warnings():  # PEFT asks transformers a question that transformers 5 deprecated
        warnings.filterwarnings("ignore", category=FutureWarning)
        return get_peft_model(model, lora), targets


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# training -------------------------------------------------------------------------------------------------


def lr_at(step: int, steps: int, lr: float, warmup: float) -> float:
    """Learning rate of step ``step`` (0-based): linear warm-up over ``round(warmup * steps)`` steps, then
    cosine decay towards zero (a function of the step alone, so nothing of it needs saving)."""
    w = round(warmup * steps)
    if step < w:
        return lr * (step + 1) / w
    return lr * 0.5 * (1.0 + math.cos(math.pi * (step - w) / max(1, steps - w)))


@dataclass
class _Session:
    """Everything one training session uses."""

    config: RecoverConfig
    student: nn.Module
    """The adapted model (PEFT's inner model: what ``final_hidden`` runs)."""
    arch: Architecture
    teacher: _Teacher | None
    text: TrainingText
    optimizer: torch.optim.Optimizer
    params: dict[str, nn.Parameter]
    device: torch.device

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.config.autocast == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.config.autocast == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def step(self, step: int) -> Losses:
        c = self.config
        for g in self.optimizer.param_groups:
            g["lr"] = lr_at(step, c.steps, c.lr, c.warmup)
        ids = self.text.batch(step, c.batch_size).to(self.device)
        inputs, labels = ids[:, :-1], ids[:, 1:]
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            hidden = self.arch.final_hidden(self.student, inputs)
            t_hidden = t_head = None
            if self.teacher is not None:
                t = self.teacher
                with torch.no_grad():
                    t_hidden = t.arch.final_hidden(t.model, inputs)
                t_head = lambda h: t.arch.logits(t.model, h)  # noqa: E731
            losses = chunked_loss(hidden, labels, lambda h: self.arch.logits(self.student, h),
                                  teacher_hidden=t_hidden, teacher_head=t_head, temperature=c.temperature,
                                  lm_weight=c.lm_weight if self.teacher is not None else 1.0, chunk=c.kd_chunk)
        if c.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), c.max_grad_norm)
        self.optimizer.step()
        return losses


def recover(
    export_dir: str | Path,
    out: str | Path,
    config: RecoverConfig,
    *,
    resume: bool = False,
    device: str = "auto",
    progress: bool = True,
    stop_after: int | None = None,
) -> RecoverResult:
    """Recovery-train the export in ``export_dir`` and write the merged model to ``out`` (see the module doc).

    ``stop_after`` ends the call after that many steps of this call, leaving the
    unfinished run in ``out`` (used to test resumption).
    """
    t_start = time.perf_counter()
    src, out = Path(export_dir).expanduser(), Path(out).expanduser()
    record = read_export(src)
    _check_out(src, out)
    if resume and not read_state(out) and out.is_dir() and _done(out):
        return _result_of(out, json.loads((out / EXPORT_FILE).read_text()))
    dev = resolve_device(device)
    student = load_pretrained(src, dtype="fp32", device=str(dev))
    if student.tokenizer is None:
        raise GispError(f"{src} has no tokenizer files: re-export it (gisp export copies the tokenizer)")
    input_print = fingerprint(student.model)
    state = _existing(out, resume, config, input_print)
    out_dtype = _weights_dtype(src)
    arch = get_architecture(student.model)
    teacher = _teacher(config, record, student, str(dev))
    text = TrainingText.build(config.data, student.tokenizer, config.seq_len, config.seed)

    peft_model, targets = _with_adapters(student.model, arch, config)
    params = _trainable(peft_model)
    optimizer = torch.optim.AdamW(list(params.values()), lr=config.lr, weight_decay=config.weight_decay)
    history: list[list[float | None]] = []
    first, train_seconds, sessions = 0, 0.0, []
    if state is not None:
        adapters, opt_tensors, rng = load_checkpoint(out)
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(adapters[name])
        load_optimizer(optimizer, opt_tensors, state["optimizer"])
        restore_rng(rng)
        first, history, train_seconds = state["step"], state["history"], state["train_seconds"]
        sessions = state["sessions"]
    sessions.append({"from_step": first})
    inner = peft_model.get_base_model()
    inner.train()
    warn_if_emulated(config.autocast, dev)
    session = _Session(config, inner, arch, teacher, text, optimizer, params, dev)

    def checkpoint(done: int) -> None:
        save_checkpoint(out, {n: p.detach() for n, p in params.items()}, optimizer, {
            "config": config.to_dict(), "input": str(src.resolve()), "input_fingerprint": input_print,
            "step": done, "steps": config.steps, "data_position": text.position(done, config.batch_size),
            "history": history, "train_seconds": train_seconds, "sessions": sessions})

    bar = tqdm(total=config.steps, initial=first, desc=f"recover ({config.method})", unit="step",
               disable=not progress)
    try:
        for step in range(first, config.steps):
            t0 = time.perf_counter()
            losses = session.step(step)
            history.append([losses.total, losses.kd, losses.lm])
            train_seconds += time.perf_counter() - t0
            done = step + 1
            bar.update(1)
            bar.set_postfix_str(f"loss={losses.total:.4f}" + ("" if losses.kd is None else f", kd={losses.kd:.4f}"))
            if done == config.steps or (config.checkpoint_every and done % config.checkpoint_every == 0):
                checkpoint(done)
            if stop_after is not None and done - first >= stop_after and done < config.steps:
                return RecoverResult(out, done, done * config.tokens_per_step, {}, {}, train_seconds)
    finally:
        bar.close()

    merged = peft_model.merge_and_unload()
    merged.to(out_dtype)
    rec = dict(record)
    previous = rec.pop(RECORD_KEY, None)
    rec[RECORD_KEY] = _record(config, src, input_print, text, targets, params, teacher, history, train_seconds,
                              sessions, time.perf_counter() - t_start, dev, previous)
    _write(src, out, merged, rec)
    return _result_of(out, rec)


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _weights_dtype(path: Path) -> torch.dtype:
    """The one floating dtype of an export's weights (the merged model is written in it)."""
    dtypes = {d for _, d in _weight_shapes(path).values()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in _SAFETENSORS_DTYPES:
        raise GispError(f"{path} holds weights of dtypes {sorted(dtypes)}: recovery needs one of fp32, bf16, fp16")
    return _SAFETENSORS_DTYPES[dtypes.pop()]


def _summary(rows: list[list[float | None]]) -> dict[str, float | None]:
    """Mean total, KD and LM loss of some steps' history rows."""
    cols = list(zip(*rows))
    return {k: None if col[0] is None else sum(col) / len(col) for k, col in zip(("total", "kd", "lm"), cols)}


def _record(config: RecoverConfig, src: Path, input_print: str, text: TrainingText, targets: list[str],
            params: dict[str, nn.Parameter], teacher: _Teacher | None, history: list[list[float | None]],
            train_seconds: float, sessions: list[dict[str, int]], seconds: float, device: torch.device,
            previous: dict[str, Any] | None) -> dict[str, Any]:
    import peft

    steps = config.steps
    tail = max(1, steps // 10)
    stride = max(1, -(-steps // HISTORY_POINTS))
    tokens = steps * config.tokens_per_step
    return {
        "method": config.method,
        "tokens": config.tokens,
        "tokens_trained": tokens,
        "steps": steps,
        "source": text.describe(steps, config.batch_size),
        "lr": config.lr,
        "rank": config.rank,
        "seed": config.seed,
        "final_losses": {"last_step": _summary(history[-1:]),
                         f"mean_last_{tail}_steps": _summary(history[-tail:])},
        "first_losses": _summary(history[:1]),
        "loss_definition": ("total = (1 - lm_weight) * T^2 * KL(teacher || student) + lm_weight * LM" if teacher
                            else "total = LM (next-token cross-entropy)") + "; means over predicted positions",
        "history": [{"step": i + 1, "total": h[0], "kd": h[1], "lm": h[2]} for i, h in enumerate(history)
                    if i % stride == 0 or i == len(history) - 1],
        "adapters": {"library": "peft", "kind": "LoRA", "target_modules": targets, "rank": config.rank,
                     "alpha": config.alpha, "dropout": config.dropout,
                     "trainable_params": sum(p.numel() for p in params.values()),
                     "merged": "merge_and_unload into the weights; the export keeps its shapes"},
        "optimizer": {"name": "AdamW", "lr": config.lr, "weight_decay": config.weight_decay,
                      "schedule": f"linear warm-up over {round(config.warmup * steps)} steps, cosine decay to 0",
                      "max_grad_norm": config.max_grad_norm},
        "teacher": None if teacher is None else {**teacher.info, "temperature": config.temperature,
                                                 "lm_weight": config.lm_weight},
        "config": config.to_dict(),
        "input": {"path": str(src.resolve()), "fingerprint": input_print},
        "train_seconds": train_seconds,
        "tokens_per_second": tokens / train_seconds if train_seconds > 0 else None,
        "last_session_seconds": seconds,
        "sessions": sessions,
        "device": str(device),
        "train_dtype": "float32" + ("" if config.autocast == "none" else f" (autocast {config.autocast})"),
        "versions": {**versions(), "peft": peft.__version__, "torch_threads": str(torch.get_num_threads())},
        "previous": previous,
    }


def _weight_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    from safetensors import safe_open

    shapes = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                sl = st.get_slice(k)
                shapes[k] = (tuple(sl.get_shape()), sl.get_dtype())
    return shapes


def _write(src: Path, out: Path, model: nn.Module, record: dict[str, Any]) -> None:
    """The merged weights with the input's other files (config, tokenizer, ...) and the new record; replaces
    ``out`` (and its checkpoint) atomically."""
    with staged(out) as final:
        weights = final / ".weights"
        model.save_pretrained(weights, safe_serialization=True)
        for pattern in WEIGHT_FILES:
            for f in weights.glob(pattern):
                shutil.move(str(f), final / f.name)
        shutil.rmtree(weights)
        for f in src.iterdir():
            if f.is_file() and f.name != EXPORT_FILE and not any(f.match(p) for p in WEIGHT_FILES):
                shutil.copy2(f, final / f.name)
        write_record(final / EXPORT_FILE, record)
        before, after = _weight_shapes(src), _weight_shapes(final)
        if before != after:
            changed = sorted(set(before) ^ set(after)) or sorted(k for k in before if before[k] != after[k])
            raise GispError(f"the merged model's weights differ from the export's in '{changed[0]}': "
                            "this is a bug in gisp recover")


def _result_of(out: Path, record: dict[str, Any]) -> RecoverResult:
    r = record[RECORD_KEY]
    return RecoverResult(out, r["steps"], r["tokens_trained"], r["first_losses"],
                         r["final_losses"]["last_step"], r["train_seconds"], record)
