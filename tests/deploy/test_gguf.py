"""GGUF export: every family and layer shape round-trips through a stock llama.cpp (xllamacpp), exactly in f32."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch
import xllamacpp  # noqa: F401  (the runtime is a test requirement: a missing one fails, never skips)
from tests.conftest import ARCHS, random_calib

import gisp
from gisp.architectures import layout_of
from gisp.architectures.slicing import slim_model
from gisp.core.structures import Mask
from gisp.deploy.gguf import (
    GGUF_FAMILIES,
    _best_group_size,
    _group_layout,
    compare_with_hf,
    export_gguf,
    family_of,
    write_gguf,
)
from gisp.errors import GispError

N_TOKENS = 32
PROMPT = [100, 2000, 300, 4000, 500, 6000]
SPECIAL = range(17)  # SmolLM2's special tokens: llama.cpp and HF both exclude them from greedy choices
LOGPROB_TOL = 1e-3



@pytest.fixture(scope="session")
def smol_dir() -> Path:
    """SmolLM2's HF directory (tokenizer files; converted once from the embedded GGUF)."""
    from gisp.loading import resolve_model_path

    return Path(resolve_model_path("smollm2-135m")[0])


@pytest.fixture(scope="session")
def partial(smol_dir) -> list[int]:
    """SmolLM2's tokens that are pieces of a UTF-8 character (llama.cpp reports no logprob for them)."""
    from gisp.deploy.gguf import _source_gguf, partial_utf8_tokens

    return partial_utf8_tokens(_source_gguf(None, smol_dir))


def build(arch: str, heads: int = 4, kv: int = 2, layers: int = 5, tied: bool = False, bias: bool = False,
          vocab: int = 49152, seed: int = 0) -> torch.nn.Module:
    """A random decoder with SmolLM2's vocabulary (hidden 64, heads of 16, 96 MLP channels), norms randomised."""
    config_cls, model_cls = ARCHS[arch]
    torch.manual_seed(seed)
    extra = {"attention_bias": True, "mlp_bias": True} if bias else {}
    config = config_cls(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=kv, head_dim=16, max_position_embeddings=128,
                        tie_word_embeddings=tied, **extra)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
            elif p.dim() == 2:
                p.normal_(0, 0.2)
            else:
                p.normal_(0, 0.1)
    return model


def mask_for(model: torch.nn.Module, kind: str) -> Mask:
    layout = layout_of(model)
    mask = Mask.dense(layout)
    if kind == "uniform":  # one head per KV group and a third of the channels gone in every layer
        for i in range(layout.num_layers):
            mask.heads[i][::2] = False
            mask.channels[i][::3] = False
    elif kind == "per_layer":
        mask.heads[0][:] = False  # no attention (in layer 0, which llama.cpp reads the head size from)
        mask.heads[1][2] = False  # uneven GQA groups: 2 and 1 query heads
        mask.channels[1][::3] = False
        mask.channels[2][:] = False  # attention but no MLP
        mask.heads[3][:] = False  # nothing left
        mask.channels[3][:] = False
    elif kind == "last_empty":  # the last layer lost everything (llama.cpp's deci graph needs an FFN there)
        mask.heads[1][2] = False
        mask.heads[layout.num_layers - 1][:] = False
        mask.channels[layout.num_layers - 1][:] = False
    elif kind == "dup":  # 8 heads on 2 KV heads, groups of 4 and 1; the last layer without MLP
        mask.heads[1][[4, 5, 6]] = False
        mask.heads[2][[0, 1, 2, 3, 4]] = False
        mask.channels[layout.num_layers - 1][:] = False
    return mask


def assert_exact(path: Path, model: torch.nn.Module, partial: list[int]) -> dict:
    res = compare_with_hf(path, model, PROMPT, N_TOKENS, banned=SPECIAL, partial=partial, exact=True)
    assert res["n_tokens"] == N_TOKENS
    assert res["same_prefix"] == N_TOKENS, res  # llama.cpp's greedy tokens are the export's
    assert res["max_abs_logprob_diff"] <= LOGPROB_TOL, res
    return res


