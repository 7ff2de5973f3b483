"""Deploy many in llama.cpp: levels of a run as GGUF files that a stock llama.cpp runs, exactly.

:func:`export_gguf` writes one GGUF file per requested level of a run (or converts an
existing ``gisp export`` directory). The weights come from gisp's own HF export
(:func:`gisp.deploy.export.export`, then :func:`gisp.loading.load_pretrained`), so the GGUF computes
what that export computes, to float rounding in f32.

How per-layer widths reach llama.cpp (facts read from llama.cpp's sources, checked by the
round-trip tests against the ``xllamacpp`` build):

- All layers with the same widths (standard grouped attention, both blocks present): the
  family's standard architecture (``llama`` for Llama and Mistral, ``qwen2``, ``qwen3``).
- Per-layer widths: llama.cpp's ``deci`` graph (Llama, Mistral, Qwen2) reads every layer's
  ``head_count``/``head_count_kv``/``feed_forward_length`` from per-layer arrays and builds
  each layer from them; it loads optional q/k/v/o and FFN biases. Qwen3 (q/k norms) goes to
  ``openelm`` (per-layer heads and FFN, fused qkv, q/k norms), which always ties the output
  matrix to the token embedding and has no biases: other Qwen3 models are padded exactly to
  one uniform shape and written as ``qwen3``.
- Uneven GQA groups (e.g. 2, 1 and 3 query heads on three KV heads): llama.cpp broadcasts
  KV heads over equal contiguous groups. Per layer the writer picks the group size that
  minimises the weights: groups are filled with zero query rows / zero output columns
  (adds exactly 0) and/or split by duplicating a KV head.
- A block a layer lost: ``deci`` skips attention for 0 heads; an MLP-less layer with
  attention (and the last layer) gets a one-channel FFN whose weights are zero (adds exactly 0)
  because ``deci`` drops the whole layer's output for ``n_ff == 0``. A layer 0 without attention
  keeps one all-zero head: llama.cpp derives the head size from layer 0's head count. A removed
  block whose output bias remains (FLAP compensation) is a zero block carrying that bias.
- llama.cpp's ``llama``/``deci`` rope rotates consecutive pairs, so q/k rows (and biases) are
  permuted per head, per layer, with that layer's own head counts (as llama.cpp's converter
  does); ``qwen2``/``qwen3``/``openelm`` use the HF layout as is.
- ``q8_0`` needs rows in blocks of 32: FFN widths are padded with zero channels to a multiple
  of 32 (exact); any other matrix whose rows do not split into blocks is written in f16.

Tokenizer and chat template: copied field by field from the source GGUF when the base model
came from one (``gisp_source.json``), else built from the HF tokenizer as llama.cpp's converter
does (byte-level BPE as ``gpt2`` with the pre-tokenizer recognised by its hash; SentencePiece-style
``tokenizer.json`` as ``llama``). Provenance (gisp version, source fingerprint, step, sparsity,
the export record) goes into ``gisp.*`` metadata keys.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import MODEL_ARCH, MODEL_TENSOR, GGMLQuantizationType, LlamaFileType

from gisp.architectures import get_architecture
from gisp.deploy.levels import check_budget, check_sparsity
from gisp.errors import GispError
from gisp.outputs import check_output_file, disk_full_error, remove_stale, staging_name

# =============================================================================
# Per-family facts (keyed by HF model_type)
# =============================================================================


@dataclass(frozen=True)
class GGUFFamily:
    """How one HF family is written for llama.cpp.

    ``arch``: the llama.cpp architecture for uniform widths; ``permute``: its rope rotates
    consecutive pairs, so HF's q/k rows are permuted per head. ``per_layer_arch`` and
    ``per_layer_permute``: the same for per-layer widths (``None``: pad to uniform).
    ``per_layer_needs_tied``/``per_layer_no_bias``: conditions of that per-layer graph
    (openelm ties the output to the token embedding and loads no biases); a model that
    misses them is padded to uniform widths instead. ``fused_qkv``: the per-layer graph
    reads one ``attn_qkv`` matrix. ``o_bias``: the uniform graph loads an attention-output
    bias. ``q_is_hidden``: the uniform graph sizes q/o as hidden x hidden (qwen2), so pruned
    uniform heads go to the per-layer graph.
    """

    arch: MODEL_ARCH
    permute: bool
    per_layer_arch: MODEL_ARCH | None
    per_layer_permute: bool
    per_layer_needs_tied: bool = False
    per_layer_no_bias: bool = False
    fused_qkv: bool = False
    o_bias: bool = True  # the uniform graph loads an attention-output bias
    q_is_hidden: bool = False  # the uniform graph needs heads * head_dim == hidden size (else per-layer)


GGUF_FAMILIES: dict[str, GGUFFamily] = {
    "llama": GGUFFamily(MODEL_ARCH.LLAMA, True, MODEL_ARCH.DECI, True),
    "mistral": GGUFFamily(MODEL_ARCH.LLAMA, True, MODEL_ARCH.DECI, True),
    "qwen2": GGUFFamily(MODEL_ARCH.QWEN2, False, MODEL_ARCH.DECI, True, q_is_hidden=True),
    "qwen3": GGUFFamily(MODEL_ARCH.QWEN3, False, MODEL_ARCH.OPENELM, False, per_layer_needs_tied=True,
                        per_layer_no_bias=True, fused_qkv=True, o_bias=False),
}

# Graphs that treat 0 heads / 0 FFN channels as "no block" (others need a zero block).
_EMPTY_BLOCKS = {MODEL_ARCH.DECI}

# file bytes per weight of each outtype (q8_0: 32 weights in 34 bytes), for --max-size-gb
BYTES_PER_WEIGHT = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}

OUTTYPES: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
}

# llama.cpp's converter names a byte-level BPE pre-tokenizer by the hash of the tokens of one
# test text; these are the entries for the tokenizers of the supported families (from
# convert_hf_to_gguf.py). Others are written as "default" (noted in the file's metadata).
_CHK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
_PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}

_SKIPPED_BIAS = re.compile(r"model\.layers\.(\d+)\.skipped_(attn|mlp)_bias$")


def family_of(model_type: str) -> GGUFFamily:
    fam = GGUF_FAMILIES.get(model_type.removeprefix("gisp_"))
    if fam is None:
        raise GispError(f"the GGUF writer knows {', '.join(GGUF_FAMILIES)} models, not '{model_type}': "
                        "export this model with --format hf")
    return fam


def check_outtype(outtype: str) -> tuple[GGMLQuantizationType, LlamaFileType]:
    if outtype not in OUTTYPES:
        raise GispError(f"--outtype '{outtype}' cannot be written: use one of {', '.join(OUTTYPES)}")
    return OUTTYPES[outtype]


# =============================================================================
# Reading the HF export: one entry per layer
# =============================================================================


@dataclass
class _Layer:
    """One HF layer's tensors (f32, HF orientation) and its query-to-KV grouping."""

    attn: dict[MODEL_TENSOR, dict[str, torch.Tensor]] = field(default_factory=dict)
    mlp: dict[MODEL_TENSOR, dict[str, torch.Tensor]] = field(default_factory=dict)
    groups: list[list[int]] = field(default_factory=list)  # groups[j]: query heads reading KV head j
    attn_bias: torch.Tensor | None = None  # output bias of a removed attention block
    mlp_bias: torch.Tensor | None = None  # output bias of a removed MLP


