"""Torch-Pruning (VainF/Torch-Pruning, CVPR 2023 DepGraph) as an external row: code not written here.

The library traces the model's dependency graph and slices coupled channels
physically with its ``MetaPruner``; this module only chooses its settings and
measures the result. Settings follow its LLM example
(``examples/LLMs/prune_llm.py``): ``GroupMagnitudeImportance(p=2,
group_reduction='mean')`` (or its ``GroupTaylorImportance``), local pruning
(``global_pruning=False``: the same ratio in every layer), ``num_heads`` of
q/k/v, ``prune_num_heads=True``, ``prune_head_dims=False`` (RoPE stays intact).

What it prunes here, precisely:

- MLP channels of every layer (gate/up rows, down columns), at one ratio;
- attention heads of every layer (q/k/v rows, o columns) only for MHA models.
  For GQA models (SmolLM2, Llama-3, Mistral, Qwen) Torch-Pruning 1.6 never
  finishes building the attention groups under transformers 5 (an endless loop
  in ``get_pruning_group`` through the RoPE/``repeat_kv`` ops, reported as
  VainF/Torch-Pruning#527), so q/k/v/o are left out and only MLP channels are
  pruned, at the ratio that reaches the parameter target;
- never the hidden (residual) width: o/down projection outputs and lm_head are
  ignored, unlike the example, so sparsity means the same as for every other row.

Sparsity is measured by counting the decoder linear parameters of the sliced
model; no protected layers (the example prunes all).
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import torch
from torch import nn

from gisp.architectures import get_architecture, layout_of
from gisp.baselines.base import Level, Method, OnLevel, Timer, check_sparsities, input_batches
from gisp.core.calibration import CalibrationSet
from gisp.core.objectives import get_objective
from gisp.core.structures import Layout
from gisp.errors import GispError

PIP = "pip install torch-pruning==1.6.1"


def linear_params(model: nn.Module) -> int:
    """Weights and biases of every decoder layer's q, k, v, o, gate, up, down (as sliced)."""
    arch = get_architecture(model)
    total = 0
    for layer in arch.layers(model):
        att, mlp = arch.attention(layer), arch.mlp(layer)
        for lin in (att.q, att.k, att.v, att.o, mlp.gate, mlp.up, mlp.down):
            total += lin.weight.numel() + (lin.bias.numel() if lin.bias is not None else 0)
    return total


def torch_pruning_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch-pruning")
    except PackageNotFoundError:
        return "not installed"