CASES = [  # (family, heads, kv heads, tied, bias, mask, llama.cpp architecture)
    *[(f, 4, 4, False, False, "dense", GGUF_FAMILIES[f].arch.name.lower()) for f in ARCHS],  # MHA
    *[(f, 4, 2, False, False, "uniform", GGUF_FAMILIES[f].arch.name.lower() if f != "qwen2" else "deci")
      for f in ARCHS],  # GQA, pruned evenly (llama.cpp's qwen2 graph needs q as wide as the hidden size)
    ("llama", 4, 2, False, False, "per_layer", "deci"),
    ("mistral", 4, 2, False, False, "per_layer", "deci"),
    ("qwen2", 4, 2, False, False, "per_layer", "deci"),
    ("qwen2", 4, 2, True, False, "per_layer", "deci"),
    ("qwen3", 4, 2, True, False, "per_layer", "openelm"),
    ("qwen3", 4, 2, False, False, "per_layer", "qwen3"),  # untied: padded to one shape
    ("llama", 8, 2, False, False, "dup", "deci"),
    ("mistral", 4, 2, False, False, "last_empty", "deci"),
    ("llama", 4, 2, False, True, "per_layer", "deci"),  # biases, also of removed blocks
]


@pytest.mark.parametrize("arch,heads,kv,tied,bias,kind,expected", CASES,
                         ids=[f"{c[0]}-{c[1]}h{c[2]}kv-{c[5]}{'-tied' if c[3] else ''}{'-bias' if c[4] else ''}"
                              for c in CASES])
def test_llamacpp_runs_the_export_exactly(arch, heads, kv, tied, bias, kind, expected, smol_dir, partial, tmp_path):
    base = build(arch, heads, kv, tied=tied, bias=bias)
    slim = slim_model(base, mask_for(base, kind), gqa="map")
    res = write_gguf(slim, tmp_path / "m.gguf", outtype="f32", tokenizer_dir=smol_dir)
    assert res.arch == expected and res.per_layer == (expected in ("deci", "openelm") and arch != expected)
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
    assert_exact(res.path, slim, partial)
    if kind == "per_layer" and expected == "deci":
        assert res.layers[0]["heads"] == 1 and res.layers[0]["zero_heads"] == 1  # layer 0: one zero head
        assert res.layers[1] == {"heads": 4, "kv_heads": 2, "ffn": 64, "zero_heads": 1}  # (2, 1) padded to (2, 2)
        assert res.layers[2]["ffn"] == 1  # attention without MLP: one zero channel
        assert res.layers[3] == {"heads": 0, "kv_heads": 0, "ffn": 0, "zero_heads": 0} or bias
    if kind == "last_empty":
        assert res.layers[-1] == {"heads": 0, "kv_heads": 0, "ffn": 1, "zero_heads": 0}
    if kind == "dup":  # groups (4, 1) as groups of 2: KV head 0 duplicated, KV head 1 padded
        assert res.layers[1] == {"heads": 6, "kv_heads": 3, "ffn": 96, "zero_heads": 1}
    if expected == "qwen3" and kind == "per_layer":
        assert res.notes and "padded" in res.notes[0]


def test_llama3_rope_scaling_round_trips(smol_dir, partial, tmp_path):
    """Llama-3 rope scaling becomes llama.cpp's per-frequency factor tensor, in both graphs."""
    base = build("llama", 4, 2)
    base.config.rope_parameters = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 16}
    base = type(base)(base.config).eval().requires_grad_(False)  # rebuilt: the rotary embedding reads the config
    base.load_state_dict(build("llama", 4, 2).state_dict())
    for kind, expected in (("dense", "llama"), ("per_layer", "deci")):
        slim = slim_model(base, mask_for(base, kind), gqa="map")
        res = write_gguf(slim, tmp_path / f"{kind}.gguf", tokenizer_dir=smol_dir)
        assert res.arch == expected
        assert_exact(res.path, slim, partial)