_ATTN_TENSORS = {MODEL_TENSOR.ATTN_NORM, MODEL_TENSOR.ATTN_Q, MODEL_TENSOR.ATTN_K, MODEL_TENSOR.ATTN_V,
                 MODEL_TENSOR.ATTN_OUT, MODEL_TENSOR.ATTN_Q_NORM, MODEL_TENSOR.ATTN_K_NORM}
_MLP_TENSORS = {MODEL_TENSOR.FFN_NORM, MODEL_TENSOR.FFN_GATE, MODEL_TENSOR.FFN_UP, MODEL_TENSOR.FFN_DOWN}


def _layer_kv_map(model: torch.nn.Module, i: int) -> list[int] | None:
    arch = get_architecture(model)
    att = getattr(arch.layers(model)[i], arch.attention_modules[0], None)
    kv_map = getattr(att, "kv_head_map", None)
    if kv_map is None:
        per_layer = getattr(model.config, "per_layer_config", None)
        if per_layer:
            lc = per_layer[i] if not isinstance(per_layer, dict) else per_layer.get(i, per_layer.get(str(i)))
            kv_map = getattr(lc, "kv_head_map", None) if not isinstance(lc, dict) else lc.get("kv_head_map")
    return None if kv_map is None else [int(j) for j in kv_map]


