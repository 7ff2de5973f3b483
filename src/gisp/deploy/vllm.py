"""Serve in vLLM: a level of a run written for vLLM's own ``DeciLMForCausalLM``, exact, no custom model code.

``gisp export RUN --sparsity S --format vllm --out DIR`` (or an existing
Hugging Face export as RUN) writes a directory that a released vLLM serves
with ``vllm serve DIR`` / ``vllm.LLM(DIR)`` once gisp is installed in vLLM's
environment (``pip install gisp[vllm]``): gisp's vLLM plugin
(:mod:`gisp_vllm`) registers the config, the model class is vLLM's.

The target class (vLLM's ``nemotron_nas.py``, made for NVIDIA's pruned
Nemotron models) reads per-layer ``block_configs``:

- ``attention.no_op`` / ``ffn.no_op``: the block is absent (no tensors);
- ``attention.n_heads_in_group``: every attending layer has the global
  ``num_attention_heads`` query heads and ``num_attention_heads //
  n_heads_in_group`` KV heads, query head ``i`` reading KV head ``i //
  n_heads_in_group``;
- ``ffn.intermediate_size``: the MLP's exact width (no ``ffn_mult``, so no
  rounding to 256).

Padding, only where that class requires it, all exact:

- query heads: a layer with fewer heads gets zero q rows and zero o-projection
  columns (a zero query attends uniformly, and its output is multiplied by
  zero columns);
- KV heads: each kept KV head takes ``ceil(its query heads / group)`` KV
  slots (duplicated when a group spills over), unused slots hold zero k/v
  rows; the group size is the largest that divides ``num_attention_heads``
  and fits, so the KV cache stays as small as the class allows;
- ``num_attention_heads`` is chosen between the largest kept head count and
  the base model's to minimise the padded attention weights;
- the first non-empty layer may not lack attention (vLLM's DeciLM starts its
  residual stream there): it then gets a zero attention block (one KV head,
  unit norm weight), whose output is zero.

MLPs are never padded. ``gisp_export.json`` records per layer what was padded,
the true (unpadded) parameter count and the count written.

The config has model type ``gisp_decilm``: transformers without gisp refuses
it rather than building a plain Llama of the wrong shapes. After ``import gisp``,
``AutoModelForCausalLM`` / ``gisp.load_pretrained`` (and :func:`load_transformers`)
build the equivalent transformers model (gisp's per-layer classes with the
padded widths), which the tests compare with the unpadded export.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PreTrainedModel

from gisp.architectures import architecture_class
from gisp.errors import GispError
from gisp.outputs import check_output_dir, remove_stale, staged, staging_name
from gisp_vllm import ARCHITECTURE, MODEL_TYPE, GispDeciLMConfig, register

register()  # import gisp: AutoConfig reads vLLM exports too

EXPORT_FILE = "gisp_export.json"
VLLM_FORMAT = 1
_TOKENIZER_PREFIXES = ("tokenizer", "special_tokens", "chat_template", "vocab", "merges", "generation_config")


# =============================================================================
# Families: what each source architecture needs from DeciLM's Llama attention
# =============================================================================


@dataclass(frozen=True)
class Family:
    """How a source family maps onto vLLM's DeciLM (Llama attention and MLP).

    ``qkv_bias``: the family always has q/k/v biases and no o-projection bias
    (written as DeciLM's ``qkv_bias``); otherwise ``attention_bias`` (q/k/v and
    o together) is the source's. ``sliding_window``: config keys that, when
    set, ask for sliding-window attention, which DeciLM does not implement.
    ``unsupported``: why the family cannot be written at all.
    """

    qkv_bias: bool = False
    sliding_window: tuple[str, ...] = ()
    unsupported: str | None = None


# HF model_type -> family facts (to move into gisp/architectures/<family>.py)
FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(sliding_window=("sliding_window",)),
    "qwen2": Family(qkv_bias=True, sliding_window=("use_sliding_window",)),
    "qwen3": Family(unsupported="its per-head q/k RMSNorm (q_norm, k_norm) has no place in vLLM's DeciLMForCausalLM"),
}


def family_of(config: dict[str, Any]) -> tuple[str, Family]:
    """The source family of an export's ``config.json`` (``gisp_<arch>`` or plain ``<arch>``), checked."""
    model_type = str(config.get("model_type", ""))
    arch = model_type.removeprefix("gisp_")
    fam = FAMILIES.get(arch)
    if fam is None:
        raise GispError(f"--format vllm supports {', '.join(k for k, f in FAMILIES.items() if not f.unsupported)} "
                        f"models, not '{model_type}'")
    if fam.unsupported:
        raise GispError(f"--format vllm cannot write a {arch} model: {fam.unsupported}; use the Hugging Face export")
    for key in fam.sliding_window:
        value = config.get(key)
        if value and (key != "sliding_window" or value < config.get("max_position_embeddings", 0)):
            raise GispError(f"this {arch} model uses sliding-window attention ({key}={value}), which vLLM's "
                            "DeciLMForCausalLM does not implement: use the Hugging Face export")
    return arch, fam


