"""Benchmark gisp export on SmolLM2-135M: size, memory and speed of the exported models.

One GISP run (lm objective, c4 calibration) is exported at several sparsities,
with and without ``round_to``; every model (and the dense base) is then loaded
in a fresh subprocess that measures peak RSS, prefill throughput (batch 1, N
tokens) and greedy decode throughput with the KV cache. Speed-ups are shown
next to the ideal one, dense FLOPs per token / pruned FLOPs per token (all
linear layers and lm_head, plus attention scores at the average context).

    python scripts/bench_export.py                      # full benchmark -> docs/bench_export.md
    python scripts/bench_export.py --quick              # a smoke run (few tokens, one repetition)
    python scripts/bench_export.py measure DIR          # one model, JSON on stdout (used internally)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _text_ids(tokenizer, n: int) -> torch.Tensor:
    from gisp.core.data import token_stream

    stream, _ = token_stream("wiki", "eval", tokenizer)
    return stream[:n].unsqueeze(0)


def _clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


class Timer:
    """Prefill and decode timings of one loaded model, in wall-clock and in process CPU time.

    CPU time is what the model's work costs this process; on a shared machine
    it is far less disturbed by other jobs than wall-clock time (with one torch
    thread it is exactly the compute; with more, spin-waiting threads add to it).
    """

    def __init__(self, model, tokenizer, prefill: int, decode: int) -> None:
        self.model, self.prefill, self.decode = model, prefill, decode
        self.ids = _text_ids(tokenizer, prefill)
        self.prompt = self.ids[:, :32]
        self.kw = dict(attention_mask=torch.ones_like(self.prompt), do_sample=False,
                       pad_token_id=tokenizer.eos_token_id)
        self.t: dict[str, list[float]] = {"prefill_wall": [], "prefill_cpu": [], "decode_wall": [], "decode_cpu": []}

    @torch.no_grad()
    def _gen(self, n: int) -> tuple[float, float]:
        w, c = _clocks()
        out = self.model.generate(self.prompt, max_new_tokens=n, min_new_tokens=n, **self.kw)
        assert out.shape[1] == self.prompt.shape[1] + n
        w2, c2 = _clocks()
        return w2 - w, c2 - c

    @torch.no_grad()
    def warm_up(self) -> None:
        self.model(input_ids=self.ids[:, :64], use_cache=True)
        self._gen(4)

    @torch.no_grad()
    def once(self) -> None:
        w, c = _clocks()
        self.model(input_ids=self.ids, use_cache=True)
        w2, c2 = _clocks()
        self.t["prefill_wall"].append(w2 - w)
        self.t["prefill_cpu"].append(c2 - c)
        (wn, cn), (w1, c1) = self._gen(self.decode), self._gen(1)
        self.t["decode_wall"].append((wn - w1) / (self.decode - 1))
        self.t["decode_cpu"].append((cn - c1) / (self.decode - 1))

    def result(self) -> dict:
        out: dict = {"timings_s": self.t}
        for clock in ("wall", "cpu"):
            pre, dec = self.t[f"prefill_{clock}"], self.t[f"decode_{clock}"]
            out[f"prefill_tok_s_{clock}"] = self.prefill / statistics.median(pre)
            out[f"prefill_tok_s_{clock}_best"] = self.prefill / min(pre)
            out[f"decode_tok_s_{clock}"] = 1.0 / statistics.median(dec)
            out[f"decode_tok_s_{clock}_best"] = 1.0 / min(dec)
        return out


def measure(path: str, prefill: int, decode: int, reps: int, threads: int | None = None) -> dict:
    """Load one model directory in this (fresh) process: peak memory, and timings if ``reps``."""
    import gisp

    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    loaded = gisp.load_pretrained(path, dtype="fp32", device="cpu")
    load_s = time.perf_counter() - t0
    timer = Timer(loaded.model, loaded.tokenizer, prefill, decode)
    timer.warm_up()
    timer.once()
    for _ in range(reps - 1):
        timer.once()
    return {"load_s": load_s, "peak_rss_mb": _peak_rss_mb(), "threads": torch.get_num_threads(),
            "params": sum(p.numel() for p in loaded.model.parameters()), **timer.result()}


def _peak_rss_mb() -> float:
    """High-water RSS of this process (VmHWM resets at exec, unlike ru_maxrss which a child inherits)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def flops_per_token(path: Path, ctx: float) -> float:
    """Multiply-adds x2 of every linear layer and lm_head, plus QK^T and AV at context ``ctx``."""
    cfg = json.loads((path / "config.json").read_text())
    hidden, d = cfg["hidden_size"], cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    per_layer = cfg.get("per_layer_config", {})
    total = 2 * hidden * cfg["vocab_size"]  # lm_head
    for i in range(cfg["num_hidden_layers"]):
        lc = {**cfg, **next((v for k, v in per_layer.items() if int(k) == i), {})}
        skip = set(lc.get("skip", []))
        if "self_attn" not in skip:
            h, kv = lc["num_attention_heads"], lc["num_key_value_heads"]
            total += 2 * hidden * d * (2 * h + 2 * kv) + 4 * h * d * ctx
        if "mlp" not in skip:
            total += 2 * 3 * hidden * lc["intermediate_size"]
    return float(total)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e6


