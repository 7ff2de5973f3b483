"""vLLM plugin for gisp's vLLM exports (``gisp export --format vllm``): the ``gisp_decilm`` config.

A vLLM export is served by vLLM's own ``DeciLMForCausalLM`` (the class behind
NVIDIA's pruned Nemotron models, ``vllm/model_executor/models/nemotron_nas.py``):
per-layer ``block_configs`` say which blocks are absent (``no_op``), how many
query heads share a KV head (``n_heads_in_group``) and each MLP's exact
``intermediate_size``. vLLM has no config class for that format, so the export
carries the model type ``gisp_decilm`` and this package registers its config
class with transformers' ``AutoConfig``. vLLM calls :func:`register` in every
process at start-up through its general-plugin entry point
(``vllm.general_plugins``, declared in gisp's ``pyproject.toml``); nothing in
vLLM is patched.

This package imports only transformers: it must load inside vLLM's environment,
whose pinned transformers can be older than what the rest of gisp needs.
``import gisp`` registers the same class, so ``AutoConfig`` reads a vLLM export
in gisp's environment too. Without gisp, transformers refuses the unknown model
type instead of silently building a plain Llama of the wrong shapes.
"""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, LlamaConfig

MODEL_TYPE = "gisp_decilm"
ARCHITECTURE = "DeciLMForCausalLM"

__all__ = ["ARCHITECTURE", "MODEL_TYPE", "BlockConfig", "GispDeciLMConfig", "register"]


class BlockConfig(dict):
    """A ``block_configs`` entry: a plain dict (serialises as JSON) read by attribute, as vLLM's DeciLM does.

    A missing key raises ``AttributeError``, so ``hasattr(block.ffn, "ffn_mult")`` is ``False``
    and vLLM takes the exact ``intermediate_size``.
    """

    def __init__(self, data: dict[str, Any] | None = None, **kw: Any) -> None:
        super().__init__()
        for key, value in {**(data or {}), **kw}.items():
            self[key] = BlockConfig(value) if isinstance(value, dict) else value

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __reduce__(self):  # pickles (vLLM's multiprocess engine) as the class plus its plain dict
        return (BlockConfig, (_plain(self),))


def _plain(value: Any) -> Any:
    return {k: _plain(v) for k, v in value.items()} if isinstance(value, dict) else value


@strict
class GispDeciLMConfig(LlamaConfig):
    """A Llama whose layers differ, in DeciLM's ``block_configs`` form (see the module docstring).

    ``num_attention_heads`` is every attending layer's (padded) query-head
    count; layer ``i`` has ``num_attention_heads // n_heads_in_group`` KV heads
    and ``block_configs[i].ffn.intermediate_size`` MLP channels.
    ``gisp_source_model_type`` names the family the weights came from.
    """

    model_type = MODEL_TYPE
    block_configs: list | None = None
    qkv_bias: bool | None = None
    gisp_source_model_type: str | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        if self.block_configs is not None:
            self.block_configs = [b if isinstance(b, BlockConfig) else BlockConfig(b) for b in self.block_configs]
        super().__post_init__(**kwargs)

    def validate_architecture(self) -> None:
        """Replaces Llama's ``hidden_size % num_attention_heads`` check (``head_dim`` is explicit here)."""
        blocks = self.block_configs
        if blocks is None:  # transformers builds a default instance to compare against
            return
        if len(blocks) != self.num_hidden_layers:
            raise ValueError(f"block_configs has {len(blocks)} entries for {self.num_hidden_layers} layers")
        for i, b in enumerate(blocks):
            att, ffn = b.get("attention") or {}, b.get("ffn") or {}
            if not att.get("no_op"):
                g = att.get("n_heads_in_group")
                if not isinstance(g, int) or g < 1 or self.num_attention_heads % g:
                    raise ValueError(f"layer {i}: n_heads_in_group {g} does not divide "
                                     f"num_attention_heads {self.num_attention_heads}")
            if not ffn.get("no_op") and not (isinstance(ffn.get("intermediate_size"), int)
                                             and ffn["intermediate_size"] > 0):
                raise ValueError(f"layer {i}: ffn needs a positive intermediate_size or no_op")


def register() -> None:
    """vLLM general-plugin entry point: make ``gisp_decilm`` known to ``AutoConfig`` (idempotent)."""
    AutoConfig.register(MODEL_TYPE, GispDeciLMConfig, exist_ok=True)
