"""Peak of live tensor bytes in one prefill forward, vanilla SDPA vs LM-Infinite on SmolLM2-135M.

    python bench/bench_tensor_memory.py [--lengths 8192] [--out DIR]

Peak RSS also counts what the C allocator keeps after tensors are freed, and moves by ~150 MB between
identical runs here; the sum of the torch profiler's allocation and free events, in time order, is the
algorithm's own peak and is deterministic. Each cell runs in a fresh process.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def cell(method: str, n: int, queue) -> None:
    from bench_core import warm_prefill
    from torch.profiler import ProfilerActivity, profile

    model, ids = warm_prefill(method, n)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(ids, use_cache=False, logits_to_keep=1)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    queue.put({"method": method, "n": n, "peak_tensor_mb": peak / 2**20, "allocations": len(events)})


def main() -> None:
    from bench_core import run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="8192")
    parser.add_argument("--out", default="results/bench")
    args = parser.parse_args()
    rows = [run(cell, method, int(n)) for n in args.lengths.split(",") for method in ("vanilla", "lm-infinite")]
    lines = [
        f"Command: `python bench/bench_tensor_memory.py --lengths {args.lengths}`",
        "",
        "| n | peak tensor MB: vanilla | LM-Infinite | ratio | alloc/free events: vanilla / LM-Infinite |",
        "|---|---|---|---|---|",
    ]
    for n in sorted({r["n"] for r in rows}):
        a, b = (next(r for r in rows if r["n"] == n and r["method"] == m) for m in ("vanilla", "lm-infinite"))
        lines.append(
            f"| {n} | {a['peak_tensor_mb']:.1f} | {b['peak_tensor_mb']:.1f} | "
            f"{a['peak_tensor_mb'] / b['peak_tensor_mb']:.2f}x | {a['allocations']} / {b['allocations']} |"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tensor_memory.json").write_text(json.dumps(rows, indent=1))
    (out / "tensor_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