def _measure_in_subprocess(path: Path, args) -> dict:
    # memory only: one prefill (the peak) and a short decode; timings are taken round-robin in the main process
    cmd = [sys.executable, str(Path(__file__).resolve()), "measure", str(path), "--prefill", str(args.prefill),
           "--decode", str(min(8, args.decode)), "--reps", "1"]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if r.returncode != 0:
        raise RuntimeError(f"measuring {path} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_benchmark(args) -> None:
    import gisp
    from gisp.core.calibration import build_calibration
    from gisp.provenance import atomic_write_json, atomic_write_text, versions

    started = time.time()
    load0 = os.getloadavg()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="gisp-bench-"))
    run_dir = work / "run"
    loaded = gisp.load_model("smollm2-135m", dtype="fp32", device="cpu")
    cfg = gisp.PruneConfig(target=args.target, steps=args.steps, objective="lm", calib="c4",
                           calib_samples=args.samples, seq_len=args.seq_len, batch_size=8, autocast="bf16")
    t0 = time.perf_counter()
    if not (run_dir / "trajectory.json").exists():
        calib = build_calibration("lm", "c4", loaded.tokenizer, args.samples, args.seq_len, cfg.seed)
        import copy

        gisp.prune(copy.deepcopy(loaded.model), cfg, calib, run_dir=run_dir, progress=False,
                   model_info={"name": "smollm2-135m", "path": loaded.path})
    reused = time.perf_counter() - t0 < 1.0
    traj = gisp.Trajectory.load(run_dir)
    prune_s = sum(rec.get("seconds", 0.0) for rec in traj.steps)  # as recorded by the run itself
    loss = {rec["step"]: rec.get("calib_loss") for rec in traj.steps}

    variants = [("dense", None, None)] + [(f"{s:.0%}", s, None) for s in args.sparsities]
    for n in args.round_to:
        variants += [(f"{s:.0%} round_to {n}", s, n) for s in args.sparsities]
    rows, timers = [], []
    for label, s, n in variants:
        if s is None:
            path = Path(loaded.path)
            info = {"step": 0, "sparsity": 0.0, "format": "llama (base)"}
        else:
            path = work / f"export-{s}-{n or 1}"
            if path.exists():
                shutil.rmtree(path)
            res = gisp.export(run_dir, path, model=loaded.model, tokenizer=loaded.tokenizer, sparsity=s, round_to=n)
            info = {"step": res.step, "sparsity": res.sparsity, "format": res.model_type,
                    "round_delta": (res.adjustment or {}).get("params_delta")}
        # peak memory in a fresh process (load, one prefill, one decode); timings below, interleaved
        mem = _measure_in_subprocess(path, args)
        ctx_pre, ctx_dec = args.prefill / 2, 32 + args.decode / 2
        rows.append({"label": label, "round_to": n, "sparsity_requested": s, **info,
                     "calib_loss": loss.get(info["step"]), "size_mb": _size_mb(path), "path": str(path),
                     "peak_rss_mb": mem["peak_rss_mb"], "load_s": mem["load_s"], "params": mem["params"],
                     "threads": mem["threads"], "flops_prefill": flops_per_token(path, ctx_pre),
                     "flops_decode": flops_per_token(path, ctx_dec)})
        model = loaded.model if s is None else gisp.load_pretrained(path, dtype="fp32", device="cpu").model
        timers.append(Timer(model, loaded.tokenizer, args.prefill, args.decode))
        print(f"{label:>18}: {mem['params'] / 1e6:6.1f}M params, peak {mem['peak_rss_mb']:.0f} MB", flush=True)
    for t in timers:
        t.warm_up()
    for rep in range(args.reps):  # round-robin, so load from other jobs hits every model alike
        for t in timers:
            t.once()
        print(f"repetition {rep + 1}/{args.reps} done", flush=True)
    for r, t in zip(rows, timers):
        r.update(t.result())
        print(f"{r['label']:>18}: prefill {r['prefill_tok_s_cpu']:7.1f} tok/s, decode "
              f"{r['decode_tok_s_cpu']:6.1f} tok/s (CPU time; wall {r['prefill_tok_s_wall']:.1f} / "
              f"{r['decode_tok_s_wall']:.1f})")
    if not args.keep:
        for r in rows[1:]:
            shutil.rmtree(r["path"], ignore_errors=True)
    dense = rows[0]
    for r in rows:
        for clock in ("wall", "cpu"):
            r[f"prefill_speedup_{clock}"] = r[f"prefill_tok_s_{clock}"] / dense[f"prefill_tok_s_{clock}"]
            r[f"decode_speedup_{clock}"] = r[f"decode_tok_s_{clock}"] / dense[f"decode_tok_s_{clock}"]
        r["ideal_prefill"] = dense["flops_prefill"] / r["flops_prefill"]
        r["ideal_decode"] = dense["flops_decode"] / r["flops_decode"]
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpu": _cpu_model(), "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "loadavg_start": load0, "loadavg_end": os.getloadavg()},
        "versions": versions(),
        "run": {"config": cfg.to_dict(), "prune_seconds": prune_s, "reused": reused, "steps": traj.steps,
                "dir": str(run_dir)},
        "protocol": {"prefill_tokens": args.prefill, "decode_tokens": args.decode, "repetitions": args.reps,
                     "dtype": "fp32", "batch": 1, "text": "wiki eval part (packaged), first tokens",
                     "decode_prompt_tokens": 32, "statistic": "median of repetitions"},
        "rows": rows,
        "seconds": time.time() - started,
    }
    out = Path(args.out)
    atomic_write_json(out.with_suffix(".json"), result)
    atomic_write_text(out, render(result))
    print(f"wrote {out} and {out.with_suffix('.json')} in {result['seconds']:.0f} s")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


