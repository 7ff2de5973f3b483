"""``gisp compare`` on a tiny in-process model: outputs, provenance, resumption, refusals."""

import json

import pytest
import torch
from tests.conftest import VOCAB, CharTokenizer, one_thread_fixture, tiny_model

import gisp
import gisp.compare.runner as compare_mod
from gisp.architectures import apply_mask
from gisp.compare import CompareConfig, compare
from gisp.loading import LoadedModel

TOKENIZER = CharTokenizer()  # one instance: token streams are cached per tokenizer
METHODS = ["gisp", "flap", "wanda-sp", "shortgpt", "magnitude"]


one_thread = one_thread_fixture("module")


def config(out, **kw):
    base = dict(model="tiny", methods=METHODS, sparsities=[0.2, 0.4], out=str(out), calib="c4", calib_samples=6,
                seq_len=24, steps=10, ppl="wiki", window=24, max_windows=3, batch_size=8)
    return CompareConfig(**{**base, **kw})


def loaded():
    return LoadedModel(tiny_model("llama", 2), TOKENIZER, "tiny", "")


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp")
    results = compare(config(out), progress=False, log=lambda m: None, loaded=loaded(), command="gisp compare tiny")
    return out, results


def test_writes_results_markdown_and_plot(done):
    out, results = done
    for f in ("results.json", "results.md", "perplexity.png", "compare.json", "model.json", "calibration.json"):
        assert (out / f).is_file(), f
    res = json.loads((out / "results.json").read_text())
    assert res["complete"] and len(res["rows"]) == len(METHODS) * 2
    assert res["dense"]["sparsity"] == 0.0 and res["dense"]["ppl"]["windows"] == 3
    # provenance of every number
    assert res["model"]["fingerprint"] and res["model"]["dense_params"] > 0
    assert res["calibration"]["name"] == "c4" and res["calibration"]["samples"] == 6
    assert res["calibration"]["seq_len"] == 24 and res["calibration"]["seed"] == 0
    assert res["protocol"]["window"] == 24 and res["protocol"]["windows"] == 3
    assert res["protocol"]["eval_dtype"] == "fp32" and res["versions"]["torch"]
    assert res["methods"]["gisp"]["settings"]["steps"] == 10 and res["methods"]["flap"]["reference"]
    for row in res["rows"]:
        slack = 0.25 if row["method"] == "shortgpt" else 0.05  # ShortGPT: within one of the 4 layers
        assert row["requested_sparsity"] - slack <= row["sparsity"] <= row["requested_sparsity"] + 1e-9
        assert row["ppl"]["ppl"] > 1 and row["level"]
    flap = [r for r in res["rows"] if r["method"] == "flap"]
    assert all(r["compensated"] for r in flap)
    assert all(not r["compensated"] for r in res["rows"] if r["method"] != "flap")
    md = (out / "results.md").read_text()
    assert "| gisp | yes |" in md and "| wanda-sp | no |" in md and "24-token windows" in md
    # the masks are saved in gisp's formats: one trajectory per nested method, FLAP's biases beside it
    assert gisp.Trajectory.load(out / "methods" / "gisp").completed
    assert (out / "methods" / "flap" / "trajectory.json").is_file()
    assert (out / "methods" / "flap" / "s0.2" / "compensation.safetensors").is_file()
    assert (out / "methods" / "wanda-sp" / "s0.4" / "trajectory.json").is_file()


def test_compensation_changes_flaps_evaluation(done):
    """The row of FLAP is the compensated model; without the biases the number differs."""
    out, res = done
    row = next(r for r in res["rows"] if r["method"] == "flap" and r["requested_sparsity"] == 0.4)
    level = compare_mod.Store(out).load_level("flap", 0.4)
    model = tiny_model("llama", 2)
    apply_mask(model, level.mask)
    cfg = config(out)
    plain = compare_mod.evaluate_model(model, TOKENIZER, cfg, False)["ppl"]["ppl"]
    with gisp.baselines.apply_compensation(model, level.compensation):
        comp = compare_mod.evaluate_model(model, TOKENIZER, cfg, False)["ppl"]["ppl"]
    assert comp == pytest.approx(row["ppl"]["ppl"], rel=1e-6) and plain != pytest.approx(comp, rel=1e-6)