def test_linear_rope_scaling_round_trips(smol_dir, partial, tmp_path):
    base = build("qwen2", 4, 2)
    base.config.rope_parameters = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
    base = type(base)(base.config).eval().requires_grad_(False)
    base.load_state_dict(build("qwen2", 4, 2).state_dict())
    res = write_gguf(base, tmp_path / "lin.gguf", tokenizer_dir=smol_dir)
    assert res.arch == "qwen2"
    assert_exact(res.path, base, partial)


def test_group_layout_pads_or_duplicates_whichever_is_smaller():
    assert _best_group_size([[0, 1], [2]]) == 2  # pad one zero head rather than duplicate a KV head
    assert _group_layout([[0, 1], [2]], 2) == ([0, 1, 2, None], [0, 1])
    assert _best_group_size([[0, 1, 2], [3, 4, 5]]) == 3  # even groups stay as they are
    assert _best_group_size([[0, 1, 2, 3], [4]]) == 2  # mixed: duplicate KV head 0, pad KV head 1
    assert _group_layout([[0, 1, 2, 3], [4]], 2) == ([0, 1, 2, 3, 4, None], [0, 0, 1])


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_other_outtypes_load_and_are_reported(outtype, smol_dir, partial, tmp_path):
    base = build("llama", 4, 2)
    slim = slim_model(base, mask_for(base, "per_layer"), gqa="map")
    res = write_gguf(slim, tmp_path / f"m-{outtype}.gguf", outtype=outtype, tokenizer_dir=smol_dir)
    reader = gguf.GGUFReader(res.path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    # per-layer arrays, which llama.cpp's deci graph reads for every layer
    assert reader.fields["deci.attention.head_count"].contents() == [row["heads"] for row in res.layers]
    assert reader.fields["deci.feed_forward_length"].contents() == [row["ffn"] for row in res.layers]
    want = outtype.upper()
    assert types["blk.1.attn_q.weight"] == want and types["blk.1.attn_norm.weight"] == "F32"
    if outtype == "q8_0":  # FFN widths padded with zero channels to blocks of 32, so ffn_down quantises too
        assert res.layers[1]["ffn"] == 64 and res.layers[2]["ffn"] == 32
        assert types["blk.1.ffn_down.weight"] == "Q8_0"
    agree = compare_with_hf(res.path, slim, PROMPT, N_TOKENS, banned=SPECIAL, partial=partial, exact=True)
    assert agree["n_tokens"] == N_TOKENS  # llama.cpp loads and runs it
    print(f"{outtype}: token agreement {agree['agreement']:.3f}, mean |dlogprob| {agree['mean_abs_logprob_diff']:.4f}")


def test_tokenizer_from_hf_equals_the_source_ggufs(smol_dir, tmp_path):
    """Built from the HF tokenizer as llama.cpp's converter does, SmolLM2's fields equal its own GGUF's."""
    from gisp.deploy.gguf import _source_gguf

    base = build("llama", 4, 2, layers=2)
    res = write_gguf(base, tmp_path / "hf.gguf", tokenizer_dir=smol_dir)
    ours = {k: f.contents() for k, f in gguf.GGUFReader(res.path).fields.items() if k.startswith("tokenizer.")}
    source = _source_gguf(None, smol_dir)
    theirs = {k: f.contents() for k, f in gguf.GGUFReader(source).fields.items() if k.startswith("tokenizer.")}
    for key in ("tokens", "token_type", "merges", "model", "pre", "bos_token_id", "eos_token_id",
                "padding_token_id", "unknown_token_id", "add_bos_token"):
        assert ours[f"tokenizer.ggml.{key}"] == theirs[f"tokenizer.ggml.{key}"], key
    assert ours["tokenizer.chat_template"] == theirs["tokenizer.chat_template"]
    # llama.cpp tokenises a text as the HF tokenizer does: the text and its ids continue the same way
    from transformers import AutoTokenizer

    from gisp.deploy.gguf import LlamaCpp

    text = "The quick brown fox, 42 times: naïve café — 'quoted' text!"
    ids = AutoTokenizer.from_pretrained(smol_dir)(text)["input_ids"]
    with LlamaCpp(res.path, exact=True) as lc:
        a, b = lc.complete(text, 8, banned=SPECIAL), lc.complete(ids, 8, banned=SPECIAL)
    assert a["usage"]["prompt_tokens"] == len(ids) and a["ids"] == b["ids"] and a["logprobs"] == b["logprobs"]


@pytest.fixture(scope="module")
def tiny_run(tiny_dir, tmp_path_factory) -> Path:
    """A GISP run of the tiny on-disk Llama (SmolLM2 tokenizer), to 40% in 4 steps."""
    run = tmp_path_factory.mktemp("gguf_run") / "run"
    lm = gisp.load_model(str(tiny_dir), dtype="fp32", device="cpu")
    cfg = gisp.PruneConfig(target=0.4, steps=4, batch_size=4, protect_first=0.2)
    gisp.prune(copy.deepcopy(lm.model), cfg, random_calib(n=8, seq_len=16, vocab=lm.model.config.vocab_size),
               run_dir=run, progress=False, model_info={"name": str(tiny_dir), "path": str(tiny_dir)})
    return run


def gisp_cli(*args):
    return subprocess.run([sys.executable, "-m", "gisp", *map(str, args)], capture_output=True, text=True, timeout=300)


def test_cli_writes_many_levels_with_provenance(tiny_run, partial, tmp_path):
    out = tmp_path / "tiny-{sparsity}.gguf"
    r = gisp_cli("export", tiny_run, "--format", "gguf", "--sparsity", "0.2,0.4", "--out", out)
    assert r.returncode == 0, r.stderr
    traj = gisp.Trajectory.load(tiny_run)
    for s in (0.2, 0.4):
        path = tmp_path / f"tiny-{round(s * 100):02d}.gguf"
        fields = gguf.GGUFReader(path).fields
        step = traj.step_at(s)["step"]
        assert fields["gisp.step"].contents() == step
        assert fields["gisp.sparsity"].contents() == pytest.approx(traj.step_at(s)["sparsity"], abs=1e-6)
        assert fields["gisp.source.fingerprint"].contents() == traj.model["fingerprint"]
        assert json.loads(fields["gisp.export"].contents())["step"] == step
        hf = gisp.export(tiny_run, tmp_path / f"hf{s}", sparsity=s)
        assert_exact(path, gisp.load_pretrained(hf.path, dtype="fp32", device="cpu").model, partial)
        # the same level written from the HF export directory: the same tensors
        again = export_gguf(hf.path, tmp_path / f"again{s}.gguf")[0]
        tensors = [[(t.name, t.data.tobytes()) for t in gguf.GGUFReader(p).tensors] for p in (path, again.path)]
        assert tensors[0] == tensors[1]
    listing = sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".gguf")
    assert listing == ["again0.2.gguf", "again0.4.gguf", "tiny-20.gguf", "tiny-40.gguf"]