# =============================================================================
# The plan: how each layer's heads are laid out in DeciLM's fixed-width attention
# =============================================================================


@dataclass
class LayerLayout:
    """One layer as written: query slots, KV slots and what each holds.

    ``q_slots[p]`` is the source query head in padded position ``p`` (``None``:
    zero padding); ``kv_slots[t]`` the source KV head in KV slot ``t``
    (``None``: zero padding; repeats are duplicates). Position ``p`` reads KV
    slot ``p // group``.
    """

    attention: bool
    q_heads: int = 0
    kv_heads: int = 0
    group: int = 0
    q_slots: list[int | None] = field(default_factory=list)
    kv_slots: list[int | None] = field(default_factory=list)
    residual_pad: bool = False  # a zero attention block written only for vLLM's residual start
    channels: int = 0

    def record(self) -> dict[str, Any]:
        kv_dup = len(self.kv_slots) - len({j for j in self.kv_slots if j is not None}) - self.kv_slots.count(None)
        return {"attention": self.attention, "q_heads": self.q_heads, "kv_heads": self.kv_heads,
                "n_heads_in_group": self.group or None, "q_pad": self.q_slots.count(None),
                "kv_slots": len(self.kv_slots), "kv_pad": self.kv_slots.count(None), "kv_dup": kv_dup,
                "residual_pad": self.residual_pad, "channels": self.channels}