def render(res: dict) -> str:
    m, v, p = res["machine"], res["versions"], res["protocol"]
    cfg = res["run"]["config"]
    rows = res["rows"]
    lines = [
        "# Export benchmark: SmolLM2-135M on CPU",
        "",
        "Physically smaller models written by `gisp export` from one GISP run, loaded with",
        "`gisp.load_pretrained`, measured at batch 1 in fp32. Written by `scripts/bench_export.py`.",
        "",
        f"- Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch threads {m['torch_threads']} "
        + ("(one thread: with two, OpenMP spin-waiting on the busy shared machine made even CPU time meaningless)"
           if m["torch_threads"] == 1 else "") + "; "
        f"load average {m['loadavg_start'][0]:.1f} at start, {m['loadavg_end'][0]:.1f} at end "
        "(the machine was shared with other jobs)",
        f"- Versions: gisp {v['gisp']}, torch {v['torch']}, transformers {v['transformers']}, "
        f"python {v['python']}, {v['platform']}",
        f"- Command: `{res['command']}` ({res['seconds'] / 60:.1f} min in all)",
        f"- Run: objective `{cfg['objective']}`, calibration `{cfg['calib']}` {cfg['calib_samples']} x "
        f"{cfg['seq_len']} tokens, {cfg['steps']} steps to target {cfg['target']} ({cfg['schedule']}, "
        f"normalisation `{cfg['normalize']}`), autocast {cfg['autocast']}; pruning took "
        f"{res['run']['prune_seconds']:.0f} s" + (" (run reused from --work)" if res["run"].get("reused") else ""),
        f"- Protocol: prefill = one forward of {p['prefill_tokens']} tokens (KV cache built); decode = greedy "
        f"`generate` of {p['decode_tokens']} new tokens after a {p['decode_prompt_tokens']}-token prompt, "
        "per-token time = (time for N tokens - time for 1) / (N - 1); "
        f"{p['repetitions']} repetitions after a warm-up, all models timed round-robin in one process "
        f"(so load from other jobs hits each alike), median reported; text: {p['text']}",
        "- Two clocks: **CPU time** of the process (what the work costs; little disturbed by other jobs) and "
        "**wall-clock** (what a user waits; inflated and noisy whenever the machine is busy)",
        "- Ideal speed-up = dense FLOPs per token / pruned FLOPs per token: every linear layer and lm_head "
        f"(tied to the embeddings), plus attention scores at the mean context ({p['prefill_tokens'] // 2} tokens "
        f"for prefill, {p['decode_prompt_tokens'] + p['decode_tokens'] // 2} for decode); embedding lookups, "
        "norms and activations are not counted",
        "- Peak RSS = high-water resident memory (VmHWM) of a fresh process that loads the model and runs one "
        "prefill and one decode (Python, torch and the tokenizer included: several hundred MB are not the model)",
        "- Sparsity = fraction of decoder-layer linear parameters removed; params include embeddings; calib loss "
        "= the run's calibration loss (c4) at the step's mask, before rounding",
        "",
        "## Size, memory and speed (CPU time)",
        "",
        "| model | step | sparsity | calib loss | params | file MB | peak RSS MB | prefill tok/s "
        "| prefill speed-up (ideal) | decode tok/s | decode speed-up (ideal) | format |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cl = "-" if r.get("calib_loss") is None else f"{r['calib_loss']:.3f}"
        lines.append(
            f"| {r['label']} | {r['step']} | {r['sparsity']:.3f} | {cl} | {r['params'] / 1e6:.1f}M | "
            f"{r['size_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['prefill_tok_s_cpu']:.0f} | "
            f"{r['prefill_speedup_cpu']:.2f}x ({r['ideal_prefill']:.2f}x) | {r['decode_tok_s_cpu']:.1f} | "
            f"{r['decode_speedup_cpu']:.2f}x ({r['ideal_decode']:.2f}x) | {r['format']} |")
    lines += [
        "",
        "## Wall-clock",
        "",
        "| model | prefill tok/s (best) | prefill speed-up | decode tok/s (best) | decode speed-up |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['prefill_tok_s_wall']:.0f} ({r['prefill_tok_s_wall_best']:.0f}) | "
            f"{r['prefill_speedup_wall']:.2f}x | {r['decode_tok_s_wall']:.1f} ({r['decode_tok_s_wall_best']:.1f}) | "
            f"{r['decode_speedup_wall']:.2f}x |")
    lines += ["", "## Reading the numbers", ""]
    for r in rows[1:]:
        if r["round_to"] is None:
            lines.append(
                f"- {r['label']}: {r['params'] / 1e6:.1f}M params ({r['size_mb']:.0f} MB on disk vs "
                f"{rows[0]['size_mb']:.0f}); CPU time: prefill {r['prefill_speedup_cpu']:.2f}x of an ideal "
                f"{r['ideal_prefill']:.2f}x, decode {r['decode_speedup_cpu']:.2f}x of an ideal "
                f"{r['ideal_decode']:.2f}x.")
    plain = {r["sparsity_requested"]: r for r in rows[1:] if r["round_to"] is None}
    for n in sorted({r["round_to"] for r in rows if r["round_to"]}):
        pre = [r["prefill_tok_s_cpu"] / plain[r["sparsity_requested"]]["prefill_tok_s_cpu"]
               for r in rows if r["round_to"] == n]
        dec = [r["decode_tok_s_cpu"] / plain[r["sparsity_requested"]]["decode_tok_s_cpu"]
               for r in rows if r["round_to"] == n]
        lines.append(f"- round_to {n} against the unrounded export at the same sparsity (CPU time): prefill "
                     f"{min(pre):.2f}x to {max(pre):.2f}x, decode {min(dec):.2f}x to {max(dec):.2f}x.")
    lines += [
        "",
        "Differences of about 10% or less between rows are within the run-to-run noise of this shared machine "
        "(compare the best and median wall-clock columns); in particular the `round_to` gains above moved by "
        "that much between repeated runs of this script, so they are suggestive, not established.",
        "",
        "Caveats that apply to every row: the model is tiny (135M) and a fifth of its per-token FLOPs is "
        "lm_head (49152 x 576), which pruning never touches (the ideal column includes it); at batch 1 on "
        "CPU, decode is bound by per-layer Python/dispatch overhead and memory traffic as much as by FLOPs, "
        "and neither shrinks with the widths, so measured speed-ups stay below the FLOP ratio; "
        "per-layer widths that are not multiples of the SIMD/GEMM blocking "
        "waste part of each kernel (what `round_to` addresses); with head_dim 64 every head count is already "
        "a multiple of 8 and 64 in width, so `round_to` 8/64 only moves MLP channel counts here; layers with "
        "uneven GQA groups gather KV heads with `index_select` in every step (`gqa=map`); the machine was "
        "shared with other jobs, so wall-clock numbers carry noise (the best repetition is shown next to the "
        "median; every repetition is in the JSON).",
        "",
        "Raw timings of every repetition: `docs/bench_export.json`.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    mp = sub.add_parser("measure")
    mp.add_argument("path")
    for a in (ap, mp):
        a.add_argument("--prefill", type=int, default=512)
        a.add_argument("--decode", type=int, default=128)
        a.add_argument("--reps", type=int, default=3)
        a.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    ap.add_argument("--out", default=None, help="Markdown file (default docs/bench_export.md; --quick: a temp file).")
    ap.add_argument("--work", default=None, help="Keep the run and exports here (reused if present).")
    ap.add_argument("--keep", action="store_true", help="Keep the exported directories.")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--target", type=float, default=0.5)
    ap.add_argument("--sparsities", type=lambda s: [float(x) for x in s.split(",")], default=[0.2, 0.3, 0.4, 0.5])
    ap.add_argument("--round-to", type=lambda s: [int(x) for x in s.split(",") if x], default=[8, 64])
    ap.add_argument("--quick", action="store_true", help="Smoke run: 64/8 tokens, 1 repetition, 2 steps.")
    ap.add_argument("--render", default=None, help="Only rewrite the markdown from this result JSON.")
    args = ap.parse_args()
    if args.render:
        from gisp.provenance import atomic_write_text

        atomic_write_text(args.out or str(ROOT / "docs" / "bench_export.md"),
                          render(json.loads(Path(args.render).read_text())))
        return
    if args.cmd == "measure":
        print(json.dumps(measure(args.path, args.prefill, args.decode, args.reps, args.threads)))
        return
    if args.quick:
        args.prefill, args.decode, args.reps, args.steps, args.samples, args.seq_len = 64, 8, 1, 2, 8, 64
        args.sparsities, args.round_to = [0.25], [64]
    if args.out is None:
        args.out = str(Path(tempfile.gettempdir()) / "bench_export_quick.md") if args.quick else \
            str(ROOT / "docs" / "bench_export.md")
    run_benchmark(args)


if __name__ == "__main__":
    main()
