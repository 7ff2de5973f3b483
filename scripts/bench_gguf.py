"""Benchmark GGUF exports in llama.cpp: one GISP run on SmolLM2-135M, dense and 20/30/40/50% as GGUF.

For every level and weight type (f16, q8_0) the script writes the GGUF file with
``gisp export --format gguf`` (the Python API), loads it in llama.cpp (the ``xllamacpp``
build, its default settings: f16 KV cache, flash attention auto) and records llama.cpp's own
prompt-processing and generation throughput; the same levels run in transformers (the HF
export, fp32) in the same process, round-robin with llama.cpp, so the machine's load hits every
model alike. Speed-ups are within one engine, next to the ideal one (dense matmul weights per
token / pruned ones). Agreement with the HF export: f32 files greedy-exact, f16/q8_0 token
agreement and mean |logprob difference|, teacher-forced over a fixed text.

    python scripts/bench_gguf.py --run runs/smol10        # reuse a run (10 steps to 0.5 hits 20/30/40/50%)
    python scripts/bench_gguf.py                          # prunes one first (README command, 10 steps)
    python scripts/bench_gguf.py --quick                  # a smoke run: fewer tokens, one repetition
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_common import command, machine, md_table  # noqa: E402

LEVELS = (0.0, 0.2, 0.3, 0.4, 0.5)
OUTTYPES = ("f16", "q8_0")
TEXT = ("The history of the city begins in the Roman period, when a small settlement grew around the river "
        "crossing. In the Middle Ages it became a market town, and its cathedral, begun in 1150, took")


def matmul_params(model: torch.nn.Module) -> int:
    """Weights multiplied per token: every linear layer, lm_head included (tied or not)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def ensure_run(args) -> Path:
    run = Path(args.run)
    if (run / "trajectory.json").is_file():
        return run
    cmd = [sys.executable, "-m", "gisp", "prune", "smollm2-135m", "--out", str(run), "--calib", "c4",
           "--calib-samples", "16", "--seq-len", "128", "--steps", "10", "--target", "0.5"]
    print("pruning:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return run


def prompt_ids(tokenizer, n: int) -> list[int]:
    from gisp.core.data import token_stream

    stream, _ = token_stream("wiki", "eval", tokenizer)
    return stream[:n].tolist()


class HFTimer:
    def __init__(self, model, ids: list[int], n_gen: int) -> None:
        self.model, self.ids, self.n_gen = model, torch.tensor([ids]), n_gen
        self.pp: list[float] = []
        self.tg: list[float] = []
        self.pp_cpu: list[float] = []
        self.tg_cpu: list[float] = []

    @torch.no_grad()
    def gen(self, n: int) -> tuple[float, float]:
        t, c = time.perf_counter(), time.process_time()
        self.model.generate(self.ids, attention_mask=torch.ones_like(self.ids), max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, pad_token_id=0)
        return time.perf_counter() - t, time.process_time() - c

    @torch.no_grad()
    def once(self) -> None:
        t, c = time.perf_counter(), time.process_time()
        self.model(input_ids=self.ids)
        self.pp.append(self.ids.shape[1] / (time.perf_counter() - t))
        self.pp_cpu.append(self.ids.shape[1] / (time.process_time() - c))
        (w1, c1), (wn, cn) = self.gen(1), self.gen(self.n_gen)
        self.tg.append((self.n_gen - 1) / max(1e-9, wn - w1))
        self.tg_cpu.append((self.n_gen - 1) / max(1e-9, cn - c1))


def run_benchmark(args) -> None:
    import gisp
    from gisp.deploy.gguf import LlamaCpp, compare_with_hf, export_gguf, partial_utf8_tokens

    t0 = time.time()
    torch.set_num_threads(args.threads)
    info = machine()
    run = ensure_run(args)
    traj = gisp.Trajectory.load(run)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    lm = gisp.load_model("smollm2-135m", dtype="fp32", device="cpu")
    ids = prompt_ids(lm.tokenizer, args.prompt)
    rows = []
    for s in LEVELS:
        step = traj.step_at(s)
        hf_dir = work / f"hf-{round(s * 100):02d}"
        if not (hf_dir / "config.json").is_file():
            gisp.export(run, hf_dir, sparsity=s, model=lm.model, tokenizer=lm.tokenizer)
        model = gisp.load_pretrained(hf_dir, dtype="fp32", device="cpu").model
        row = {"level": s, "step": step["step"], "sparsity": step["sparsity"], "hf_dir": str(hf_dir),
               "matmul_params": matmul_params(model), "files": {}}
        for outtype in ("f32", *OUTTYPES):
            path = work / f"smol-{round(s * 100):02d}-{outtype}.gguf"
            meta_file = path.with_suffix(".json")
            meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
            if "agreement" not in meta:  # written and checked once; reruns reuse files and results
                (res,) = export_gguf(run, path, sparsity=s, outtype=outtype, model=lm.model, tokenizer=lm.tokenizer,
                                     overwrite=True)
                meta = {"arch": res.arch, "per_layer": res.per_layer, "size_bytes": res.size_bytes,
                        "gguf_matmul_params": res.matmul_params,
                        "zero_heads": sum(r["zero_heads"] for r in res.layers)}
                agree = compare_with_hf(path, model, TEXT, args.agree_tokens, tokenizer=lm.tokenizer,
                                        exact=outtype == "f32", banned=range(17), partial=partial_utf8_tokens(path),
                                        threads=args.threads)
                meta.update(path=str(path), agreement=agree["agreement"], same_prefix=agree["same_prefix"],
                            n_tokens=agree["n_tokens"], mean_abs_logprob_diff=agree["mean_abs_logprob_diff"],
                            max_abs_logprob_diff=agree["max_abs_logprob_diff"])
                meta_file.write_text(json.dumps(meta))
                if outtype == "f32" and not args.keep_f32:
                    path.unlink()
            row["files"][outtype] = meta
            print(f"{s:.0%} {outtype}: {meta['arch']}, {meta['size_bytes'] / 1e6:.1f} MB, agreement "
                  f"{meta['agreement']:.3f} ({meta['same_prefix']}/{meta['n_tokens']} in a row), "
                  f"mean |dlogprob| {meta['mean_abs_logprob_diff']:.2e}", flush=True)
        rows.append(row)
        del model
    # timings: every model loaded once, measured round-robin
    servers = {(r["level"], t): LlamaCpp(r["files"][t]["path"], threads=args.threads, n_ctx=1024)
               for r in rows for t in OUTTYPES}
    hf = {r["level"]: HFTimer(gisp.load_pretrained(r["hf_dir"], dtype="fp32", device="cpu").model, ids, args.gen)
          for r in rows}
    body = {"prompt": ids, "n_predict": args.gen, "temperature": 0, "cache_prompt": False, "ignore_eos": True}
    timings: dict = {k: {"pp": [], "tg": [], "pp_cpu": [], "tg_cpu": []} for k in servers}
    for srv in servers.values():  # warm-up
        srv.server.handle_completions({**body, "n_predict": 4})
    for t in hf.values():
        t.gen(2)
    for rep in range(args.reps):
        for r in rows:
            for t in OUTTYPES:
                srv, rec = servers[(r["level"], t)].server, timings[(r["level"], t)]
                c0 = time.process_time()
                srv.handle_completions({**body, "n_predict": 1})
                c1 = time.process_time()
                out = srv.handle_completions(body)["timings"]
                c2 = time.process_time()
                rec["pp"].append(out["prompt_per_second"])
                rec["tg"].append(out["predicted_per_second"])
                rec["pp_cpu"].append(len(ids) / (c1 - c0))
                rec["tg_cpu"].append((args.gen - 1) / max(1e-9, (c2 - c1) - (c1 - c0)))
            hf[r["level"]].once()
        print(f"repetition {rep + 1}/{args.reps} done", flush=True)
    for r in rows:
        for t in OUTTYPES:
            r["files"][t]["pp_tok_s"] = timings[(r["level"], t)]["pp"]
            r["files"][t]["tg_tok_s"] = timings[(r["level"], t)]["tg"]
            r["files"][t]["pp_cpu_tok_s"] = timings[(r["level"], t)]["pp_cpu"]
            r["files"][t]["tg_cpu_tok_s"] = timings[(r["level"], t)]["tg_cpu"]
        r["hf_pp_tok_s"], r["hf_tg_tok_s"] = hf[r["level"]].pp, hf[r["level"]].tg
        r["hf_pp_cpu_tok_s"], r["hf_tg_cpu_tok_s"] = hf[r["level"]].pp_cpu, hf[r["level"]].tg_cpu
    info["load_average_at_end"] = " ".join(f"{x:.1f}" for x in __import__("os").getloadavg())
    raw = {"machine": info, "command": command(), "seconds": time.time() - t0, "threads": args.threads,
           "prompt_tokens": args.prompt, "gen_tokens": args.gen, "reps": args.reps, "run": str(run),
           "run_config": traj.config, "rows": rows}
    write_doc(raw, Path(args.doc), Path(args.json))


def write_doc(raw: dict, doc: Path, json_path: Path) -> None:
    from gisp.provenance import atomic_write_json, atomic_write_text

    med = statistics.median
    rows = raw["rows"]
    dense = rows[0]

    def label(r: dict) -> str:
        return "dense" if r["level"] == 0 else f"{r['level']:.0%}"

    def cell(r: dict, key: str, fmt: str, f: dict | None = None, fd: dict | None = None) -> str:
        src, ref = (f, fd) if f is not None else (r, dense)
        v = med(src[key])
        return f"{v:{fmt}} ({v / med(ref[key]):.2f}x)"

    summary, tables = [], {"cpu": [], "wall": []}
    for r in rows:
        ideal = dense["matmul_params"] / r["matmul_params"]
        sp = [f"{med(r['files'][t][k]) / med(dense['files'][t][k]):.2f}x" for t in OUTTYPES
              for k in ("pp_cpu_tok_s", "tg_cpu_tok_s")]
        sp += [f"{med(r[k]) / med(dense[k]):.2f}x" for k in ("hf_pp_cpu_tok_s", "hf_tg_cpu_tok_s")]
        summary.append([label(r), f"{r['sparsity']:.3f}", f"{ideal:.2f}x", *sp])
        for clock, (pk, tk) in (("cpu", ("pp_cpu_tok_s", "tg_cpu_tok_s")), ("wall", ("pp_tok_s", "tg_tok_s"))):
            line = [label(r), r["step"], f"{r['sparsity']:.3f}", f"{ideal:.2f}x"]
            for t in OUTTYPES:
                f, fd = r["files"][t], dense["files"][t]
                written = fd["gguf_matmul_params"] / f["gguf_matmul_params"]
                line += [f"{f['size_bytes'] / 1e6:.0f}", f"{written:.2f}x", cell(r, pk, ".0f", f, fd),
                         cell(r, tk, ".1f", f, fd)]
            line += [cell(r, f"hf_{pk}", ".0f"), cell(r, f"hf_{tk}", ".1f")]
            tables[clock].append(line)
    header = ["level", "step", "sparsity", "ideal", *[f"{t} {c}" for t in OUTTYPES for c in
                                                       ("MB", "written", "pp tok/s", "tg tok/s")],
              "transformers pp tok/s", "transformers tg tok/s"]
    def spread_of(keys: tuple[str, ...]) -> float:
        series = [r["files"][t][k] for r in rows for t in OUTTYPES for k in keys]
        series += [r["hf_" + k] for r in rows for k in keys]
        return max(max(x) / min(x) for x in series if x)

    spread = spread_of(("pp_tok_s", "tg_tok_s"))
    spread_cpu = spread_of(("pp_cpu_tok_s", "tg_cpu_tok_s"))
    summary_header = ["level", "sparsity", "ideal", *[f"llama.cpp {t} {c}" for t in OUTTYPES for c in ("pp", "tg")],
                      "transformers pp", "transformers tg"]
    agree = []
    for r in rows:
        label = "dense" if r["level"] == 0 else f"{r['level']:.0%}"
        f32 = r["files"]["f32"]
        line = [label, f32["arch"], f"{f32['same_prefix']}/{f32['n_tokens']}", f"{f32['max_abs_logprob_diff']:.1e}"]
        for t in OUTTYPES:
            f = r["files"][t]
            line += [f"{f['agreement']:.3f}", f"{f['mean_abs_logprob_diff']:.4f}"]
        agree.append(line)
    m = raw["machine"]
    text = f"""# GGUF in llama.cpp: SmolLM2-135M, dense and 20-50% from one GISP run

Written by `scripts/bench_gguf.py` (nothing typed by hand). Every level of one run is written by
`gisp export --format gguf` and run in llama.cpp (the `xllamacpp` {_xv()} CPU build, its default
settings: f16 KV cache, flash attention auto), next to the same level as an HF export in transformers.

- Command: `{raw['command']}` ({raw['seconds'] / 60:.1f} min in all)
- Machine: {m.get('cpu', '?')}, {m.get('cores_usable', '?')} usable cores, shared with other jobs (load average
  {m.get('load_average_at_start', '?')} at start, {m.get('load_average_at_end', '?')} at end); threads in llama.cpp
  and torch: {raw['threads']}; torch {m.get('torch')}, transformers {m.get('transformers')}
- Run: `{raw['run']}`, {raw['run_config'].get('steps')} steps to {raw['run_config'].get('target')}, calibration
  `{raw['run_config'].get('calib')}`; a level is the last step at or below the asked sparsity
- Throughput: a {raw['prompt_tokens']}-token prompt (wiki eval text) and {raw['gen_tokens']} generated tokens.
  llama.cpp: its own timings (`prompt_per_second`, `predicted_per_second`) for wall-clock; for CPU time,
  a request generating 1 token (prompt processing) and one generating {raw['gen_tokens']}, the difference being
  generation. transformers (fp32, HF export, `gisp.load_pretrained`): one forward of the prompt, and
  (time for {raw['gen_tokens']} new tokens - time for 1) with `generate`. {raw['reps']} repetitions, all models
  loaded at once and timed round-robin in one process; medians; in brackets the speed-up over dense in the
  same engine and type
- ideal = dense matmul weights per token / the level's (all linear layers and lm_head; attention over the
  context and norms not counted); written = the same ratio for what the GGUF file multiplies (zero heads and
  channels that make groups even or FFN widths blocks of 32 included)

## Speed-ups over dense (CPU time, same engine and type)

{md_table(summary_header, summary)}

## Speed and size, CPU time

Throughput per CPU-second of the process (llama.cpp's and torch's threads together): what the work
costs, little disturbed by the other jobs on the machine.

{md_table(header, tables["cpu"])}

## Speed and size, wall-clock (llama.cpp's own timings)

What a user waits; on this shared machine one model's wall-clock throughput varied by up to {spread:.1f}x
between repetitions (CPU time: {spread_cpu:.1f}x), so these ratios are noisier (raw repetitions in
`docs/bench_gguf.json`).

{md_table(header, tables["wall"])}

## Agreement with the HF export (the same level in transformers)

Teacher-forced over a fixed text ({rows[0]['files']['f32']['n_tokens']} tokens llama.cpp generates greedily after
"{TEXT[:60]}..."): f32 in exact mode (f32 KV cache, no flash attention): tokens equal in a row and the largest
|logprob difference|; f16/q8_0 with llama.cpp's defaults: the fraction of positions where HF's greedy token is
llama.cpp's, and the mean |logprob difference| of llama.cpp's tokens.

{md_table(["level", "f32 arch", "f32 tokens equal", "f32 max abs dlogprob",
           *[f"{t} {c}" for t in OUTTYPES for c in ("agreement", "mean abs dlogprob")]], agree)}
"""
    atomic_write_text(doc, text)
    atomic_write_json(json_path, raw)
    print(f"wrote {doc} and {json_path}")


def _xv() -> str:
    try:
        from importlib.metadata import version

        return version("xllamacpp")
    except Exception:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="/tmp/gisp-bench-gguf/run", help="a SmolLM2 run (pruned first if missing)")
    ap.add_argument("--work", default="/tmp/gisp-bench-gguf", help="where the exports and GGUF files go")
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp and torch threads (1: CPU time is the work)")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--agree-tokens", type=int, default=64)
    ap.add_argument("--keep-f32", action="store_true", help="keep the f32 files (used only for the exactness check)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "bench_gguf.md"))
    ap.add_argument("--json", default=str(ROOT / "docs" / "bench_gguf.json"))
    ap.add_argument("--render", action="store_true", help="rewrite --doc from --json only (no measuring)")
    args = ap.parse_args()
    if args.render:
        write_doc(json.loads(Path(args.json).read_text()), Path(args.doc), Path(args.json))
        return
    if args.quick:
        args.prompt, args.gen, args.reps, args.agree_tokens = 32, 8, 1, 16
    run_benchmark(args)


if __name__ == "__main__":
    main()