def test_flap_compensation_survives_export_and_gisp_eval(done, tmp_path, monkeypatch):
    """A FLAP level of a compare directory exports with real o_proj/down_proj biases (a standard Llama with
    attention_bias/mlp_bias) that reproduce the compensated masked model, and gisp eval applies them too."""
    out, res = done
    level = compare_mod.Store(out).load_level("flap", 0.4)
    masked = tiny_model("llama", 2)
    apply_mask(masked, level.mask)
    ids = torch.randint(1, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), gisp.baselines.apply_compensation(masked, level.compensation):
        want = masked(ids).logits
    result = gisp.export(out / "methods" / "flap", tmp_path / "flap40", sparsity=0.4, model=tiny_model("llama", 2))
    assert result.record["compensation"]["attn_layers"] or result.record["compensation"]["mlp_layers"]
    slim = gisp.load_pretrained(tmp_path / "flap40", tokenizer=False).model
    assert slim.config.attention_bias and slim.config.mlp_bias
    with torch.no_grad():
        got = slim(ids).logits
    assert (got - want).abs().max() < 1e-4
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in masked.parameters())

    import gisp.evaluation.evaluate as ev

    monkeypatch.setattr(ev, "load_base_model", lambda *a, **k: loaded())
    row = ev.evaluate(out / "methods" / "flap", [0.4], ppl="wiki", window=24, max_windows=3, progress=False)["rows"][0]
    flap = next(r for r in res["rows"] if r["method"] == "flap" and r["requested_sparsity"] == 0.4)
    assert row["compensation"] and row["ppl"]["ppl"] == pytest.approx(flap["ppl"]["ppl"], rel=1e-6)
    with pytest.raises(gisp.GispError, match="compensation"):
        gisp.export(out / "methods" / "flap", tmp_path / "u", sparsity=0.4, model=tiny_model("llama", 2), uniform=True)


def test_second_call_does_no_work(done, monkeypatch):
    out, results = done

    def boom(*a, **k):
        raise AssertionError("work was redone")

    monkeypatch.setattr(compare_mod, "evaluate_model", boom)
    monkeypatch.setattr(compare_mod, "_run", boom)
    again = compare(config(out), progress=False, log=lambda m: None, loaded=None, command="gisp compare tiny")
    assert again["rows"] == results["rows"]


def test_resumes_only_what_is_missing(done, monkeypatch, tmp_path):
    out, results = done
    import shutil

    copy = tmp_path / "cmp"
    shutil.copytree(out, copy)
    (copy / "rows" / "wanda-sp@s0.4.json").unlink()  # evaluated row lost, its masks kept
    (copy / "rows" / "shortgpt@s0.2.json").unlink()
    shutil.rmtree(copy / "methods" / "shortgpt")  # masks lost too: rerun that method only
    runs, evals = [], []
    real_eval = compare_mod.evaluate_model
    monkeypatch.setattr(compare_mod, "evaluate_model", lambda *a, **k: evals.append(1) or real_eval(*a, **k))
    for cls in gisp.baselines.METHODS.values():
        def spy(self, *a, _orig=cls.run, **k):
            runs.append(self.name)
            return _orig(self, *a, **k)
        monkeypatch.setattr(cls, "run", spy)
    again = compare(config(copy), progress=False, log=lambda m: None, loaded=loaded())
    assert runs == ["shortgpt"] and len(evals) == 2
    before = {(r["method"], r["requested_sparsity"]): r["ppl"]["ppl"] for r in results["rows"]}
    after = {(r["method"], r["requested_sparsity"]): r["ppl"]["ppl"] for r in again["rows"]}
    assert after == pytest.approx(before)


def test_refuses_a_different_protocol_in_the_same_directory(done):
    out, _ = done
    with pytest.raises(gisp.GispError, match="different settings"):
        compare(config(out, window=32), progress=False, log=lambda m: None, loaded=loaded())


@pytest.mark.parametrize("kw,match", [
    ({"methods": ["gisp", "nope"]}, "unknown method 'nope'"),
    ({"sparsities": [0.2, 1.5]}, r"must be in \(0, 1\)"),
    ({"window": 1}, "--window"),
    ({"methods": []}, "no methods"),
])
def test_bad_settings_are_one_line_errors(tmp_path, kw, match):
    with pytest.raises(gisp.GispError, match=match):
        config(tmp_path, **kw)