def test_budget_selects_a_level(tiny_run, tmp_path):
    traj = gisp.Trajectory.load(tiny_run)
    last = traj.steps[-1]
    (res,) = export_gguf(tiny_run, tmp_path / "b.gguf", max_params=10**12, outtype="f16")
    assert res.step == 0  # the largest model that fits is the dense one
    (res,) = export_gguf(tiny_run, tmp_path / "c.gguf", step=last["step"], outtype="q8_0")
    assert res.step == last["step"] and res.outtype == "q8_0"


def test_bad_input_is_one_line_and_leaves_no_file(tiny_run, tmp_path, monkeypatch):
    with pytest.raises(GispError, match="holds sparsities up to"):
        export_gguf(tiny_run, tmp_path / "x.gguf", sparsity=0.9)
    with pytest.raises(GispError, match="cannot be written"):
        export_gguf(tiny_run, tmp_path / "x.gguf", sparsity=0.2, outtype="q4_k")
    with pytest.raises(GispError, match="knows llama, mistral, qwen2, qwen3"):
        family_of("gpt2")
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(GispError, match="knows llama, mistral, qwen2, qwen3 models, not 'gpt2'"):
        export_gguf(tmp_path / "gpt2", tmp_path / "g.gguf")
    import shutil

    shutil.rmtree(tmp_path / "gpt2")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(GispError, match="cannot write"):
        export_gguf(tiny_run, blocker / "x.gguf", sparsity=0.2)
    (tmp_path / "exists.gguf").write_text("")
    with pytest.raises(GispError, match="already exists"):
        export_gguf(tiny_run, tmp_path / "exists.gguf", sparsity=0.2)
    # a failure while writing leaves neither the file nor its temporary
    import gisp.deploy.gguf as ge

    calls = {"n": 0}
    real = ge._encode

    def failing(t, q):
        calls["n"] += 1
        if calls["n"] > 5:
            raise RuntimeError("disk full")
        return real(t, q)

    monkeypatch.setattr(ge, "_encode", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        export_gguf(tiny_run, tmp_path / "out" / "y.gguf", sparsity=0.2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.gguf", "file", "out"]
    assert list((tmp_path / "out").iterdir()) == []


def test_cli_errors_are_one_line(tiny_run, tmp_path):
    for args, match in ((("--sparsity", "0.9", "--out", tmp_path / "a.gguf"), "holds sparsities up to"),
                        (("--sparsity", "0.2", "--outtype", "q4_k", "--out", tmp_path / "a.gguf"),
                         "cannot be written")):
        r = gisp_cli("export", tiny_run, "--format", "gguf", *args)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        errors = [line for line in r.stderr.splitlines() if line.startswith("gisp: error:")]
        assert len(errors) == 1 and match in errors[0]
    assert not list(tmp_path.iterdir())


@pytest.mark.integration
def test_smollm2_levels_in_llamacpp(smollm2, tmp_path):
    """The real SmolLM2 at two levels of a short run: exact in f32; f16 and q8_0 agreement reported."""
    from gisp.core.calibration import build_calibration

    run = tmp_path / "run"
    calib = build_calibration("lm", "c4", smollm2.tokenizer, 8, 64, 0)
    gisp.prune(copy.deepcopy(smollm2.model), gisp.PruneConfig(target=0.5, steps=2, batch_size=8, calib_samples=8,
                                                              seq_len=64),
               calib, run_dir=run, progress=False, model_info={"name": "smollm2-135m", "path": smollm2.path})
    text = "The capital of France is Paris. The capital of Italy is Rome. Once upon a time, there was a"
    for s in (step["sparsity"] for step in gisp.Trajectory.load(run).steps[1:]):
        hf = gisp.export(run, tmp_path / f"hf{s}", sparsity=s)
        model = gisp.load_pretrained(hf.path, dtype="fp32", device="cpu").model
        (f32,) = export_gguf(run, tmp_path / f"smol{s}.gguf", sparsity=s)
        assert f32.per_layer and f32.arch == "deci"
        res = compare_with_hf(f32.path, model, text, N_TOKENS, tokenizer=smollm2.tokenizer, exact=True,
                              banned=SPECIAL)
        assert res["prompt_tokens_llama"] == res["prompt_tokens_hf"]  # the copied tokenizer tokenises alike
        assert res["same_prefix"] == N_TOKENS and res["max_abs_logprob_diff"] <= LOGPROB_TOL, res
        for outtype in ("f16", "q8_0"):
            (q,) = export_gguf(run, tmp_path / f"smol{s}-{outtype}.gguf", sparsity=s, outtype=outtype)
            agree = compare_with_hf(q.path, model, text, 64, tokenizer=smollm2.tokenizer, exact=False,
                                    banned=SPECIAL)
            print(f"SmolLM2 {s:.0%} {outtype}: token agreement {agree['agreement']:.3f} over 64 tokens, "
                  f"mean |dlogprob| {agree['mean_abs_logprob_diff']:.4f}, {q.size_bytes / 1e6:.1f} MB")
            assert agree["agreement"] >= 0.8
