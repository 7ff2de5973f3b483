"""--format vllm: the config and padded weights for vLLM's DeciLMForCausalLM, checked without vLLM.

The padded model is rebuilt in transformers (gisp's per-layer classes with the
padded widths, :func:`gisp.deploy.vllm.load_transformers`), which computes what
vLLM's DeciLM computes; its logits must equal the unpadded export's. Serving
with a real vLLM is measured by ``scripts/bench_vllm.py`` (docs/bench_vllm.md).
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import tiny_model
from tests.deploy.test_export import _forced_mask, greedy, hand_trajectory, ids, masked, max_diff, n_params
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

import gisp
from gisp.architectures import layout_of
from gisp.core.structures import Mask
from gisp.deploy.export import save_slim
from gisp.deploy.vllm import export_vllm, load_transformers, plan_layout, write_vllm
from gisp.errors import GispError
from gisp_vllm import MODEL_TYPE, BlockConfig, GispDeciLMConfig, register

TOL = 1e-5



def _heads(w: torch.Tensor, d: int = 16) -> list[bool]:
    """Which heads (rows of d) of a q/k/v weight are non-zero."""
    return [bool(h.abs().sum() > 0) for h in w.view(-1, d, w.shape[-1])]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_padded_weights_compute_the_export(arch, tmp_path):
    """Layer 0 without attention (first layer: gets a zero attention), 1 uneven groups, 2 no MLP, 3 empty."""
    base = tiny_model(arch, 2, layers=5)
    mask = _forced_mask(base)
    hf, _ = save_slim(base, mask, tmp_path / "hf")
    rec = write_vllm(hf, tmp_path / "v")
    cfg = json.loads((tmp_path / "v" / "config.json").read_text())
    assert cfg["model_type"] == MODEL_TYPE and cfg["architectures"] == ["DeciLMForCausalLM"]
    assert cfg["num_attention_heads"] == 4 and cfg["head_dim"] == 16 and cfg["gisp_source_model_type"] == arch
    blocks = cfg["block_configs"]
    assert [b["attention"].get("n_heads_in_group") for b in blocks] == [4, 2, 2, None, 2]
    assert [b["attention"]["no_op"] for b in blocks] == [False, False, False, True, False]
    assert [b["ffn"].get("intermediate_size") for b in blocks] == [96, 64, None, None, 96]  # exact, unpadded
    assert not any("ffn_mult" in b["ffn"] for b in blocks)
    assert cfg.get("qkv_bias") is (True if arch == "qwen2" else None)

    w = load_file(str(tmp_path / "v" / "model.safetensors"))
    layer = "model.layers.{}.{}".format
    # layer 0: a zero attention block with unit norm (vLLM's residual stream starts there): output exactly 0
    assert all(not w[layer(0, f"self_attn.{p}.weight")].any() for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert w[layer(0, "self_attn.k_proj.weight")].shape == (16, 64)
    assert torch.equal(w[layer(0, "input_layernorm.weight")], torch.ones(64))
    # layer 1: heads 0, 1 (KV head 0) and 3 (KV head 1) -> query slots [0, 1 | 3, pad]; o_proj columns follow
    assert _heads(w[layer(1, "self_attn.q_proj.weight")]) == [True, True, True, False]
    assert not w[layer(1, "self_attn.o_proj.weight")][:, 48:].any()
    assert w[layer(1, "self_attn.k_proj.weight")].shape == (32, 64)
    assert w[layer(1, "mlp.gate_proj.weight")].shape == (64, 64)
    assert not any(k.startswith((layer(2, "mlp"), layer(2, "post_attention"), layer(3, ""))) for k in w)

    hf_model = gisp.load_pretrained(hf).model
    v = rec["vllm"]
    assert v["params_true"] == n_params(hf_model) and v["params_written"] == sum(t.numel() for t in w.values())
    assert v["params_padding"] == v["params_written"] - v["params_true"] > 0
    assert v["kv_heads_true"] == 0 + 2 + 2 + 0 + 2 and v["kv_heads_written"] == 1 + 2 + 2 + 2
    assert [x["q_pad"] for x in v["layers"]] == [4, 1, 0, 0, 0] and v["layers"][0]["residual_pad"]

    padded = load_transformers(tmp_path / "v")
    x = ids()
    assert max_diff(padded, hf_model, x) <= TOL
    assert max_diff(padded, masked(base, mask), x) <= 1e-4
    assert max_diff(gisp.load_pretrained(tmp_path / "v").model, hf_model, x) <= TOL  # AutoModel after import gisp
    assert torch.equal(greedy(padded, x[:1]), greedy(hf_model, x[:1]))


def test_fewer_heads_everywhere_can_shrink_the_head_count_with_duplicated_kv(tmp_path):
    """No layer keeps 4 heads: 3 query heads per layer is cheaper, a KV head then spans two slots (duplicated)."""
    base = tiny_model("llama", 2, layers=2)
    mask = Mask.dense(layout_of(base))
    mask.heads[0] = torch.tensor([True, True, True, False])  # groups (2, 1): 3 slots of 1 at 3 heads
    mask.heads[1] = torch.tensor([True, True, False, False])  # one group of 2: 1 slot of 3
    hf, _ = save_slim(base, mask, tmp_path / "hf")
    rec = write_vllm(hf, tmp_path / "v")
    v = rec["vllm"]
    assert v["num_attention_heads"] == 3
    assert [(x["n_heads_in_group"], x["kv_slots"], x["kv_dup"], x["q_pad"]) for x in v["layers"]] == [
        (1, 3, 1, 0), (3, 1, 0, 1)]
    k = load_file(str(tmp_path / "v" / "model.safetensors"))["model.layers.0.self_attn.k_proj.weight"]
    assert torch.equal(k[:16], k[16:32]) and not torch.equal(k[:16], k[32:])
    x = ids()
    assert max_diff(load_transformers(tmp_path / "v"), gisp.load_pretrained(hf).model, x) <= TOL


def test_plan_minimises_padding():
    specs = [{"heads": 9, "kv_heads": 3, "kv_map": None, "channels": 10},
             {"heads": 4, "kv_heads": 2, "kv_map": [0, 0, 0, 1], "channels": 10},  # groups (3, 1)
             {"heads": 1, "kv_heads": 1, "kv_map": None, "channels": 0}]
    plan = plan_layout(specs, 9)
    assert plan.num_attention_heads == 9
    assert [(lay.group, len(lay.kv_slots)) for lay in plan.layers] == [(3, 3), (3, 3), (9, 1)]
    assert plan.layers[1].q_slots == [0, 1, 2, 3, None, None, None, None, None]
    assert plan.layers[1].kv_slots == [0, 1, None]


def test_levels_of_a_run_and_the_cli(tmp_path):
    from typer.testing import CliRunner

    from gisp.cli.app import app

    base = tiny_model("llama", 2, layers=4)
    traj = hand_trajectory(base, {0: [0, 0, 0, 0], 1: [0, 1, 2, 0], 2: [1, 1, 1, 1]}, {3: [2] * 50 + [0] * 46})
    res = export_vllm(traj, tmp_path / "v1", model=base, step=1)
    assert res.step == 1 and res.params_written >= res.params_true
    assert json.loads((tmp_path / "v1" / "gisp_export.json").read_text())["step"] == 1
    hf = gisp.export(traj, tmp_path / "hf2", model=base, step=2).path
    r = CliRunner().invoke(app, ["export", str(hf), "--format", "vllm", "--out", str(tmp_path / "v2")])
    assert r.exit_code == 0, r.output
    assert "serve with: vllm serve" in " ".join(r.output.split())
    x = ids()
    assert max_diff(load_transformers(tmp_path / "v2"), masked(base, traj.mask_at_step(2)), x) <= 1e-4
    r = CliRunner().invoke(app, ["export", str(hf), "--format", "vllm", "--out", str(tmp_path / "v3"),
                                 "--sparsity", "0.2"])
    assert isinstance(r.exception, GispError) and "level is fixed" in str(r.exception)
    r = CliRunner().invoke(app, ["export", str(hf), "--format", "onnx", "--out", str(tmp_path / "v4")])
    assert isinstance(r.exception, GispError) and "unknown --format" in str(r.exception)


def test_refusals(tmp_path):
    q3 = tiny_model("qwen3", 2, layers=2)
    hf, _ = save_slim(q3, Mask.dense(layout_of(q3)), tmp_path / "q3")
    with pytest.raises(GispError, match="q_norm"):
        write_vllm(hf, tmp_path / "v")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, attention_bias=True, mlp_bias=True)
    base = LlamaForCausalLM(cfg).eval()
    mask = Mask.dense(layout_of(base))
    mask.channels[1][:] = False  # a removed MLP keeps its down_proj bias
    hf, _ = save_slim(base, mask, tmp_path / "b")
    with pytest.raises(GispError, match="output bias"):
        write_vllm(hf, tmp_path / "vb")
    assert not (tmp_path / "vb").exists()


def test_transformers_without_gisp_refuses_the_directory(tmp_path):
    base = tiny_model("llama", 2, layers=2)
    hf, _ = save_slim(base, Mask.dense(layout_of(base)), tmp_path / "hf")
    write_vllm(hf, tmp_path / "v")
    code = f"import transformers; transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / 'v')!r})"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "gisp_decilm" in r.stderr
    assert "gisp" in (tmp_path / "v" / "README.md").read_text()
    assert AutoConfig.from_pretrained(tmp_path / "v").model_type == MODEL_TYPE  # with gisp imported


def test_plugin_entry_point_and_config_objects():
    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert project["project"]["entry-points"]["vllm.general_plugins"]["gisp"] == "gisp_vllm:register"
    register()
    register()  # vLLM may load plugins more than once
    cfg = GispDeciLMConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           num_hidden_layers=1, block_configs=[{"attention": {"no_op": False, "n_heads_in_group": 2},
                                                                "ffn": {"no_op": False, "intermediate_size": 7}}])
    block = pickle.loads(pickle.dumps(cfg)).block_configs[0]  # vLLM's engine processes receive it pickled
    assert isinstance(block, BlockConfig) and block.attention.n_heads_in_group == 2
    assert block.ffn.intermediate_size == 7 and not hasattr(block.ffn, "ffn_mult")
    assert json.loads(cfg.to_json_string())["block_configs"][0]["ffn"] == {"no_op": False, "intermediate_size": 7}
    with pytest.raises(Exception, match="does not divide"):
        GispDeciLMConfig(hidden_size=64, num_attention_heads=3, head_dim=16, num_hidden_layers=1,
                         block_configs=[{"attention": {"no_op": False, "n_heads_in_group": 2}, "ffn": {"no_op": True}}])