def test_tasks_hook_adds_mean_accuracy_and_its_plot(tmp_path, monkeypatch):
    """With --tasks every row gets the task module's results and their mean accuracy (the module is stubbed)."""
    import gisp.tasks

    calls = []

    def fake(model, tokenizer, tasks, *, limit=None, progress=True, **kw):
        calls.append((tuple(tasks), limit))
        return {"piqa": {"metric": "acc_norm", "value": 0.6}, "arc_easy": {"metric": "acc_norm", "value": 0.5},
                "gsm8k": {"metric": "bpb", "value": 1.7}}

    monkeypatch.setattr(gisp.tasks, "evaluate_tasks", fake)
    res = compare(config(tmp_path, methods=["magnitude"], sparsities=[0.3], tasks=["piqa", "arc_easy", "gsm8k"],
                         limit=5), progress=False, log=lambda m: None, loaded=loaded())
    assert calls == [(("piqa", "arc_easy", "gsm8k"), 5)] * 2  # dense + one level
    assert res["dense"]["mean_acc"] == pytest.approx(0.55) and res["rows"][0]["mean_acc"] == pytest.approx(0.55)
    assert (tmp_path / "accuracy.png").is_file() and "Mean accuracy" in (tmp_path / "results.md").read_text()


def test_task_aligned_gisp_calibrates_on_multiple_choice(tmp_path):
    """gisp-margin runs GISP with the margin objective on cmqa questions; the lm methods keep c4 windows."""
    from transformers import AutoTokenizer

    from gisp.loading import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m")[0])
    smol = LoadedModel(tiny_model("llama", 2, vocab=len(tok)), tok, "tiny", "")
    res = compare(config(tmp_path, methods=["gisp", "gisp-margin"], sparsities=[0.2], seq_len=64, calib_samples=7),
                  progress=False, log=lambda m: None, loaded=smol)
    prov = res["calibration_margin"]
    assert prov["objective"] == "margin" and prov["source"] == "cmqa" and len(prov["tasks"]) == 7
    assert res["calibration"]["name"] == "c4"
    lm, margin = (gisp.Trajectory.load(tmp_path / "methods" / m) for m in ("gisp", "gisp-margin"))
    assert lm.config["objective"] == "lm" and margin.config["objective"] == "margin"
    assert margin.calibration["objective"] == "margin"
    rows = {r["method"]: r for r in res["rows"]}
    assert 0.1 < rows["gisp"]["sparsity"] <= 0.2 and 0.1 < rows["gisp-margin"]["sparsity"] <= 0.2  # coarse tiny model
    assert "Calibration of `gisp-margin`" in (tmp_path / "results.md").read_text()


def test_reconstruct_adds_rows_next_to_each_method(tmp_path):
    """--reconstruct lsq: every masked level also as METHOD+lsq (FLAP's own compensation replaced), same protocol;
    adding it to a finished comparison prunes nothing again."""
    out = tmp_path / "r"
    compare(config(out, methods=["magnitude", "flap"], sparsities=[0.4]), progress=False, log=lambda m: None,
            loaded=loaded())
    calls = []
    res = compare(config(out, methods=["magnitude", "flap"], sparsities=[0.4], reconstruct=["lsq", "bias"]),
                  progress=False, log=calls.append, loaded=loaded())
    assert not any("pruning" in c for c in calls)
    by = {r["method"]: r for r in res["rows"]}
    assert set(by) == {"magnitude", "magnitude+lsq", "magnitude+bias", "flap", "flap+lsq", "flap+bias"}
    assert res["complete"] and set(res["methods"]) == set(by)
    assert by["magnitude+lsq"]["reconstruction"]["method"] == "lsq" and not by["magnitude+lsq"]["compensated"]
    assert by["magnitude+bias"]["compensated"] and by["flap"]["compensated"]
    assert by["magnitude+lsq"]["sparsity"] == by["magnitude"]["sparsity"]
    assert by["magnitude+lsq"]["ppl"]["ppl"] != by["magnitude"]["ppl"]["ppl"]
    # FLAP's compensation is the bias reconstruction of its own masks on the same calibration windows
    assert by["flap+bias"]["ppl"]["ppl"] == pytest.approx(by["flap"]["ppl"]["ppl"], rel=1e-4)
    assert "magnitude+lsq" in (out / "results.md").read_text()
