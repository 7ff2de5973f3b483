"""Whether ``--autocast bf16`` pays on this machine: forward+backward time, bf16 autocast against fp32.

On SmolLM2-135M (fp32 weights), times one GISP-style gradient pass (the mean next-token loss
over ``--batch`` windows of ``--seq-len`` tokens, forward + backward) with and without bf16
autocast, ``--repeats`` times each after one warm-up, with torch's default threads. Also
records what :func:`gisp.run.gradients.native_bf16` says about the machine: where it says no,
torch emulates bf16 and gisp warns (and ``gisp demo`` stays in fp32).

    python scripts/bench_precision.py        # -> docs/bench_scale.md (section "precision")
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import command, machine, machine_block, md_table, median, publish  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default="docs/bench_precision.json")
    p.add_argument("--no-doc", action="store_true", help="write only the JSON")
    return p.parse_args()


def one_pass(model: torch.nn.Module, ids: torch.Tensor, bf16: bool) -> tuple[float, float]:
    """(forward seconds, backward seconds) of the mean next-token loss."""
    from gisp.core.objectives import token_nll

    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = token_nll(model(input_ids=ids, use_cache=False).logits, ids).mean()
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    model.zero_grad(set_to_none=True)
    return t1 - t0, t2 - t1


def main() -> None:
    args = parse()
    from gisp.loading import load_model
    from gisp.run.gradients import native_bf16

    start = time.perf_counter()
    model = load_model(args.model, dtype="fp32", device="cpu").model
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len), generator=gen)
    raw: dict[str, object] = {"model": args.model, "batch": args.batch, "seq_len": args.seq_len,
                              "threads": torch.get_num_threads(), "native_bf16": native_bf16("cpu"),
                              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "modes": {}}
    for mode, bf16 in (("fp32", False), ("bf16 autocast", True)):
        one_pass(model, ids, bf16)  # warm-up
        runs = [one_pass(model, ids, bf16) for _ in range(args.repeats)]
        raw["modes"][mode] = {"forward_s": [f for f, _ in runs], "backward_s": [b for _, b in runs]}
        print(mode, runs, flush=True)
    tokens = args.batch * args.seq_len
    rows, total = [], {}
    for mode, r in raw["modes"].items():
        f, b = median(r["forward_s"]), median(r["backward_s"])
        total[mode] = f + b
        rows.append([mode, f"{f:.2f}", f"{b:.2f}", f"{f + b:.2f}", f"{1000 * (f + b) / tokens:.1f}"])
    ratio = total["bf16 autocast"] / total["fp32"]
    raw["bf16_over_fp32"] = ratio
    info = machine()
    body = "\n".join([
        "## precision: does bf16 autocast pay on this CPU?", "",
        f"One forward+backward of the mean next-token loss of `{args.model}` over {args.batch} x {args.seq_len} "
        f"tokens, fp32 weights, {raw['threads']} torch threads, median of {args.repeats} after a warm-up. "
        f"torch's CPU capability: {raw['cpu_capability']}; `native_bf16('cpu')`: {raw['native_bf16']}.", "",
        md_table(["mode", "forward s", "backward s", "total s", "ms per token"], rows), "",
        f"bf16 autocast takes {ratio:.1f}x the time of fp32 here. Where `native_bf16` is False, `gisp prune` "
        "warns on `--autocast bf16` and `gisp demo` runs in fp32.", "",
        machine_block(info, command(), time.perf_counter() - start)])
    raw["machine"] = info
    publish("precision", body, raw, args)


if __name__ == "__main__":
    main()
