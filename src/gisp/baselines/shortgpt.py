"""ShortGPT: remove whole decoder layers with the lowest Block Influence.

Follows ShortGPT (Men et al., 2024, arXiv 2403.03853; community code
github sramshetty/ShortGPT ``short_gpt/metrics.py block_influence``):
``BI_l = 1 - E_tokens[cos(x_l, x_{l+1})]`` between a layer's input and output
hidden states on the calibration set (dense model); the layers with the lowest
BI are removed. A removed layer is a mask with all its heads and channels gone,
which makes it the identity on the residual stream, exactly like deleting it.
Layers are removed in BI order until the next would exceed the parameter
target, so the sparsity lands within one layer below it; the masks are nested.

Deviations: BI uses each decoder layer's own input/output (the community
code's HF ``hidden_states`` puts the final norm after the last layer) and the
mean over tokens (not the sum); removal is by parameter target rather than a
layer count.
"""

from __future__ import annotations

from torch import nn

from gisp.baselines.activations import block_influence
from gisp.baselines.base import MaskingMethod, Masks
from gisp.baselines.selection import layer_params
from gisp.core.calibration import CalibrationSet
from gisp.core.structures import Layout, Mask


class ShortGPT(MaskingMethod):
    name = "shortgpt"
    nested = True
    reference = "ShortGPT (arXiv 2403.03853), block influence as in github sramshetty/ShortGPT metrics.py"
    defaults = {"protect_first": 0.0, "protect_last": 0, "batch_size": 8}

    def masks(self, model: nn.Module, calib: CalibrationSet | None, layout: Layout,
              sparsities: list[float]) -> Masks:
        bi = block_influence(model, calib, self.opts["batch_size"])
        order = sorted(layout.prunable, key=lambda i: (bi[i], i))
        mask, pos, masks, details = Mask.dense(layout), 0, [], {}
        kept = mask.kept_params(layout)
        for s in sparsities:
            limit = (1.0 - s) * layout.dense_params
            while pos < len(order):
                i = order[pos]
                cost = layer_params(mask, layout, i)
                if kept - cost < limit - 1e-6:
                    break
                mask = mask.clone()
                mask.heads[i][:] = False
                mask.channels[i][:] = False
                kept -= cost
                pos += 1
            masks.append((s, mask))
            details[s] = {"removed_layers": sorted(order[:pos]), "block_influence": bi}
        return Masks(masks, details=details)
