"""Model families gisp prunes and exports: one module per family, and the registry of them.

Adding a family is one module here (an :class:`Architecture` subclass with its
per-layer config and model classes) plus one line in :data:`FAMILIES`.

Family modules (and torch) are imported on first use, so ``import gisp`` stays light.
Exported per-layer checkpoints (``model_type`` ``gisp_<family>``) load with
``AutoModelForCausalLM.from_pretrained`` after ``import gisp``: a stand-in for
each config class is registered with ``AutoConfig`` as soon as transformers'
auto module is imported; reading such a config registers the family's real
config class and a model stand-in that builds the per-layer class on first use.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from functools import cache
from typing import TYPE_CHECKING, Any

from gisp.errors import GispError

if TYPE_CHECKING:
    from gisp.architectures.base import Architecture

# Kept importable from here, loaded on first access: this module must not import torch.
_FROM_BASE = ("Architecture", "AttentionProjections", "MLPProjections", "PerLayerConfigMixin", "zero_structures")

# model_type of the family's standard checkpoints -> (module, Architecture class name)
FAMILIES: dict[str, tuple[str, str]] = {
    "llama": ("gisp.architectures.llama", "Llama"),
    "mistral": ("gisp.architectures.mistral", "Mistral"),
    "qwen2": ("gisp.architectures.qwen2", "Qwen2"),
    "qwen3": ("gisp.architectures.qwen3", "Qwen3"),
    "gemma3_text": ("gisp.architectures.gemma3", "Gemma3"),
}

PER_LAYER_PREFIX = "gisp_"

__all__ = [
    "FAMILIES", "Architecture", "AttentionProjections", "MLPProjections", "PerLayerConfigMixin", "apply_mask",
    "architecture_class", "get_architecture", "layout_of", "register_auto_classes", "supported_model_types",
    "zero_structures",
]


def __getattr__(name: str) -> Any:
    if name in _FROM_BASE:
        from gisp.architectures import base

        return getattr(base, name)
    raise AttributeError(f"module 'gisp.architectures' has no attribute '{name}'")


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)


def _family(model_type: str | None) -> str | None:
    if model_type in FAMILIES:
        return model_type
    if model_type and model_type.startswith(PER_LAYER_PREFIX) and model_type[len(PER_LAYER_PREFIX):] in FAMILIES:
        return model_type[len(PER_LAYER_PREFIX):]
    return None


def is_supported(model_type: str | None) -> bool:
    """Whether gisp knows this ``model_type`` (a family's standard or per-layer type)."""
    return _family(model_type) is not None


@cache
def architecture_class(model_type: str) -> type[Architecture]:
    """The :class:`Architecture` subclass of a family (standard or ``gisp_`` per-layer model type)."""
    family = _family(model_type)
    if family is None:
        raise GispError(
            f"unsupported architecture '{model_type}': gisp prunes {', '.join(supported_model_types())} models "
            "(add a module to gisp.architectures to support more)"
        )
    module, name = FAMILIES[family]
    return getattr(importlib.import_module(module), name)


def get_architecture(model_or_config: Any) -> Architecture:
    """The architecture of a model (or its config); one clear line if gisp does not support it."""
    config = getattr(model_or_config, "config", model_or_config)
    return architecture_class(getattr(config, "model_type", None))(config)


def layout_of(model: Any, protect_first: float = 0.0, protect_last: int = 0):
    """The :class:`~gisp.core.structures.Layout` of a (dense or masked, not sliced) model."""
    return get_architecture(model).layout(model, protect_first, protect_last)


def apply_mask(model: Any, mask: Any, *, since: Any = None) -> None:
    """Zero ``mask``'s removed structures in ``model``'s weights (see :meth:`Architecture.apply_mask`)."""
    get_architecture(model).apply_mask(model, mask, since=since)


# --- registration with transformers' Auto classes ---------------------------------------------------


def _lazy_model_class(arch: type[Architecture]) -> type:
    """A stand-in registered with ``AutoModelForCausalLM``: it builds the real class on first use."""

    def real() -> type:
        return arch.causal_lm_class()

    return type(f"Gisp{arch.__name__}ForCausalLM", (), {
        "config_class": arch.per_layer_config_class,
        "from_pretrained": classmethod(lambda cls, *a, **k: real().from_pretrained(*a, **k)),
        "_from_config": classmethod(lambda cls, *a, **k: real()._from_config(*a, **k)),
        "from_config": classmethod(lambda cls, *a, **k: real()._from_config(*a, **k)),
        "__doc__": f"Loads gisp's per-layer {arch.model_type} exports (built on first use).",
    })


_registered: set[str] = set()


def _register(model_type: str) -> type:
    """Register one family's per-layer config class and (lazy) model class; returns the config class."""
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = architecture_class(model_type)
    cfg = arch.per_layer_config_class
    if model_type not in _registered:
        AutoConfig.register(cfg.model_type, cfg, exist_ok=True)
        AutoModelForCausalLM.register(cfg, _lazy_model_class(arch), exist_ok=True)
        _registered.add(model_type)
    return cfg


def register_auto_classes() -> None:
    """Register every family's per-layer config and (lazy) model class with the Auto classes (idempotent)."""
    for model_type in FAMILIES:
        _register(model_type)


def _lazy_config_class(model_type: str) -> type:
    """A stand-in registered with ``AutoConfig`` under ``gisp_<family>``: reading such a config imports the
    family and registers its real classes first (so nothing of a family is imported before it is needed)."""

    def real() -> type:
        return _register(model_type)

    return type(f"LazyGisp{model_type.title()}Config", (), {
        "model_type": PER_LAYER_PREFIX + model_type,
        "from_dict": classmethod(lambda cls, *a, **k: real().from_dict(*a, **k)),
        "from_pretrained": classmethod(lambda cls, *a, **k: real().from_pretrained(*a, **k)),
        "__new__": lambda cls, *a, **k: real()(*a, **k),
    })


# Export formats defined in higher layers (model type -> module that registers its classes on import),
# found by name when such a config is first read, as plugins are.
FORMAT_PROVIDERS = {"gisp_decilm": "gisp.deploy.vllm"}


def _format_config_class(model_type: str, module: str) -> type:
    """A stand-in for a format's config class: importing ``module`` registers the real one."""

    def real() -> type:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        importlib.import_module(module)
        return CONFIG_MAPPING[model_type]

    return type(f"Lazy{model_type.title()}Config", (), {
        "model_type": model_type,
        "from_dict": classmethod(lambda cls, *a, **k: real().from_dict(*a, **k)),
        "from_pretrained": classmethod(lambda cls, *a, **k: real().from_pretrained(*a, **k)),
        "__new__": lambda cls, *a, **k: real()(*a, **k),
    })


_CONFIG_AUTO = "transformers.models.auto.configuration_auto"


def _register_config_stand_ins(config_auto: Any) -> None:
    for model_type in FAMILIES:
        if model_type not in _registered:
            config_auto.AutoConfig.register(PER_LAYER_PREFIX + model_type, _lazy_config_class(model_type),
                                            exist_ok=True)
    for model_type, module in FORMAT_PROVIDERS.items():
        if module not in sys.modules:
            config_auto.AutoConfig.register(model_type, _format_config_class(model_type, module), exist_ok=True)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Registers gisp's config stand-ins right after transformers' ``AutoConfig`` module is imported.

    ``import gisp`` must not import transformers (the CLI starts in a fraction of
    a second), yet ``AutoModelForCausalLM.from_pretrained(export)`` must work
    after ``import gisp`` in whatever order the two are imported. The stand-ins
    need nothing but ``AutoConfig``; the family's real classes are registered
    when a ``gisp_<family>`` config is first read.
    """

    def find_spec(self, name: str, path: Any = None, target: Any = None):
        if name != _CONFIG_AUTO:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module: Any) -> None:
            exec_module(module)
            _register_config_stand_ins(module)

        spec.loader.exec_module = exec_and_register
        return spec


def install_auto_registration() -> None:
    """Register the config stand-ins now if transformers' ``AutoConfig`` is loaded, else as soon as it is."""
    if _CONFIG_AUTO in sys.modules:
        _register_config_stand_ins(sys.modules[_CONFIG_AUTO])
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
