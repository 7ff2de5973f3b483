"""LLM-Pruner (block-wise, without its LoRA recovery): element-wise first-order Taylor, same ratio per layer.

Follows LLM-Pruner (Ma et al., NeurIPS 2023; github horseee/LLM-Pruner,
``hf_prune.py --block_wise --pruner_type taylor --taylor param_first``):
importance of a structure = sum over its coupled weights of ``|w * dL/dw|``
(gradient of the calibration loss, one shot), heads (q/k/v rows + o columns;
q rows + o columns under GQA) and MLP channels (gate/up rows + down column)
pruned at the same ratio in every layer of a layer range. The README's
Llama-7B command prunes layers 4..29 of 32 (``--block_*_layer_start 4
--block_*_layer_end 30``): the first 4 and the last 2 layers are kept, mapped
here to ``protect_first = 4/32`` of the layers and ``protect_last`` = 2/32 of
them (rounded). Its pruning ratio applies to the pruned layers only; here the
per-layer ratio is chosen so the whole model reaches the parameter target.

Deviations: no post-training (the GISP paper compares without fine-tuning);
the calibration set is the shared one (LLM-Pruner uses 10 BookCorpus samples);
LLM-Pruner's Llama-3 branch prunes whole KV groups, here query heads are the
structures and a KV head goes with its last query head (as in GISP).
"""

from __future__ import annotations

from torch import nn

from gisp.architectures import layout_of
from gisp.baselines.base import MaskingMethod, Masks
from gisp.baselines.oneshot import taylor_scores
from gisp.baselines.selection import uniform_mask
from gisp.core.calibration import CalibrationSet
from gisp.core.structures import Layout


class LLMPruner(MaskingMethod):
    name = "llm-pruner"
    nested = False
    reference = "LLM-Pruner (NeurIPS 2023) github horseee/LLM-Pruner hf_prune.py, block-wise taylor param_first"
    defaults = {"first_fraction": 4 / 32, "last_fraction": 2 / 32, "autocast": "none", "batch_size": 8}

    def layout(self, model: nn.Module) -> Layout:
        n = model.config.num_hidden_layers
        last = max(1, round(self.opts["last_fraction"] * n)) if self.opts["last_fraction"] > 0 else 0
        return layout_of(model, self.opts["first_fraction"], min(last, n - 1))

    def masks(self, model: nn.Module, calib: CalibrationSet | None, layout: Layout,
              sparsities: list[float]) -> Masks:
        scores = taylor_scores(model, layout, calib, self.opts["batch_size"], self.opts["autocast"])
        masks = [(s, uniform_mask(scores, layout, s)) for s in sparsities]
        details = {s: {"protected_layers": sorted(layout.protected)} for s in sparsities}
        return Masks(masks, details=details)