def _groups(q_heads: int, kv_heads: int, kv_map: list[int] | None) -> list[list[int]]:
    """Query heads of each KV head, in order."""
    if kv_map is None:
        per = q_heads // kv_heads
        kv_map = [i // per for i in range(q_heads)]
    out: list[list[int]] = [[] for _ in range(kv_heads)]
    for i, j in enumerate(kv_map):
        out[j].append(i)
    return out


def _best_group(groups: list[list[int]], n_heads: int) -> int | None:
    """Largest group size dividing ``n_heads`` into which these KV groups fit (fewest KV slots)."""
    for g in sorted((d for d in range(1, n_heads + 1) if n_heads % d == 0), reverse=True):
        if sum(math.ceil(len(q) / g) for q in groups) <= n_heads // g:
            return g
    return None


def _lay_out(groups: list[list[int]], n_heads: int, g: int) -> tuple[list[int | None], list[int | None]]:
    q_slots: list[int | None] = [None] * n_heads
    kv_slots: list[int | None] = [None] * (n_heads // g)
    t = 0
    for j, qs in enumerate(groups):
        for r, qh in enumerate(qs):
            slot = t + r // g
            kv_slots[slot] = j
            q_slots[slot * g + r % g] = qh
        t += math.ceil(len(qs) / g)
    return q_slots, kv_slots


@dataclass
class Plan:
    num_attention_heads: int
    layers: list[LayerLayout]


def plan_layout(specs: list[dict[str, Any]], base_heads: int) -> Plan:
    """Choose ``num_attention_heads`` and lay out every layer (see the module docstring).

    ``specs``: per layer ``heads``, ``kv_heads``, ``kv_map`` (or None),
    ``channels`` (0: no MLP). Cost minimised: padded q/o plus k/v head slots
    over all attending layers (ties: fewer KV slots, then more heads).
    """
    attending = [s for s in specs if s["heads"]]
    groups = [_groups(s["heads"], s["kv_heads"], s["kv_map"]) for s in attending]
    lo = max((s["heads"] for s in attending), default=1)
    best = None
    for n in range(lo, max(base_heads, lo) + 1):
        gs = [_best_group(gr, n) for gr in groups]
        if any(g is None for g in gs):
            continue
        kv = sum(n // g for g in gs)
        key = (2 * n * len(attending) + 2 * kv, kv, -n)
        if best is None or key < best[0]:
            best = (key, n, gs)
    assert best is not None  # n = max heads with group 1 always fits
    _, n, gs = best
    out, it = [], iter(zip(groups, gs))
    started = False
    for s in specs:
        if s["heads"]:
            gr, g = next(it)
            q_slots, kv_slots = _lay_out(gr, n, g)
            out.append(LayerLayout(True, s["heads"], s["kv_heads"], g, q_slots, kv_slots, channels=s["channels"]))
        elif s["channels"] and not started:  # DeciLM's residual stream begins at the first attention
            out.append(LayerLayout(True, 0, 0, n, [None] * n, [None], residual_pad=True, channels=s["channels"]))
        else:
            out.append(LayerLayout(False, channels=s["channels"]))
        started = started or bool(s["heads"] or s["channels"])
    return Plan(n, out)


# =============================================================================
# Reading an export, writing the vLLM directory
# =============================================================================


def _layer_specs(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-layer widths from an export's ``config.json`` (global values plus ``per_layer_config``)."""
    overrides = {int(k): v for k, v in (config.get("per_layer_config") or {}).items()}
    out = []
    for i in range(config["num_hidden_layers"]):
        lc = {**config, **overrides.get(i, {})}
        skip = set(lc.get("skip") or [])
        heads = 0 if "self_attn" in skip else int(lc["num_attention_heads"])
        out.append({"heads": heads, "kv_heads": int(lc["num_key_value_heads"] or lc["num_attention_heads"]) if heads
                    else 0, "kv_map": lc.get("kv_head_map") if heads else None,
                    "channels": 0 if "mlp" in skip else int(lc["intermediate_size"])})
    return out


def _slots(t: torch.Tensor | None, slots: list[int | None], head_dim: int, tail: tuple[int, ...],
           dtype: torch.dtype) -> torch.Tensor:
    """Rows of ``t`` regrouped by head: position ``p`` holds source head ``slots[p]``, or zeros."""
    new = torch.zeros((len(slots) * head_dim, *tail), dtype=dtype)
    for pos, src in enumerate(slots):
        if src is not None:
            new[pos * head_dim:(pos + 1) * head_dim] = t[src * head_dim:(src + 1) * head_dim]
    return new


@torch.no_grad()
def padded_state_dict(state: dict[str, torch.Tensor], plan: Plan, head_dim: int, hidden: int, *,
                      qkv_bias: bool = False, o_bias: bool = False,
                      prefix: str = "model.layers") -> dict[str, torch.Tensor]:
    """The export's tensors laid out as ``plan`` says (padding zero, duplicates copied).

    ``qkv_bias`` / ``o_bias``: the attention has those biases (a zero attention block gets zero ones).
    """
    dtype = state["model.embed_tokens.weight"].dtype
    out = {k: v for k, v in state.items() if not k.startswith(prefix + ".")}
    names = architecture_class("llama").projection_names  # vLLM's DeciLM layers use Llama's module names
    for i, lay in enumerate(plan.layers):
        p = f"{prefix}.{i}"
        mine = {k[len(p) + 1:]: v for k, v in state.items() if k.startswith(p + ".")}
        if "skipped_attn_bias" in mine or "skipped_mlp_bias" in mine:
            raise GispError(f"layer {i} keeps the output bias of a removed block (bias compensation): vLLM's "
                            "DeciLMForCausalLM has no place for it; serve the Hugging Face export instead")
        for name, v in mine.items():
            if name.startswith(("mlp.", "post_attention_layernorm.")):
                out[f"{p}.{name}"] = v
        if not lay.attention:
            continue
        if lay.residual_pad:
            mine = {"input_layernorm.weight": torch.ones(hidden, dtype=dtype),
                    f"{names['o']}.weight": torch.zeros(hidden, 0, dtype=dtype)}
            if o_bias:
                mine[f"{names['o']}.bias"] = torch.zeros(hidden, dtype=dtype)
        out[f"{p}.input_layernorm.weight"] = mine["input_layernorm.weight"]
        for proj, slots in ((names["q"], lay.q_slots), (names["k"], lay.kv_slots), (names["v"], lay.kv_slots)):
            out[f"{p}.{proj}.weight"] = _slots(mine.get(f"{proj}.weight"), slots, head_dim, (hidden,), dtype)
            if qkv_bias or f"{proj}.bias" in mine:
                out[f"{p}.{proj}.bias"] = _slots(mine.get(f"{proj}.bias"), slots, head_dim, (), dtype)
        o = mine[f"{names['o']}.weight"].t()
        out[f"{p}.{names['o']}.weight"] = _slots(o, lay.q_slots, head_dim, (hidden,), dtype).t().contiguous()
        if f"{names['o']}.bias" in mine:
            out[f"{p}.{names['o']}.bias"] = mine[f"{names['o']}.bias"]
    return out


def _decilm_config(config: dict[str, Any], arch: str, fam: Family, plan: Plan) -> GispDeciLMConfig:
    base = {k: v for k, v in config.items() if k not in (
        "model_type", "architectures", "transformers_version", "_name_or_path", "per_layer_config", "kv_head_map",
        "auto_map", "skip", "dtype", "torch_dtype")}
    # family keys that LlamaConfig does not know stay out (they are the source's, recorded in gisp_export.json)
    base = {k: v for k, v in base.items() if k in GispDeciLMConfig.__dataclass_fields__ or k in (
        "bos_token_id", "eos_token_id", "pad_token_id")}
    blocks = []
    for lay in plan.layers:
        att = ({"no_op": False, "n_heads_in_group": lay.group, "replace_with_linear": False} if lay.attention
               else {"no_op": True, "replace_with_linear": False})
        ffn = ({"no_op": False, "intermediate_size": lay.channels, "replace_with_linear": False} if lay.channels
               else {"no_op": True, "replace_with_linear": False})
        blocks.append({"attention": att, "ffn": ffn})
    kv = max((len(lay.kv_slots) for lay in plan.layers if lay.attention), default=1)
    base.update(num_attention_heads=plan.num_attention_heads, num_key_value_heads=kv,
                intermediate_size=max((lay.channels for lay in plan.layers), default=1) or 1,
                head_dim=int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]),
                block_configs=blocks, gisp_source_model_type=arch)
    if fam.qkv_bias:
        base.update(qkv_bias=True, attention_bias=False)
    cfg = GispDeciLMConfig(**base)
    cfg.architectures = [ARCHITECTURE]
    dtype = config.get("dtype") or config.get("torch_dtype")
    if dtype:
        cfg.dtype = dtype
    return cfg


_README = """# gisp export for vLLM

Written by `gisp export --format vllm` (gisp {version}): {source}, step {step}, sparsity {sparsity}.
Model type `{model_type}`, served by vLLM's own `{arch}` class; gisp's vLLM plugin registers the config.

```bash
pip install "gisp[vllm]"        # gisp in vLLM's environment: vLLM loads its plugin at start-up
vllm serve {name}               # or: vllm.LLM(model="{name}")
```

transformers alone cannot load this directory (unknown model type `{model_type}`); load the Hugging Face
export of the same level instead (`gisp export RUN --sparsity S --out DIR`). `gisp_export.json` records
the padding this format needs and the true parameter count.
"""


def _read_json(path: Path) -> dict[str, Any]:
    """An export's JSON file, or one line saying it is damaged."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GispError(f"{path} is not valid JSON ({e}): re-export the model") from e
    if not isinstance(d, dict):
        raise GispError(f"{path} does not hold a JSON object: re-export the model")
    return d


def write_vllm(hf_export: str | Path, out: str | Path, *, overwrite: bool = False,
               dtype: str | None = None, keep_source: bool = True) -> dict[str, Any]:
    """Write the vLLM directory for a Hugging Face export (gisp per-layer or plain); returns its record.

    ``keep_source=False``: the HF export is a temporary one, so the record does not point to it."""
    from safetensors.torch import save_file

    from gisp.loading import DTYPES, load_pretrained

    src = Path(hf_export)
    out = check_output_dir(out, overwrite=overwrite, inputs=[src])
    if not (src / "config.json").is_file():
        raise GispError(f"{src} is neither a pruning run nor an exported model directory")
    config = _read_json(src / "config.json")
    if config.get("model_type") == MODEL_TYPE:
        raise GispError(f"{src} is already a vLLM export")
    arch, fam = family_of(config)
    if dtype is not None and dtype not in DTYPES:
        raise GispError(f"unknown dtype '{dtype}': use one of {', '.join(DTYPES)}")
    stored = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(
        str(config.get("dtype") or config.get("torch_dtype")), "fp32")
    loaded = load_pretrained(src, dtype=dtype or stored, device="cpu", tokenizer=False)
    model = loaded.model
    true_params = sum(p.numel() for p in model.parameters())
    state = {k: v.detach() for k, v in model.state_dict().items()}
    tied = bool(config.get("tie_word_embeddings"))
    if tied:
        state.pop("lm_head.weight", None)
    specs = _layer_specs(config)
    head_dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    plan = plan_layout(specs, int(config["num_attention_heads"]))
    o_bias = bool(config.get("attention_bias")) and not fam.qkv_bias
    padded = padded_state_dict(state, plan, head_dim, int(config["hidden_size"]),
                               qkv_bias=fam.qkv_bias or o_bias, o_bias=o_bias)
    written = sum(v.numel() for v in padded.values())
    cfg = _decilm_config(config, arch, fam, plan)
    cfg.dtype = str(next(iter(padded.values())).dtype).replace("torch.", "")

    record = _read_json(src / EXPORT_FILE) if (src / EXPORT_FILE).is_file() else {}
    kv_true = sum(s["kv_heads"] for s in specs)
    kv_written = sum(len(lay.kv_slots) for lay in plan.layers if lay.attention)
    record["vllm"] = {
        "format": VLLM_FORMAT,
        "model_type": MODEL_TYPE,
        "architecture": ARCHITECTURE,
        "source_export": str(src.resolve()) if keep_source else None,
        "source_model_type": config.get("model_type"),
        "num_attention_heads": plan.num_attention_heads,
        "params_true": true_params,
        "params_written": written,
        "params_padding": written - true_params,
        "kv_heads_true": kv_true,
        "kv_heads_written": kv_written,
        "padding": "zero q rows / o-projection columns, zero or duplicated k/v rows; MLPs exact (see gisp.deploy.vllm)",
        "layers": [lay.record() for lay in plan.layers],
    }
    with staged(out) as tmp:
        save_file({k: v.contiguous() for k, v in padded.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        cfg.save_pretrained(tmp)
        for f in src.iterdir():
            if f.is_file() and f.name.startswith(_TOKENIZER_PREFIXES):
                shutil.copy2(f, tmp / f.name)
        _write_record(tmp / EXPORT_FILE, record)
        from gisp.version import __version__

        (tmp / "README.md").write_text(_README.format(
            version=__version__, source=(record.get("source") or {}).get("name") or src.name,
            step=record.get("step", "?"), sparsity=f"{record['sparsity']:.4f}" if "sparsity" in record else "?",
            model_type=MODEL_TYPE, arch=ARCHITECTURE, name=out.name))
    return record


def _write_record(path: Path, rec: dict[str, Any]) -> None:
    """JSON with one line per layer entry (as gisp.export writes it)."""
    def layers_inline(obj: Any, indent: int) -> str:
        pad = " " * indent
        if isinstance(obj, dict):
            items = []
            for k, v in obj.items():
                if k == "layers" and isinstance(v, list):
                    body = ",\n".join(pad + "  " + json.dumps(x, separators=(",", ":")) for x in v)
                    items.append(f'{pad} {json.dumps(k)}: [\n{body}\n{pad} ]')
                else:
                    items.append(f"{pad} {json.dumps(k)}: {layers_inline(v, indent + 1).lstrip()}")
            return "{\n" + ",\n".join(items) + "\n" + pad + "}"
        return json.dumps(obj)

    path.write_text(layers_inline(rec, 0) + "\n")


@dataclass
class VllmExportResult:
    path: Path
    step: int | None
    sparsity: float | None
    params_true: int
    params_written: int
    kv_heads_true: int
    kv_heads_written: int
    record: dict[str, Any] = field(repr=False, default_factory=dict)


def _run_model_path(run: Path | None) -> str | None:
    """The base model a run directory records (an input no output may overwrite)."""
    if run is None or not (run / "trajectory.json").is_file():
        return None
    try:
        return (json.loads((run / "trajectory.json").read_text()).get("model") or {}).get("path")
    except (OSError, ValueError, AttributeError):
        return None


def is_export_dir(path: str | Path) -> bool:
    """A model directory (``config.json``) rather than a pruning run (``trajectory.json``)."""
    p = Path(path)
    return (p / "config.json").is_file() and not (p / "trajectory.json").is_file()


def export_vllm(run: str | Path | Any, out: str | Path, *, overwrite: bool = False, dtype: str | None = None,
                **level: Any) -> VllmExportResult:
    """One level of a run (``level``: the options of :func:`gisp.export.export`), or an existing Hugging
    Face export directory, written for vLLM (see the module docstring)."""
    from gisp.deploy.export import export

    run_path = None if hasattr(run, "steps") else Path(run)
    out = check_output_dir(out, overwrite=overwrite, inputs=[run_path, _run_model_path(run_path)])
    if run_path is not None and is_export_dir(run_path):
        chosen = {k: v for k, v in level.items() if v not in (None, False) and k not in ("model", "tokenizer")}
        if chosen:
            raise GispError(f"{run} is an exported model: its level is fixed, drop {', '.join(sorted(chosen))}")
        rec = write_vllm(run, out, overwrite=overwrite, dtype=dtype)
    else:
        level.pop("gqa", None)  # the vLLM layout makes its own KV groups from the export's map form
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(out)
        work = staging_name(out)  # the intermediate HF export: our staging pattern, so a kill leaves no orphan
        os.mkdir(work)
        try:
            export(run, work / "hf", gqa="map", dtype=dtype, **level)
            rec = write_vllm(work / "hf", out, overwrite=overwrite, keep_source=False)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    v = rec["vllm"]
    return VllmExportResult(out, rec.get("step"), rec.get("sparsity"), v["params_true"], v["params_written"],
                            v["kv_heads_true"], v["kv_heads_written"], rec)


# =============================================================================
# The same model in transformers (tests, and a check without vLLM)
# =============================================================================


def transformers_config(config: GispDeciLMConfig) -> Any:
    """A gisp per-layer config (``gisp_<source>``) with the padded widths: DeciLM's computation in transformers."""
    arch = config.gisp_source_model_type or "llama"
    d = config.to_dict()
    for k in ("model_type", "architectures", "transformers_version", "_name_or_path", "block_configs", "qkv_bias",
              "gisp_source_model_type", "dtype", "torch_dtype"):
        d.pop(k, None)
    per_layer = {}
    for i, b in enumerate(config.block_configs):
        att, ffn = b.attention, b.ffn
        o: dict[str, Any] = {}
        skip = []
        if att.no_op:
            skip.append("self_attn")
        else:
            o.update(num_attention_heads=config.num_attention_heads,
                     num_key_value_heads=config.num_attention_heads // att.n_heads_in_group)
        if ffn.no_op:
            skip.append("mlp")
        else:
            o["intermediate_size"] = ffn.intermediate_size
        if skip:
            o["skip"] = skip
        per_layer[i] = o
    if arch == "llama" and config.qkv_bias:
        raise GispError("a llama-family vLLM export with qkv_bias only is not expected")
    return AutoConfig.for_model(f"gisp_{arch}", **d, per_layer_config=per_layer)


def load_transformers(path: str | Path, *, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A vLLM export as a transformers model (gisp's per-layer classes, padded widths), for checks without vLLM."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    if config.model_type != MODEL_TYPE:
        raise GispError(f"{path} is not a vLLM export (model type {config.model_type})")
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(f)))
    dtype = dtype or next(iter(state.values())).dtype
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(transformers_config(config), dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise GispError(f"{path}: weights do not match the config (missing {sorted(set(missing) - tied)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]})")
    if tied:
        model.tie_weights()
    return model.to(dtype).eval()


class GispDeciLMForCausalLM(PreTrainedModel):
    """``AutoModelForCausalLM`` entry for ``gisp_decilm`` (after ``import gisp``): builds the equivalent
    transformers model (see :func:`load_transformers`), so ``gisp.load_pretrained`` and ``gisp eval`` read
    a vLLM export too. Never instantiated itself."""

    config_class = GispDeciLMConfig

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        raise GispError("build a vLLM export with AutoModelForCausalLM.from_config / from_pretrained, "
                        "or gisp.deploy.vllm.load_transformers")

    @classmethod
    def _from_config(cls, config: Any, **kwargs: Any) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_config(transformers_config(config), **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> torch.nn.Module:
        dtype = kwargs.get("dtype")
        return load_transformers(pretrained_model_name_or_path, dtype=dtype if isinstance(dtype, torch.dtype) else None)


def _register_model() -> None:
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.register(GispDeciLMConfig, GispDeciLMForCausalLM, exist_ok=True)


_register_model()

__all__ = ["FAMILIES", "Family", "GispDeciLMForCausalLM", "LayerLayout", "Plan", "VllmExportResult", "export_vllm",
           "family_of", "is_export_dir", "load_transformers", "padded_state_dict", "plan_layout", "transformers_config",
           "write_vllm"]
