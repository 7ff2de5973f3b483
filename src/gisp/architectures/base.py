"""What gisp needs to know about a model family, behind one abstract class.

An :class:`Architecture` answers every question the rest of gisp asks about a
family: where the decoder layers and their q/k/v/o and gate/up/down projections
are, which modules make up the attention and MLP blocks (their norms included),
which output biases the family can carry, and which model classes a per-layer
export of it uses. One subclass per family lives in its own module of this
package (the SliceGPT pattern); nothing outside the package spells a module
name of a model family.

The default implementation fits the Llama module layout
(``model.layers[i].self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``);
families override what differs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from gisp.core.structures import LayerShape, Layout, Mask, block_rows, protected_layers
from gisp.errors import GispError


@dataclass(frozen=True)
class AttentionProjections:
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear


@dataclass(frozen=True)
class MLPProjections:
    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear


class PerLayerConfigMixin:
    """Checks of a per-layer config (``per_layer_config``; ``head_dim`` always explicit).

    Each layer may override ``num_attention_heads``, ``num_key_value_heads``,
    ``intermediate_size``, ``skip`` (``self_attn`` / ``mlp``: the block is
    absent) and ``kv_head_map`` (query head ``i`` reads KV head ``kv_head_map[i]``,
    for uneven GQA groups). Mixed into each family's per-layer config class.
    """

    def validate_architecture(self) -> None:
        for i, lc in enumerate(self.per_layer_config):
            h, kv = lc.num_attention_heads, lc.num_key_value_heads
            skip = set(getattr(lc, "skip", []) or [])
            if "self_attn" in skip:
                continue
            kv_map = getattr(lc, "kv_head_map", None)
            if h < 1 or kv < 1:
                raise ValueError(f"layer {i}: attention needs at least one head, or skip=['self_attn']")
            if kv_map is not None:
                if len(kv_map) != h or sorted(set(kv_map)) != list(range(kv)):
                    raise ValueError(f"layer {i}: kv_head_map must give each of {h} query heads one of {kv} KV heads")
            elif h % kv:
                raise ValueError(f"layer {i}: {h} query heads do not split into {kv} KV groups; give kv_head_map")


def per_layer_config_class(config_class: type) -> type:
    """gisp's per-layer variant of a family's config class: model type ``gisp_<family>``, the
    family's fields plus per-layer overrides (see :class:`PerLayerConfigMixin`) and ``kv_head_map``."""
    from huggingface_hub.dataclasses import strict

    cls = type(f"Gisp{config_class.__name__}", (PerLayerConfigMixin, config_class), {
        "__module__": __name__,
        "__doc__": f"A {config_class.model_type} whose layers may differ in widths (gisp's per-layer export).",
        "__annotations__": {"kv_head_map": "list[int] | None"},
        "model_type": f"gisp_{config_class.model_type}",
        "kv_head_map": None,
    })
    return strict(cls)


