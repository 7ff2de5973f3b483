"""The registry: which families gisp knows, one-line errors, and a light `import gisp`."""

import json
import subprocess
import sys

import pytest
from tests.conftest import tiny_model
from transformers import GPT2Config

from gisp.architectures import FAMILIES, architecture_class, get_architecture, is_supported, supported_model_types
from gisp.errors import GispError


def test_every_family_resolves_by_its_standard_and_per_layer_type():
    for model_type in FAMILIES:
        arch = architecture_class(model_type)
        assert arch.model_type == model_type
        assert architecture_class("gisp_" + model_type) is arch
        assert arch.per_layer_config_class.model_type == "gisp_" + model_type
    assert supported_model_types() == sorted(FAMILIES)


def test_unsupported_architecture_is_one_clear_line():
    with pytest.raises(GispError, match="unsupported architecture 'gpt2'") as e:
        get_architecture(GPT2Config())
    assert "\n" not in str(e.value) and "llama" in str(e.value)
    assert not is_supported("gpt2") and not is_supported("gisp_gpt2") and is_supported("gisp_llama")


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_architecture_reads_the_model(arch):
    model = tiny_model(arch, 2)
    a = get_architecture(model)
    layers = a.layers(model)
    assert len(layers) == a.num_layers
    att, mlp = a.attention(layers[0]), a.mlp(layers[0])
    assert att.q.out_features == a.num_heads * a.head_dim and att.k.out_features == a.num_kv_heads * a.head_dim
    assert mlp.gate.out_features == a.intermediate_size
    assert a.block_modules(layers[0], "attention") and a.block_modules(layers[0], "mlp")


@pytest.mark.parametrize("first", [
    "import gisp",
    "import gisp; from transformers import LlamaConfig",  # a config class may pull in transformers' auto module
    "import transformers, gisp",
    "from transformers import AutoModelForCausalLM; import gisp",
])
def test_import_gisp_is_light_and_registers_exports_lazily(tmp_path, first):
    """`import gisp` loads neither torch nor any transformers modeling module; a per-layer export
    still loads with AutoModelForCausalLM afterwards."""
    import torch

    from gisp.architectures import layout_of
    from gisp.architectures.slicing import slim_model
    from gisp.core.structures import Mask

    base = tiny_model("llama", 2)
    mask = Mask.dense(layout_of(base))
    mask.heads[1][:1] = False  # uneven groups -> per-layer format
    slim_model(base, mask).save_pretrained(tmp_path / "exp")
    code = (
        "import sys, json; import gisp;"
        "light = sorted(m for m in sys.modules if m == 'torch' or m.startswith('transformers'));"
        f"{first};"
        "from transformers import AutoModelForCausalLM;"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'exp')!r});"
        "print(json.dumps({'light': light, 'cls': type(m).__name__, 'type': m.config.model_type}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"light": [] if first.startswith("import gisp") else got["light"], "cls": "GispLlamaForCausalLM",
                   "type": "gisp_llama"}
    assert torch.is_tensor(next(base.parameters()))