class TorchPruning(Method):
    name = "torch-pruning"
    nested = False
    reference = "Torch-Pruning (DepGraph, CVPR 2023) github VainF/Torch-Pruning examples/LLMs/prune_llm.py"
    defaults = {"importance": "magnitude", "batch_size": 8}

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "torch_pruning_version": torch_pruning_version(), "global_pruning": False,
                "prune_num_heads": "MHA only", "prune_head_dims": False, "hidden_width": "kept"}

    def run(self, model: nn.Module, calib: CalibrationSet, sparsities: list[float], *,
            model_info: dict[str, Any] | None = None, run_dir: str | None = None, progress: bool = False,
            on_level: OnLevel | None = None) -> list[Level]:
        try:
            import torch_pruning as tp
        except ImportError as e:
            raise GispError(f"method 'torch-pruning' needs the torch-pruning package: {PIP}") from e
        if self.opts["importance"] not in ("magnitude", "taylor"):
            raise GispError(f"torch-pruning importance must be magnitude or taylor, got '{self.opts['importance']}'")
        layout = layout_of(model)
        sparsities = check_sparsities(sparsities, layout)
        gqa = any(s.is_gqa for s in layout.layers)
        mlp_total = sum(3 * s.hidden * s.intermediate for s in layout.layers)
        levels = []
        for target in sparsities:
            timer = Timer()
            pruned = copy.deepcopy(model)
            plan = self._plan(layout, target, gqa, mlp_total)
            self._prune(tp, pruned, calib, plan)
            kept = linear_params(pruned)
            slack = layout.num_layers * (4 * layout.layers[0].head_dim + 3) * layout.layers[0].hidden
            if kept > (1.0 - target) * layout.dense_params + slack:
                raise GispError(f"torch-pruning removed only {1 - kept / layout.dense_params:.1%} of the parameters "
                                f"for a {target:.0%} target: its dependency graph missed the model's layers")
            arch = get_architecture(pruned)
            shapes = [(arch.attention(L).q.out_features // arch.head_dim,
                       arch.attention(L).k.out_features // arch.head_dim,
                       arch.mlp(L).gate.out_features) for L in arch.layers(pruned)]
            level = Level(target, 1.0 - kept / layout.dense_params, kept, model=pruned, details={
                "pruned": "MLP channels only (GQA heads unsupported by torch-pruning here)" if gqa
                else "attention heads and MLP channels", "plan": plan,
                "heads_per_layer": [h for h, _, _ in shapes], "kv_heads_per_layer": [k for _, k, _ in shapes],
                "channels_per_layer": [c for _, _, c in shapes], "seconds": timer.seconds,
            })
            levels.append(level)
            if on_level:
                on_level(level)
                level.model = None  # the caller has evaluated it; do not keep every copy alive
        return levels

    @staticmethod
    def _plan(layout: Layout, target: float, gqa: bool, mlp_total: int) -> dict[str, Any]:
        """Heads and channels to remove per layer so the whole model reaches ``target``."""
        s0 = layout.layers[0]
        if any(s != s0 for s in layout.layers):
            raise GispError("torch-pruning's local ratio needs identical layers; this model's layers differ")
        n = layout.num_layers
        heads = 0 if gqa else math.floor(target * s0.num_heads + 1e-9)
        head_cost = 4 * s0.head_dim * s0.hidden + (4 * s0.head_dim if s0.qkv_bias else 0)
        left = target * layout.dense_params - n * heads * head_cost
        channels = math.floor(left / n / (3 * s0.hidden) + 1e-9)
        if channels >= s0.intermediate:
            raise GispError(f"torch-pruning cannot reach sparsity {target} on this model "
                            f"({'MLP channels only, GQA' if gqa else 'heads and channels'})")
        return {"heads_per_layer": heads, "channels_per_layer": max(0, channels)}

    def _prune(self, tp, model: nn.Module, calib: CalibrationSet, plan: dict[str, Any]) -> None:
        with warnings.catch_warnings():
            self._prune_quiet(tp, model, calib, plan)

    def _prune_quiet(self, tp, model: nn.Module, calib: CalibrationSet, plan: dict[str, Any]) -> None:
        arch = get_architecture(model)
        cfg = model.config
        ignored: list[nn.Module] = [model.lm_head] if hasattr(model, "lm_head") else []
        num_heads: dict[nn.Module, int] = {}
        prune_heads = plan["heads_per_layer"] > 0
        for layer in arch.layers(model):
            att, mlp = arch.attention(layer), arch.mlp(layer)
            ignored += [att.o, mlp.down]  # keep the residual width
            if prune_heads:
                num_heads.update({att.q: arch.num_heads, att.k: arch.num_kv_heads, att.v: arch.num_kv_heads})
            else:
                ignored += [att.q, att.k, att.v]
        C, H, d = arch.intermediate_size, arch.num_heads, arch.head_dim
        if self.opts["importance"] == "taylor":
            importance = tp.importance.GroupTaylorImportance()
            self._gradients(model, calib)
        else:
            importance = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean")
        example = calib.samples[0][None, :16] if len(calib) else torch.zeros(1, 8, dtype=torch.long)
        for p in model.parameters():  # its tracer follows autograd: weights must require gradients
            p.requires_grad_(True)
        warnings.simplefilter("ignore")  # it warns about every RMSNorm weight it will not touch
        pruner = tp.pruner.MetaPruner(
            model, example_inputs=example.to(next(model.parameters()).device), importance=importance,
            forward_fn=lambda m, x: m(input_ids=x, use_cache=False).logits,
            global_pruning=False, pruning_ratio=max(0.0, (plan["channels_per_layer"] - 1e-6) / C),
            ignored_layers=ignored, num_heads=num_heads, prune_num_heads=prune_heads, prune_head_dims=False,
            head_pruning_ratio=max(0.0, (plan["heads_per_layer"] - 1e-6) / H) if prune_heads else 0.0,
        )
        for group in pruner.step(interactive=True):
            group.prune()
        for p in model.parameters():
            p.requires_grad_(False)
        model.zero_grad(set_to_none=True)
        first = arch.attention(arch.layers(model)[0])
        cfg.head_dim = d  # pin it before the head counts change
        for layer in arch.layers(model):
            att = arch.attention(layer)
            layer.self_attn.num_key_value_groups = (att.q.out_features // d) // (att.k.out_features // d)
        cfg.num_attention_heads = first.q.out_features // d
        cfg.num_key_value_heads = first.k.out_features // d
        cfg.intermediate_size = arch.mlp(arch.layers(model)[0]).gate.out_features

    def _gradients(self, model: nn.Module, calib: CalibrationSet) -> None:
        """Mean calibration-loss gradients for Torch-Pruning's Taylor importance."""
        obj = get_objective("lm")
        for p in model.parameters():
            p.requires_grad_(True)
        model.zero_grad(set_to_none=True)
        device = next(model.parameters()).device
        n = len(calib)
        for ids in input_batches(calib, self.opts["batch_size"]):
            (obj.sample_losses(model, {"input_ids": ids.to(device)}).sum() / n).backward()
        for p in model.parameters():
            p.requires_grad_(False)


class TorchPruningTaylor(TorchPruning):
    """The same external row with Torch-Pruning's own first-order ``GroupTaylorImportance``.

    Its LLM example's magnitude criterion collapses on SmolLM2 (see docs/results.md);
    this row shows what the library does with a gradient-based score (gradients of
    the mean calibration loss, fp32, computed on the copy it prunes).
    """

    name = "torch-pruning-taylor"
    defaults = {"importance": "taylor", "batch_size": 8}
