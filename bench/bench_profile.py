"""Where one prefill forward spends its time, by ATen op, on SmolLM2-135M: why per-token time grows with n.

    python bench/bench_profile.py [--method lm-infinite] [--lengths 8192,32768] [--out DIR]

The fused attention kernel's share against the rest (projections, MLP, norms and the kernel's own merges),
each length in a fresh process; the ops' growth from the first length to the last is what sets LM-Infinite's
prefill time per token at 32k against 8k.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

TOP = 12


def cell(method: str, n: int, queue) -> None:
    from bench_core import warm_prefill
    from torch.profiler import ProfilerActivity, profile

    model, ids = warm_prefill(method, n)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        model(ids, use_cache=False, logits_to_keep=1)
        seconds = time.perf_counter() - t
    ops = {e.key: (e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()}
    queue.put({"method": method, "n": n, "seconds": seconds, "ops": ops})


def table(results: list[dict]) -> str:
    first, last = results[0], results[-1]
    scale = last["n"] / first["n"]
    names = sorted(last["ops"], key=lambda k: -last["ops"][k][0])[:TOP]
    head = " | ".join(f"s at {r['n']}" for r in results)
    lines = [
        f"| op | {head} | growth ({last['n']} / {first['n']}) | growth per token |",
        "|---|" + "---|" * len(results) + "---|---|",
    ]
    for name in [*names, "(all)"]:
        if name == "(all)":
            secs = [sum(s for s, _ in r["ops"].values()) for r in results]
        else:
            secs = [r["ops"].get(name, (0.0, 0))[0] for r in results]
        growth = secs[-1] / secs[0] if secs[0] else float("inf")
        cells = " | ".join(f"{s:.2f}" for s in secs)
        lines.append(f"| {name} | {cells} | {growth:.2f}x | {growth / scale:.2f}x |")
    walls = ", ".join(f"{r['n']}: {r['seconds']:.1f} s" for r in results)
    lines += ["", f"Wall time of the profiled forward: {walls} (the profiler adds a few percent)."]
    return "\n".join(lines)


def main() -> None:
    from bench_core import run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="lm-infinite", choices=["vanilla", "lm-infinite"])
    parser.add_argument("--lengths", default="8192,32768")
    parser.add_argument("--out", default="results/bench")
    args = parser.parse_args()
    results = [run(cell, args.method, int(n)) for n in args.lengths.split(",")]
    md = f"Command: `python {' '.join(sys.argv)}`, torch {torch.__version__}, {torch.get_num_threads()} threads\n\n"
    md += f"{args.method} prefill, self CPU seconds by op (top {TOP} at the last length):\n\n{table(results)}\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"profile_{args.method}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