class Architecture(ABC):
    """One decoder-only model family: module layout, shapes, biases and export classes."""

    model_type: ClassVar[str]
    """The Hugging Face ``model_type`` of the family's standard checkpoints."""
    config_class: ClassVar[type]
    """The standard transformers config class (plain exports use it)."""
    per_layer_config_class: ClassVar[type]
    """gisp's per-layer config class (model type ``gisp_<family>``)."""
    attention_modules: ClassVar[tuple[str, ...]] = ("self_attn", "input_layernorm")
    """Submodules of a decoder layer that exist only for its attention block (dropped when it is skipped)."""
    mlp_modules: ClassVar[tuple[str, ...]] = ("mlp", "post_attention_layernorm")
    """Submodules of a decoder layer that exist only for its MLP block."""
    projection_names: ClassVar[dict[str, str]] = {
        "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
    """Where each projection sits inside a decoder layer (its state-dict name without ``.weight``)."""

    def __init__(self, config: Any) -> None:
        self.config = config

    # shapes -----------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def num_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def num_kv_heads(self) -> int:
        kv = getattr(self.config, "num_key_value_heads", None)
        return int(kv if kv is not None else self.num_heads)

    @property
    def head_dim(self) -> int:
        hd = getattr(self.config, "head_dim", None)
        return int(hd if hd else self.hidden_size // self.num_heads)

    @property
    def intermediate_size(self) -> int:
        return int(self.config.intermediate_size)

    # modules ----------------------------------------------------------------
    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers of a causal LM of this family."""
        return model.model.layers

    def _projection(self, layer: nn.Module, key: str) -> nn.Linear | None:
        module: Any = layer
        for part in self.projection_names[key].split("."):
            module = getattr(module, part, None)
            if module is None:
                return None
        return module

    def attention(self, layer: nn.Module) -> AttentionProjections | None:
        """A layer's attention projections (``None`` when an export skipped the block)."""
        q = self._projection(layer, "q")
        return None if q is None else AttentionProjections(*(self._projection(layer, k) for k in "qkvo"))

    def mlp(self, layer: nn.Module) -> MLPProjections | None:
        """A layer's MLP projections (``None`` when an export skipped the block)."""
        gate = self._projection(layer, "gate")
        return None if gate is None else MLPProjections(*(self._projection(layer, k) for k in ("gate", "up", "down")))

    def block_modules(self, layer: nn.Module, block: str) -> list[nn.Module]:
        """The modules of one block (``attention`` or ``mlp``) of a layer, norms included."""
        names = self.attention_modules if block == "attention" else self.mlp_modules
        return [m for m in (getattr(layer, n, None) for n in names) if m is not None]

    def projection_modules(self) -> list[str]:
        """The attention and MLP projections' module names inside a decoder layer (where recovery puts its
        LoRA adapters; PEFT matches them as name suffixes)."""
        return list(self.projection_names.values())

    def final_hidden(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """The decoder's final (normed) hidden states, the LM head's input: callers that apply the head to a
        few positions at a time never hold the logits of a whole batch."""
        return model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state

    def logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The logits of :meth:`final_hidden` states, as the model's forward computes them."""
        return model.get_output_embeddings()(hidden)

    # biases -----------------------------------------------------------------
    def has_o_bias(self, config: Any) -> bool:
        """Whether a config of this family gives the attention output projection a bias."""
        return False

    def has_down_bias(self, config: Any) -> bool:
        """Whether a config of this family gives the MLP down projection a bias."""
        return False

    def config_with_output_biases(self, config: Any) -> Any:
        """A copy of ``config`` whose o_proj/down_proj carry biases (where bias compensation is written).

        Families without such a switch refuse with one line.
        """
        raise GispError(f"bias compensation can be exported for llama models only, not '{config.model_type}': "
                        "evaluate the masked level with gisp eval instead")

    # export model classes -------------------------------------------------------
    @classmethod
    @abstractmethod
    def causal_lm_class(cls) -> type:
        """gisp's per-layer causal LM class of this family (built on first use: it imports transformers'
        modeling code, which ``import gisp`` must not)."""

    # derived facts ------------------------------------------------------------
    def layout(self, model: nn.Module, protect_first: float = 0.0, protect_last: int = 0) -> Layout:
        """The prunable structures of ``model`` and its protected layers."""
        shapes = []
        d = self.head_dim
        for layer in self.layers(model):
            att, mlp = self.attention(layer), self.mlp(layer)
            if att is None or mlp is None:
                raise GispError("this model is already sliced (an export with removed blocks): prune or mask "
                                "the original base model instead")
            shapes.append(LayerShape(
                num_heads=att.q.out_features // d, num_kv_heads=att.k.out_features // d, head_dim=d,
                hidden=att.q.in_features, intermediate=mlp.gate.out_features,
                qkv_bias=att.q.bias is not None, o_bias=att.o.bias is not None, mlp_bias=mlp.gate.bias is not None,
            ))
        return Layout(tuple(shapes), protected_layers(len(shapes), protect_first, protect_last))

    def prunable_parameters(self, model: nn.Module, layout: Layout) -> list[nn.Parameter]:
        """The projection weights of unprotected layers: the only tensors that need gradients."""
        params = []
        for i, layer in enumerate(self.layers(model)):
            if i in layout.protected:
                continue
            att, mlp = self.attention(layer), self.mlp(layer)
            if att is not None:
                params += [att.q.weight, att.k.weight, att.v.weight, att.o.weight]
            if mlp is not None:
                params += [mlp.gate.weight, mlp.up.weight, mlp.down.weight]
        return params

    @torch.no_grad()
    def apply_mask(self, model: nn.Module, mask: Mask, *, since: Mask | None = None) -> None:
        """Zero the weights of ``mask``'s removed structures in place.

        A removed head loses its q rows and o columns (k/v rows too once its
        whole KV group is gone); a removed channel loses its gate/up rows and its
        down column. Zero o/down columns alone make the structure's output vanish
        exactly; zeroing the rest makes its Taylor score zero too.

        ``since``: a mask already applied to this model; only the structures
        removed since then are zeroed (the pruning loop's per-step update). The
        result equals a full apply.
        """
        layout = self.layout(model)
        for i, layer in enumerate(self.layers(model)):
            s = layout.layers[i]
            heads_gone, kv_gone, ch_gone = ~mask.heads[i], ~mask.kv_heads(layout, i), ~mask.channels[i]
            if since is not None:
                heads_gone &= since.heads[i]
                kv_gone &= since.kv_heads(layout, i)
                ch_gone &= since.channels[i]
            zero_structures(self.attention(layer), self.mlp(layer), s.head_dim, heads_gone.nonzero().flatten(),
                            kv_gone.nonzero().flatten(), ch_gone.nonzero().flatten())


def zero_structures(att: AttentionProjections | None, mlp: MLPProjections | None, head_dim: int,
                    heads: torch.Tensor, kv_heads: torch.Tensor, channels: torch.Tensor) -> None:
    """Zero query heads ``heads`` (q rows, o columns), KV heads ``kv_heads`` (k/v rows) and MLP ``channels``
    (gate/up rows, down column): the one routine that removes a structure from weights."""
    if att is not None and len(heads):
        rows = block_rows(heads, head_dim)
        _zero(att.q.weight, 0, rows)
        _zero(att.q.bias, 0, rows)
        _zero(att.o.weight, 1, rows)
    if att is not None and len(kv_heads):
        rows = block_rows(kv_heads, head_dim)
        for p in (att.k, att.v):
            _zero(p.weight, 0, rows)
            _zero(p.bias, 0, rows)
    if mlp is not None and len(channels):
        ch = channels.cpu()
        for p in (mlp.gate, mlp.up):
            _zero(p.weight, 0, ch)
            _zero(p.bias, 0, ch)
        _zero(mlp.down.weight, 1, ch)


def _zero(t: torch.Tensor | None, dim: int, index: torch.Tensor) -> None:
    """Zero slices along ``dim`` (index_fill_: plain tensor indexing is slow on CPU)."""
    if t is not None:
        t.index_fill_(dim, index.to(t.device), 0)


class LlamaLike(Architecture):
    """A family whose modules follow Llama's names and structure (Mistral, Qwen2, Qwen3, ...).

    A subclass names its ``model_type`` and transformers ``config_class``; its
    per-layer config class and per-layer model classes follow from them
    (transformers' ``models.<type>.modeling_<type>`` module, classes prefixed
    like the config class).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "config_class" in cls.__dict__:
            cls.per_layer_config_class = per_layer_config_class(cls.config_class)

    @classmethod
    def causal_lm_class(cls) -> type:
        built = cls.__dict__.get("_causal_lm")
        if built is None:
            import importlib

            from gisp.architectures.perlayer import build_llama_like

            hf = importlib.import_module(f"transformers.models.{cls.model_type}.modeling_{cls.model_type}")
            built = build_llama_like(cls, hf, cls.config_class.__name__.removesuffix("Config"))
            cls._causal_lm = built
        return built
