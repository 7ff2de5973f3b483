"""Architecture adapters: where each model family keeps its prunable projections.

One adapter per architecture derived from :class:`ArchAdapter` (the SliceGPT pattern).
The pruning code asks an adapter for the decoder layers and the q/k/v/o and
gate/up/down projections; it never touches module names itself, so a new
architecture is one small subclass plus a :func:`register_adapter` line.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

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


class ArchAdapter:
    """Knows one decoder-only architecture's module layout and shapes.

    The default implementation fits the Llama module layout
    (``model.layers[i].self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``),
    which Llama, Mistral, Qwen2 and Qwen3 share; subclasses override what differs.
    """

    model_types: tuple[str, ...] = ()

    def __init__(self, config) -> None:
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
        return model.model.layers

    def attention(self, layer: nn.Module) -> AttentionProjections:
        a = layer.self_attn
        return AttentionProjections(a.q_proj, a.k_proj, a.v_proj, a.o_proj)

    def mlp(self, layer: nn.Module) -> MLPProjections:
        m = layer.mlp
        return MLPProjections(m.gate_proj, m.up_proj, m.down_proj)


class LlamaAdapter(ArchAdapter):
    model_types = ("llama",)


class MistralAdapter(ArchAdapter):
    model_types = ("mistral",)


class Qwen2Adapter(ArchAdapter):
    """Qwen2 adds biases to q/k/v; they are sliced with their rows."""

    model_types = ("qwen2",)


class Qwen3Adapter(ArchAdapter):
    """Qwen3 adds per-head q/k RMSNorms whose weight is shared by all heads,
    so removing heads leaves them untouched."""

    model_types = ("qwen3",)


_REGISTRY: dict[str, type[ArchAdapter]] = {}


def register_adapter(cls: type[ArchAdapter]) -> type[ArchAdapter]:
    """Make an adapter available for the ``model_type`` values it lists."""
    for t in cls.model_types:
        _REGISTRY[t] = cls
    return cls


for _cls in (LlamaAdapter, MistralAdapter, Qwen2Adapter, Qwen3Adapter):
    register_adapter(_cls)


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def get_adapter(model_or_config) -> ArchAdapter:
    """The adapter for a model (or its config); a clear error if unsupported."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    cls = _REGISTRY.get(model_type)
    if cls is None:
        raise GispError(
            f"unsupported architecture '{model_type}': gisp prunes "
            f"{', '.join(supported_model_types())} models (add an ArchAdapter to support more)"
        )
    return cls(config)