def _read_layers(model: torch.nn.Module, fam: GGUFFamily, head_dim: int) -> tuple[dict, list[_Layer]]:
    """Tensors of the HF model by llama.cpp tensor kind (gguf's own name map), layer by layer."""
    n_layers = len(get_architecture(model).layers(model))
    nmap = gguf.get_tensor_name_map(fam.arch, n_layers)
    top: dict[MODEL_TENSOR, torch.Tensor] = {}
    layers = [_Layer() for _ in range(n_layers)]
    for key, value in model.state_dict().items():
        t = value.detach().to("cpu", torch.float32)
        m = _SKIPPED_BIAS.match(key)
        if m:
            setattr(layers[int(m.group(1))], f"{m.group(2)}_bias", t)
            continue
        found = nmap.get_type_and_name(key, try_suffixes=(".weight", ".bias"))
        if found is None:
            if key.endswith("rotary_emb.inv_freq"):
                continue
            raise GispError(f"the GGUF writer has no llama.cpp name for tensor '{key}' of this "
                            f"{model.config.model_type} model")
        kind, name = found
        part = "bias" if name.endswith(".bias") else "weight"
        m = re.match(r"blk\.(\d+)\.", name)
        if m is None:
            top[kind] = t
            continue
        layer = layers[int(m.group(1))]
        block = layer.attn if kind in _ATTN_TENSORS else layer.mlp if kind in _MLP_TENSORS else None
        if block is None:
            raise GispError(f"the GGUF writer does not handle tensor '{key}' ({kind.name})")
        block.setdefault(kind, {})[part] = t
    for i, layer in enumerate(layers):
        if MODEL_TENSOR.ATTN_Q in layer.attn:
            h = layer.attn[MODEL_TENSOR.ATTN_Q]["weight"].shape[0] // head_dim
            kv = layer.attn[MODEL_TENSOR.ATTN_K]["weight"].shape[0] // head_dim
            kv_map = _layer_kv_map(model, i) or [q // (h // kv) for q in range(h)]
            layer.groups = [[q for q in range(h) if kv_map[q] == j] for j in range(kv)]
    return top, layers


# =============================================================================
# Layout: what each GGUF layer holds
# =============================================================================


@dataclass
class _Plan:
    """One GGUF layer: query slots (HF query head or None = zero head), KV rows, FFN width."""

    slots: list[int | None]
    kv_rows: list[int]
    n_ff: int  # written FFN width (>= kept channels; zero channels pad)
    zero_attn: bool = False  # all-zero attention (layer 0 without attention, or a removed block's bias)
    zero_mlp: bool = False  # all-zero FFN (a removed MLP the graph cannot skip)

    @property
    def heads(self) -> int:
        return len(self.slots)

    @property
    def kv(self) -> int:
        return len(self.kv_rows)


def _group_layout(groups: list[list[int]], size: int) -> tuple[list[int | None], list[int]]:
    slots: list[int | None] = []
    kv_rows: list[int] = []
    for j, heads in enumerate(groups):
        for c in range(0, len(heads), size):
            chunk: list[int | None] = list(heads[c : c + size])
            kv_rows.append(j)
            slots += chunk + [None] * (size - len(chunk))
    return slots, kv_rows


def _best_group_size(groups: list[list[int]]) -> int:
    """Equal contiguous groups with fewest written heads (q+o per query head, k+v per KV head)."""
    sizes = [len(g) for g in groups if g]
    best = None
    for g in range(1, max(sizes) + 1):
        kv = sum(math.ceil(s / g) for s in sizes)
        key = (g * kv + kv, kv)
        if best is None or key < best[0]:
            best = (key, g)
    return best[1]


def _ffn_width(c: int, multiple: int) -> int:
    return c if multiple <= 1 else -(-c // multiple) * multiple


def _plan(layers: list[_Layer], fam: GGUFFamily, tied: bool, ff_multiple: int,
          q_width_ok: Any = None) -> tuple[MODEL_ARCH, bool, list[_Plan], list[str]]:
    """Choose the llama.cpp architecture and every layer's written shape."""
    notes: list[str] = []
    has_bias = any("bias" in lay.mlp.get(MODEL_TENSOR.FFN_DOWN, {}) or "bias" in lay.attn.get(MODEL_TENSOR.ATTN_OUT, {})
                   or lay.attn_bias is not None or lay.mlp_bias is not None for lay in layers)
    if has_bias and not fam.o_bias:
        raise GispError(f"llama.cpp's {gguf.MODEL_ARCH_NAMES[fam.arch]} graph has no attention-output bias: "
                        "this model's biases cannot be written as GGUF")
    natural = []
    for lay in layers:
        if lay.groups:
            slots, kv_rows = _group_layout(lay.groups, _best_group_size(lay.groups))
        else:
            slots, kv_rows = [], []
        c = lay.mlp[MODEL_TENSOR.FFN_GATE]["weight"].shape[0] if MODEL_TENSOR.FFN_GATE in lay.mlp else 0
        natural.append(_Plan(slots, kv_rows, _ffn_width(c, ff_multiple) if c else 0))
    shapes = {(p.heads, p.kv, p.n_ff) for p in natural}
    if len(shapes) == 1 and all(p.heads and p.n_ff for p in natural) and not any(
            lay.attn_bias is not None or lay.mlp_bias is not None for lay in layers) and (
            q_width_ok is None or q_width_ok(natural[0].heads)):
        return fam.arch, fam.permute, natural, notes
    arch = fam.per_layer_arch
    reason = None
    if arch is None:
        reason = "no per-layer graph"
    elif fam.per_layer_needs_tied and not tied:
        reason = f"llama.cpp's {gguf.MODEL_ARCH_NAMES[arch]} graph ties the output to the token embedding"
    elif fam.per_layer_no_bias and has_bias:
        reason = f"llama.cpp's {gguf.MODEL_ARCH_NAMES[arch]} graph has no biases"
    if reason is not None:
        return fam.arch, fam.permute, _pad_uniform(layers, natural, ff_multiple), [
            f"per-layer widths padded with zero heads/channels to one shape ({reason}): exact, but the file "
            "is as large as its widest layer"]
    empty_ok = arch in _EMPTY_BLOCKS
    last = len(layers) - 1
    plans = []
    for i, (lay, p) in enumerate(zip(layers, natural)):
        if not p.heads and (not empty_ok or i == 0 or lay.attn_bias is not None):
            p = _Plan([None], [-1], p.n_ff, zero_attn=True)
        if not p.n_ff and (not empty_ok or p.heads or i == last or lay.mlp_bias is not None):
            p = _Plan(p.slots, p.kv_rows, _ffn_width(1, ff_multiple), zero_attn=p.zero_attn, zero_mlp=True)
        plans.append(p)
    return arch, fam.per_layer_permute, plans, notes


def _pad_uniform(layers: list[_Layer], natural: list[_Plan], ff_multiple: int) -> list[_Plan]:
    size = max((len(g) for lay in layers for g in lay.groups), default=1)
    n_kv = max((len(lay.groups) for lay in layers), default=1)
    n_ff = max(max(p.n_ff for p in natural), _ffn_width(1, ff_multiple))
    plans = []
    for lay in layers:
        slots, kv_rows = _group_layout(lay.groups, size) if lay.groups else ([], [])
        pad = n_kv - len(kv_rows)
        plans.append(_Plan(slots + [None] * (pad * size), kv_rows + [-1] * pad, n_ff,
                           zero_attn=not lay.groups, zero_mlp=MODEL_TENSOR.FFN_GATE not in lay.mlp))
    return plans


# =============================================================================
# Tensors
# =============================================================================


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter permutation: HF's half-split rope layout -> consecutive pairs, per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rows(w: torch.Tensor | None, index: list[int | None], d: int, n_rows: int) -> torch.Tensor:
    """Heads ``index`` (None or -1: zero head) of a [heads*d, ...] tensor; zeros if ``w`` is None."""
    shape = (len(index) * d, *([] if w is None else w.shape[1:]))
    if w is None:
        return torch.zeros(len(index) * d, *([n_rows] if n_rows else []))
    out = torch.zeros(shape, dtype=w.dtype)
    for k, h in enumerate(index):
        if h is not None and h >= 0:
            out[k * d : (k + 1) * d] = w[h * d : (h + 1) * d]
    return out


def _layer_tensors(lay: _Layer, plan: _Plan, hidden: int, d: int, permute: bool, fused: bool,
                   qk_norm: bool) -> dict[tuple[MODEL_TENSOR, str], torch.Tensor]:
    out: dict[tuple[MODEL_TENSOR, str], torch.Tensor] = {}
    if plan.heads:
        a = lay.attn
        get = lambda k, part="weight": a.get(k, {}).get(part)  # noqa: E731
        q, k, v = get(MODEL_TENSOR.ATTN_Q), get(MODEL_TENSOR.ATTN_K), get(MODEL_TENSOR.ATTN_V)
        o = get(MODEL_TENSOR.ATTN_OUT)
        wq = _rows(q, plan.slots, d, hidden)
        wk = _rows(k, plan.kv_rows, d, hidden)
        wv = _rows(v, plan.kv_rows, d, hidden)
        wo = _rows(None if o is None else o.T, plan.slots, d, hidden).T.contiguous()
        biases = {}
        for kind, src, index in ((MODEL_TENSOR.ATTN_Q, get(MODEL_TENSOR.ATTN_Q, "bias"), plan.slots),
                                 (MODEL_TENSOR.ATTN_K, get(MODEL_TENSOR.ATTN_K, "bias"), plan.kv_rows),
                                 (MODEL_TENSOR.ATTN_V, get(MODEL_TENSOR.ATTN_V, "bias"), plan.kv_rows)):
            if src is not None:
                biases[kind] = _rows(src, index, d, 0)
        if permute:
            wq, wk = _permute(wq, plan.heads), _permute(wk, plan.kv)
            for kind, n in ((MODEL_TENSOR.ATTN_Q, plan.heads), (MODEL_TENSOR.ATTN_K, plan.kv)):
                if kind in biases:
                    biases[kind] = _permute(biases[kind], n)
        norm = get(MODEL_TENSOR.ATTN_NORM)
        out[(MODEL_TENSOR.ATTN_NORM, "weight")] = norm if norm is not None else torch.ones(hidden)
        if fused:
            out[(MODEL_TENSOR.ATTN_QKV, "weight")] = torch.cat([wq, wk, wv])
        else:
            out[(MODEL_TENSOR.ATTN_Q, "weight")] = wq
            out[(MODEL_TENSOR.ATTN_K, "weight")] = wk
            out[(MODEL_TENSOR.ATTN_V, "weight")] = wv
            for kind, b in biases.items():
                out[(kind, "bias")] = b
        out[(MODEL_TENSOR.ATTN_OUT, "weight")] = wo
        o_bias = get(MODEL_TENSOR.ATTN_OUT, "bias")
        if o_bias is None:
            o_bias = lay.attn_bias
        if o_bias is not None:
            out[(MODEL_TENSOR.ATTN_OUT, "bias")] = o_bias
        if qk_norm:
            for kind in (MODEL_TENSOR.ATTN_Q_NORM, MODEL_TENSOR.ATTN_K_NORM):
                w = get(kind)
                out[(kind, "weight")] = w if w is not None else torch.ones(d)
    if plan.n_ff:
        m = lay.mlp
        get = lambda k, part="weight": m.get(k, {}).get(part)  # noqa: E731
        gate, up, down = get(MODEL_TENSOR.FFN_GATE), get(MODEL_TENSOR.FFN_UP), get(MODEL_TENSOR.FFN_DOWN)
        c = 0 if gate is None else gate.shape[0]
        pad = plan.n_ff - c
        for kind, w in ((MODEL_TENSOR.FFN_GATE, gate), (MODEL_TENSOR.FFN_UP, up)):
            kept = w if w is not None else torch.zeros(0, hidden)
            out[(kind, "weight")] = torch.cat([kept, torch.zeros(pad, hidden)])
            b = get(kind, "bias")
            if b is not None:
                out[(kind, "bias")] = torch.cat([b, torch.zeros(pad)])
        out[(MODEL_TENSOR.FFN_DOWN, "weight")] = torch.cat(
            [down if down is not None else torch.zeros(hidden, 0), torch.zeros(hidden, pad)], dim=1)
        d_bias = get(MODEL_TENSOR.FFN_DOWN, "bias")
        if d_bias is None:
            d_bias = lay.mlp_bias
        if d_bias is not None:
            out[(MODEL_TENSOR.FFN_DOWN, "bias")] = d_bias
        norm = get(MODEL_TENSOR.FFN_NORM)
        out[(MODEL_TENSOR.FFN_NORM, "weight")] = norm if norm is not None else torch.ones(hidden)
    return out


def _encode(t: torch.Tensor, qtype: GGMLQuantizationType) -> tuple[np.ndarray, GGMLQuantizationType]:
    """A tensor in the file's type: 1-D in f32; rows that do not split into blocks in f16."""
    a = t.detach().to(torch.float32).contiguous().numpy()
    if a.ndim == 1 or qtype == GGMLQuantizationType.F32:
        return a, GGMLQuantizationType.F32
    if qtype == GGMLQuantizationType.F16:
        return a.astype(np.float16), GGMLQuantizationType.F16
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if a.shape[-1] % block:
        return a.astype(np.float16), GGMLQuantizationType.F16
    return gguf.quants.quantize(a, qtype), qtype


# =============================================================================
# Tokenizer
# =============================================================================


def _source_gguf(record: dict[str, Any] | None, model_path: str | Path | None) -> Path | None:
    """The GGUF file the base model was converted from, if any (``gisp_source.json``)."""
    candidates: list[Path] = []
    src = (record or {}).get("source") or {}
    for p in (src.get("path"), model_path):
        if p:
            candidates.append(Path(p))
    name = src.get("name")
    if name:
        try:
            from gisp.loading import resolve_model_path

            path, gguf_file = resolve_model_path(name)
            candidates.append(Path(path) / gguf_file if gguf_file else Path(path))
        except GispError:
            pass
    for c in candidates:
        if c.suffix == ".gguf" and c.is_file():
            return c
        marker = c / "gisp_source.json"
        if marker.is_file():
            try:
                g = Path(json.loads(marker.read_text())["gguf"])
            except (json.JSONDecodeError, KeyError, OSError):
                continue
            if g.is_file():
                return g
    return None


def _copy_gguf_tokenizer(writer: gguf.GGUFWriter, source: Path, n_vocab: int) -> None:
    reader = gguf.GGUFReader(source)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise GispError(f"{source} has no tokenizer to copy")
    if len(tokens.data) != n_vocab:
        raise GispError(f"{source} has {len(tokens.data)} tokens but the model {n_vocab} embeddings")
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = f.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = f.types[-1]
            if sub == gguf.GGUFValueType.STRING:
                val: Any = [bytes(f.parts[i]) for i in f.data]
            else:
                val = [f.parts[i].tolist()[0] for i in f.data]
            writer.add_key_value(key, val, vtype, sub_type=sub)
        elif vtype == gguf.GGUFValueType.STRING:
            writer.add_key_value(key, bytes(f.parts[f.data[0]]), vtype)
        else:
            writer.add_key_value(key, f.parts[f.data[0]].tolist()[0], vtype)


def _hf_tokenizer(writer: gguf.GGUFWriter, path: Path, n_vocab: int) -> str | None:
    """Tokenizer fields from an HF tokenizer (llama.cpp converter's rules). Returns a note or None."""
    tj = path / "tokenizer.json"
    if not tj.is_file():
        raise GispError(f"{path} has no tokenizer.json: a GGUF file needs the model's tokenizer "
                        "(export from a model directory that has one)")
    spec = json.loads(tj.read_text(encoding="utf-8"))
    model_type = spec.get("model", {}).get("type")
    pre = json.dumps(spec.get("pre_tokenizer")) + json.dumps(spec.get("decoder"))
    note = None
    if model_type == "BPE" and "ByteLevel" in pre:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        vocab = tok.get_vocab()
        if max(vocab.values()) >= n_vocab:
            raise GispError(f"the tokenizer in {path} has ids beyond the model's {n_vocab} embeddings")
        chk = sha256(str(tok.encode(_CHK_TEXT)).encode()).hexdigest()
        tokpre = _PRE_TOKENIZERS.get(chk)
        if tokpre is None:
            tokpre = "default"
            note = f"pre-tokenizer not recognised (hash {chk[:12]}): written as 'default'"
        reverse = {i: t for t, i in vocab.items()}
        added = tok.get_added_vocab()
        decoder = tok.added_tokens_decoder
        tokens, types = [], []
        for i in range(n_vocab):
            if i not in reverse:
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
                continue
            t = reverse[i]
            if t in added:
                if i in decoder and not decoder[i].normalized:
                    t = tok.decode(tok.encode(t, add_special_tokens=False))
                special = (i in decoder and decoder[i].special) or (t.startswith("<|") and t.endswith("|>"))
                types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
            else:
                types.append(gguf.TokenType.NORMAL)
            tokens.append(t)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(tokpre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(path, load_merges=True, n_vocab=n_vocab)
        # what the HF tokenizer does, so llama.cpp tokenizes a text to the same ids
        probe = tok.encode("a")
        special.add_special_token["bos"] = tok.bos_token_id is not None and probe[:1] == [tok.bos_token_id]
        special.add_special_token["eos"] = tok.eos_token_id is not None and probe[-1:] == [tok.eos_token_id]
        special.add_to_gguf(writer, quiet=True)
        return note
    try:
        vocab = gguf.LlamaHfVocab(path)
    except Exception as e:  # not a SentencePiece-style tokenizer.json either
        raise GispError(f"the tokenizer in {path} ({model_type}) cannot be written as GGUF: byte-level BPE and "
                        f"SentencePiece-style tokenizers are supported ({type(e).__name__})") from e
    tokens, scores, types = [], [], []
    for text, score, ttype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(ttype)
    if len(tokens) > n_vocab:
        raise GispError(f"the tokenizer in {path} has {len(tokens)} tokens, the model {n_vocab} embeddings")
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(path, load_merges=False, n_vocab=n_vocab).add_to_gguf(writer, quiet=True)
    return note


# =============================================================================
# Writing one file
# =============================================================================


@dataclass
class GGUFResult:
    """One written GGUF file."""

    path: Path
    arch: str
    per_layer: bool
    outtype: str
    size_bytes: int
    params: int  # elements in the file (padding included)
    matmul_params: int  # weights multiplied per token (output matrix included, token lookup excluded)
    step: int | None = None
    sparsity: float | None = None
    layers: list[dict[str, int]] = field(default_factory=list, repr=False)
    notes: list[str] = field(default_factory=list)


def _cfg(config: Any, key: str, default: Any = None) -> Any:
    get = getattr(config, "_getattr_without_heterogeneous_validation", None)
    return get(key, default) if get is not None else getattr(config, key, default)


def _rope(config: Any) -> tuple[float, dict[str, Any]]:
    rp = _cfg(config, "rope_parameters", None) or _cfg(config, "rope_scaling", None) or {}
    rp = dict(rp.get("full_attention", rp)) if isinstance(rp, dict) else {}
    theta = rp.get("rope_theta", _cfg(config, "rope_theta", 10000.0))
    return float(theta), rp


def _rope_freqs(rp: dict[str, Any], theta: float, d: int) -> torch.Tensor:
    """Llama-3 rope scaling as a per-frequency factor tensor (as llama.cpp's converter writes it)."""
    freqs = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    factor = rp.get("factor", 8.0)
    lo, hi = rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0)
    old = rp.get("original_max_position_embeddings", 8192)
    lo_wave, hi_wave = old / lo, old / hi
    out = []
    for f in freqs.tolist():
        wave = 2 * math.pi / f
        if wave < hi_wave:
            out.append(1.0)
        elif wave > lo_wave:
            out.append(factor)
        else:
            smooth = (old / wave - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def _tensor_name(kind: MODEL_TENSOR, part: str, bid: int | None = None) -> str:
    base = gguf.TENSOR_NAMES[kind]
    return (base.format(bid=bid) if bid is not None else base) + f".{part}"


def write_gguf(
    model: torch.nn.Module,
    out: str | Path,
    *,
    outtype: str = "f32",
    record: dict[str, Any] | None = None,
    tokenizer_dir: str | Path | None = None,
    source_gguf: str | Path | None = None,
    name: str | None = None,
) -> GGUFResult:
    """Write an HF causal LM (plain or gisp per-layer export) as one GGUF file, atomically."""
    qtype, ftype = check_outtype(outtype)
    config = model.config
    fam = family_of(config.model_type)
    hidden = int(_cfg(config, "hidden_size"))
    d = int(_cfg(config, "head_dim", None) or hidden // int(_cfg(config, "num_attention_heads")))
    tied = bool(_cfg(config, "tie_word_embeddings", False))
    top, layers = _read_layers(model, fam, d)
    ff_multiple = gguf.GGML_QUANT_SIZES[qtype][0] if qtype not in (GGMLQuantizationType.F32,
                                                                    GGMLQuantizationType.F16,
                                                                    GGMLQuantizationType.BF16) else 1
    arch, permute, plans, notes = _plan(layers, fam, tied, ff_multiple,
                                        (lambda h: h * d == hidden) if fam.q_is_hidden else None)
    theta, rp = _rope(config)
    rope_type = str(rp.get("rope_type", rp.get("type", "default")) or "default").lower()
    if rope_type not in ("default", "linear", "llama3"):
        raise GispError(f"rope scaling '{rope_type}' cannot be written as GGUF by gisp (default, linear and llama3 "
                        "are supported)")
    if rope_type == "llama3" and arch == MODEL_ARCH.OPENELM:
        raise GispError("llama3 rope scaling cannot be expressed in llama.cpp's openelm graph")
    window = _cfg(config, "sliding_window", None) if _cfg(config, "use_sliding_window", True) else None
    n_ctx = int(_cfg(config, "max_position_embeddings", 4096))
    if window and int(window) < n_ctx:
        notes.append(f"sliding window of {window} tokens not written (llama.cpp's graph attends to the whole "
                     f"context): equal to the HF model up to {window} tokens of context")
    per_layer = arch != fam.arch
    arch_name = gguf.MODEL_ARCH_NAMES[arch]
    allowed = set(gguf.MODEL_TENSORS[arch])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    tmp = staging_name(out)
    n_vocab = top[MODEL_TENSOR.TOKEN_EMBD].shape[0]
    writer = gguf.GGUFWriter(tmp, arch_name)
    try:
        writer.add_name(name or str((record or {}).get("source", {}).get("name") or "gisp export"))
        writer.add_block_count(len(plans))
        writer.add_context_length(n_ctx)
        writer.add_embedding_length(hidden)
        heads = [p.heads for p in plans]
        kvs = [p.kv for p in plans]
        ffs = [p.n_ff for p in plans]
        writer.add_feed_forward_length(ffs if per_layer else ffs[0])
        writer.add_head_count(heads if per_layer else heads[0])
        writer.add_head_count_kv(kvs if per_layer else kvs[0])
        writer.add_key_length(d)
        writer.add_value_length(d)
        writer.add_rope_dimension_count(d)
        writer.add_rope_freq_base(theta)
        writer.add_layer_norm_rms_eps(float(_cfg(config, "rms_norm_eps")))
        writer.add_vocab_size(n_vocab)
        writer.add_file_type(int(ftype))
        if qtype not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if rope_type == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(rp["factor"]))
        # tokenizer and chat template
        if source_gguf is not None:
            _copy_gguf_tokenizer(writer, Path(source_gguf), n_vocab)
            tok_note = None
        elif tokenizer_dir is not None:
            tok_note = _hf_tokenizer(writer, Path(tokenizer_dir), n_vocab)
        else:
            raise GispError("a GGUF file needs the model's tokenizer: none was found next to the model")
        if tok_note:
            notes.append(tok_note)
        # provenance
        from gisp.version import __version__

        rec = dict(record or {})
        rec.pop("layers", None)
        writer.add_string("gisp.version", __version__)
        src = rec.get("source") or {}
        for key, val in (("gisp.source.name", src.get("name")), ("gisp.source.fingerprint", src.get("fingerprint")),
                         ("gisp.source.model_type", src.get("model_type"))):
            if val is not None:
                writer.add_string(key, str(val))
        if rec.get("step") is not None:
            writer.add_uint32("gisp.step", int(rec["step"]))
        if rec.get("sparsity") is not None:
            writer.add_float32("gisp.sparsity", float(rec["sparsity"]))
        writer.add_string("gisp.layout", json.dumps({"arch": arch_name, "heads": heads, "kv_heads": kvs,
                                                      "ffn": ffs, "notes": notes}))
        if rec:
            writer.add_string("gisp.export", json.dumps(rec, default=str))
        # tensors
        params = matmul = 0

        def add(kind: MODEL_TENSOR, part: str, t: torch.Tensor, bid: int | None = None) -> None:
            nonlocal params, matmul
            if kind not in allowed:
                raise GispError(f"internal error: llama.cpp's {arch_name} graph has no tensor {kind.name}")
            data, dtype = _encode(t, qtype)
            writer.add_tensor(_tensor_name(kind, part, bid), data, raw_dtype=dtype)
            params += t.numel()
            if t.dim() == 2 and kind != MODEL_TENSOR.TOKEN_EMBD:
                matmul += t.numel()

        add(MODEL_TENSOR.TOKEN_EMBD, "weight", top[MODEL_TENSOR.TOKEN_EMBD])
        add(MODEL_TENSOR.OUTPUT_NORM, "weight", top[MODEL_TENSOR.OUTPUT_NORM])
        if tied or MODEL_TENSOR.OUTPUT not in top:
            matmul += top[MODEL_TENSOR.TOKEN_EMBD].numel()
        else:
            add(MODEL_TENSOR.OUTPUT, "weight", top[MODEL_TENSOR.OUTPUT])
        if rope_type == "llama3":
            add(MODEL_TENSOR.ROPE_FREQS, "weight", _rope_freqs(rp, theta, d))
        qk_norm = any(MODEL_TENSOR.ATTN_Q_NORM in lay.attn for lay in layers)
        for i, (lay, plan) in enumerate(zip(layers, plans)):
            fused = fam.fused_qkv and per_layer
            for (kind, part), t in _layer_tensors(lay, plan, hidden, d, permute, fused, qk_norm).items():
                add(kind, part, t, i)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException as e:
        writer.close()
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full_error(out, e) from e
        raise
    layer_rows = [{"heads": p.heads, "kv_heads": p.kv, "ffn": p.n_ff, "zero_heads": sum(s is None for s in p.slots)}
                  for p in plans]
    return GGUFResult(out, arch_name, per_layer, outtype, out.stat().st_size, params, matmul,
                      (record or {}).get("step"), (record or {}).get("sparsity"), layer_rows, notes)


# =============================================================================
# From a run or an export directory
# =============================================================================


def _check_out(out: Path, overwrite: bool, inputs: Sequence[str | Path | None] = ()) -> None:
    """Before any model loads: a writable file name, not an input, replacing only a GGUF file of ours."""
    if out.is_dir():
        raise GispError(f"{out} is a directory: give a file name ending in .gguf")
    check_output_file(out, overwrite=overwrite, inputs=inputs)


def output_paths(out: str | Path, sparsities: Sequence[float] | None, n: int, outtype: str) -> list[Path]:
    """Where each level goes: ``--out m.gguf`` for one level; a directory or a name with ``{sparsity}``
    for several (``{sparsity}`` becomes the percentage, e.g. ``m-{sparsity}.gguf`` -> ``m-30.gguf``)."""
    out = Path(out).expanduser()
    labels = [f"{round(s * 100):02d}" for s in sparsities] if sparsities else [""] * n
    if "{sparsity}" in out.name:
        return [out.with_name(out.name.replace("{sparsity}", lab)) for lab in labels]
    if n == 1 and out.suffix == ".gguf":
        return [out]
    if out.suffix == ".gguf":
        raise GispError("several levels need --out DIR or a file name with {sparsity}, e.g. smol-{sparsity}.gguf")
    return [out / (f"{out.name}-s{lab}-{outtype}.gguf" if lab else f"{out.name}-{outtype}.gguf") for lab in labels]


def _is_run(path: Path) -> bool:
    return (path / "trajectory.json").is_file()


def export_gguf(
    source: str | Path,
    out: str | Path,
    *,
    sparsity: float | Sequence[float] | None = None,
    step: int | None = None,
    max_params: str | int | None = None,
    max_size_gb: float | None = None,
    outtype: str = "f32",
    gqa: str = "map",
    round_to: int | None = None,
    uniform: bool | str = False,
    overwrite: bool = False,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    reconstruct: str | None = None,
    recon_options: dict[str, Any] | None = None,
) -> list[GGUFResult]:
    """Write levels of a run (or one ``gisp export`` directory) as GGUF files for llama.cpp.

    ``source``: a run directory (``trajectory.json``) or an HF model directory written by
    ``gisp export`` (any supported HF directory works). For a run, give one of ``sparsity``
    (one value or several: one file each), ``step``, ``max_params`` or ``max_size_gb``.
    ``out``: the ``.gguf`` file; for several levels a directory or a name with ``{sparsity}``.
    ``max_size_gb`` counts the file's weights in ``outtype`` (about 1.06 bytes each in q8_0).
    ``reconstruct``/``recon_options``: each level is reconstructed as :func:`gisp.export.export` does
    (lsq changes weights only; biases go to llama.cpp's ``bo``/``ffn_down_b``, which ``llama`` and
    ``deci`` load; ``qwen3``/``openelm`` have none and are refused).
    """
    from gisp.deploy.export import export
    from gisp.loading import load_pretrained

    check_outtype(outtype)
    source = Path(source).expanduser()
    if not source.exists():
        raise GispError(f"{source} does not exist: give a run directory or a gisp export directory")
    sparsities = None
    if sparsity is not None:
        sparsities = [float(sparsity)] if isinstance(sparsity, int | float) else [float(s) for s in sparsity]
        if len(set(sparsities)) != len(sparsities):
            raise GispError("--sparsity lists a level twice")
    if not _is_run(source):
        if any(x is not None for x in (sparsity, step, max_params, max_size_gb, reconstruct)) or uniform or round_to:
            raise GispError(f"{source} is a model directory, not a run: level options apply to runs only")
        (path,) = output_paths(out, None, 1, outtype)
        _check_out(path, overwrite, [source])
        try:
            family_of(json.loads((source / "config.json").read_text()).get("model_type", "?"))
        except (OSError, json.JSONDecodeError) as e:
            raise GispError(f"{source} is neither a run (trajectory.json) nor a model directory (config.json)") from e
        loaded = load_pretrained(source, dtype="fp32", device="cpu", tokenizer=False)
        record = _read_record(source)
        res = _write_from_dir(loaded.model, source, path, outtype, record)
        return [res]
    from gisp.run.trajectory import Trajectory

    traj = Trajectory.load(source)
    n = len(sparsities) if sparsities else 1
    for s in sparsities or ():
        check_sparsity(traj, s)
    check_budget(max_params, max_size_gb)
    if max_size_gb is not None:  # the file's bytes: weights in the outtype (norms and zero padding aside)
        max_params, max_size_gb = max(1, int(max_size_gb * 1e9 / BYTES_PER_WEIGHT[outtype])), None
    paths = output_paths(out, sparsities, n, outtype)
    for p in paths:
        _check_out(p, overwrite, [source, traj.model.get("path")])
    if model is None:
        from gisp.loading import load_model

        name = traj.model.get("path") or traj.model.get("name")
        if not name or name == "model":
            raise GispError("this run does not record a loadable base model")
        saved = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(traj.model.get("weight_dtype"), "fp32")
        loaded = load_model(name, dtype=saved, device="cpu")
        model, tokenizer, base_path = loaded.model, tokenizer or loaded.tokenizer, loaded.path
    else:
        base_path = None
    family_of(model.config.model_type)
    results = []
    for k, path in enumerate(paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(path)
        work = staging_name(path)  # the intermediate HF export, in our staging pattern
        os.mkdir(work)
        try:
            res = export(source, work / "hf", model=model, tokenizer=tokenizer, gqa=gqa, round_to=round_to,
                         uniform=uniform, sparsity=sparsities[k] if sparsities else None, step=step,
                         max_params=max_params, max_size_gb=max_size_gb, reconstruct=reconstruct,
                         recon_options=recon_options)
            slim = load_pretrained(res.path, dtype="fp32", device="cpu", tokenizer=False).model
            src_gguf = _source_gguf(res.record, base_path)
            results.append(write_gguf(slim, path, outtype=outtype, record=res.record,
                                      tokenizer_dir=None if src_gguf else res.path, source_gguf=src_gguf,
                                      name=_file_name(res.record, outtype)))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return results


def _read_record(path: Path) -> dict[str, Any]:
    f = path / "gisp_export.json"
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except (json.JSONDecodeError, OSError):
        return {}


def _file_name(record: dict[str, Any], outtype: str) -> str:
    src = (record.get("source") or {}).get("name") or "model"
    s = record.get("sparsity")
    return f"{src} gisp" + (f" {s * 100:.0f}% sparse" if s is not None else "")


def _write_from_dir(model: torch.nn.Module, source: Path, path: Path, outtype: str, record: dict) -> GGUFResult:
    src_gguf = _source_gguf(record, source)
    return write_gguf(model, path, outtype=outtype, record=record or None,
                      tokenizer_dir=None if src_gguf else source, source_gguf=src_gguf,
                      name=_file_name(record, outtype) if record else source.name)


# =============================================================================
# Running a file in llama.cpp (xllamacpp)
# =============================================================================


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: token character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def partial_utf8_tokens(path: str | Path) -> list[int]:
    """Ids of normal tokens whose bytes are not complete UTF-8 (pieces of a multi-byte character).

    llama.cpp's server leaves such a token out of the logprobs it returns, so checks that need
    every generated token ban them (on both sides, which keeps greedy decoding comparable).
    """
    r = gguf.GGUFReader(path)
    model = r.fields["tokenizer.ggml.model"].contents()
    f, types = r.fields["tokenizer.ggml.tokens"], r.fields["tokenizer.ggml.token_type"].contents()
    dec = _byte_decoder()
    out = []
    for i, part in enumerate(f.data):
        if types[i] != gguf.TokenType.NORMAL and not (model == "llama" and types[i] == gguf.TokenType.BYTE):
            continue
        text = bytes(f.parts[part]).decode("utf-8", errors="replace")
        if model == "gpt2":
            raw = bytes(dec.get(c, 0) for c in text)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            raw = bytes([int(text[3:5], 16)])
        else:
            raw = text.encode()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            out.append(i)
    return out


class LlamaCpp:
    """A GGUF file loaded in llama.cpp (the ``xllamacpp`` build), for greedy completions.

    ``complete`` returns the generated token ids, each chosen token's logprob (llama.cpp's
    softmax of the raw logits), the text and llama.cpp's own timings. ``exact`` keeps the KV
    cache in f32 and turns flash attention off (llama.cpp's CPU defaults, an f16 KV cache and
    flash attention, round attention inputs to f16: about 1e-3 in logprobs), for exactness checks.
    """

    def __init__(self, path: str | Path, *, threads: int = 2, n_ctx: int = 512, exact: bool = False,
                 verbose: bool = False) -> None:
        try:
            import xllamacpp
        except ImportError as e:
            raise GispError("running GGUF files needs the package xllamacpp: pip install xllamacpp") from e
        p = xllamacpp.CommonParams()
        p.model.path = str(path)
        p.n_ctx = n_ctx
        p.n_batch = p.n_ubatch = n_ctx
        p.cpuparams.n_threads = threads
        p.cpuparams_batch.n_threads = threads
        p.warmup = False
        if not verbose:
            p.verbosity = -1
        if exact:  # llama.cpp's CPU flash attention and its default f16 KV cache round to f16
            p.flash_attn_type = xllamacpp.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
            p.cache_type_k = xllamacpp.ggml_type.GGML_TYPE_F32
            p.cache_type_v = xllamacpp.ggml_type.GGML_TYPE_F32
        try:
            self.server = xllamacpp.Server(p)
        except Exception as e:
            why = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise GispError(f"llama.cpp refused {path}: {why}") from e

    def complete(self, prompt: str | Sequence[int], max_tokens: int = 32, *, n_probs: int = 1,
                 banned: Sequence[int] = ()) -> dict[str, Any]:
        body: dict[str, Any] = {"prompt": prompt if isinstance(prompt, str) else [int(t) for t in prompt],
                                "n_predict": max_tokens, "temperature": 0, "n_probs": n_probs,
                                "cache_prompt": False}
        if banned:
            body["logit_bias"] = [[int(t), False] for t in banned]
        r = self.server.handle_completions(body)
        if not isinstance(r, dict) or "choices" not in r:
            raise GispError(f"llama.cpp failed to complete: {str(r)[:200]}")
        content = (r["choices"][0].get("logprobs") or {}).get("content") or []
        n_gen = (r.get("usage") or {}).get("completion_tokens", len(content))
        if n_probs and len(content) != n_gen:
            raise GispError(f"llama.cpp reported {len(content)} of {n_gen} generated tokens (a token that is part "
                            "of a UTF-8 character has no logprob entry): ban partial_utf8_tokens()")
        return {"ids": [c["id"] for c in content], "logprobs": [c["logprob"] for c in content],
                "top": [c.get("top_logprobs", []) for c in content], "text": r["choices"][0]["text"],
                "timings": r.get("timings", {}), "usage": r.get("usage", {})}

    def close(self) -> None:
        self.server = None

    def __enter__(self) -> LlamaCpp:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@torch.no_grad()
def compare_with_hf(path: str | Path, model: torch.nn.Module, prompt: str | Sequence[int], n_tokens: int = 32, *,
                    tokenizer: Any = None, exact: bool = True, banned: Sequence[int] = (),
                    partial: Sequence[int] | None = None, threads: int = 2) -> dict[str, Any]:
    """llama.cpp's greedy continuation of ``prompt`` checked against the HF ``model``, teacher-forced.

    One HF forward pass over the prompt and llama.cpp's tokens gives, at every generated
    position, HF's greedy token (``banned`` ids and :func:`partial_utf8_tokens` excluded, as
    llama.cpp excludes them) and its logprob of llama.cpp's token (``partial``: those ids when
    known, which saves reading them from the file). ``same_prefix``: how many
    of llama.cpp's tokens HF's greedy decoding reproduces in a row (all of them: the two
    greedy continuations are equal);
    ``agreement``: the fraction of positions where the greedy tokens agree;
    ``max_abs_logprob_diff``/``mean_abs_logprob_diff``: over all positions.
    """
    partial = partial_utf8_tokens(path) if partial is None else partial
    banned = sorted(set(banned) | set(partial))
    if isinstance(prompt, str):
        if tokenizer is None:
            raise GispError("a text prompt needs the tokenizer")
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    else:
        prompt_ids = [int(t) for t in prompt]
    with LlamaCpp(path, exact=exact, threads=threads) as lc:
        got = lc.complete(prompt, n_tokens, banned=banned)
    n_prompt = got["usage"].get("prompt_tokens", len(prompt_ids))
    ids = torch.tensor([prompt_ids + got["ids"]])
    device = next(model.parameters()).device
    logits = model(input_ids=ids.to(device)).logits[0].double().cpu()
    lp = torch.log_softmax(logits, -1)
    masked = logits.clone()
    if banned:
        masked[:, list(banned)] = -math.inf
    start = len(prompt_ids) - 1
    hf_next = masked[start : start + len(got["ids"])].argmax(-1).tolist()
    agree = [a == b for a, b in zip(hf_next, got["ids"])]
    same_prefix = next((k for k, ok in enumerate(agree) if not ok), len(agree))
    diffs = [abs(lp[start + k, t].item() - got["logprobs"][k]) for k, t in enumerate(got["ids"])]
    return {"llama_ids": got["ids"], "hf_next": hf_next, "same_prefix": same_prefix,
            "agreement": sum(agree) / max(1, len(agree)), "n_tokens": len(agree),
            "max_abs_logprob_diff": max(diffs, default=0.0), "mean_abs_logprob_diff": sum(diffs) / max(1, len(diffs)),
            "prompt_tokens_llama": n_prompt, "prompt_tokens_hf": len(prompt_ids), "text": got["text"]}


# =============================================================================
# CLI
# =============================================================================
