"""Attention kernel of every method against vanilla SDPA causal: one layer of SmolLM2-135M's shape, this machine.

    python bench/bench_methods.py [--lengths 8192,16384,32768] [--methods lm-infinite,streaming-llm,...]

Each method runs through `lambda_attention` (the blocks kernel on CPU) with the settings its preset resolves
to at L_pre = 8192; the layout is built by a first call and reused, as by a model's layers 2 and on. The
arithmetic limit beside each ratio is vanilla's attended pairs over the method's (Self-Extend, ReRoPE, STRING
and DCA score every causal pair once, near or far, so their limit is 1.0x; LM-Infinite and StreamingLLM attend
g + w keys per query). Writes results/bench/methods.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lminf_eval.attention import Plan, lambda_attention  # noqa: E402
from lminf_eval.attention.positions import Rope  # noqa: E402
from lminf_eval.harness.results import git_hash, versions  # noqa: E402
from lminf_eval.methods import parse_method  # noqa: E402

L_PRE, HEADS, KV_HEADS, HEAD_DIM, ROPE_THETA = 8192, 9, 3, 64, 100000.0  # SmolLM2-135M


def best_seconds(call, repeats: int = 3) -> float:
    call()  # warm-up, and the layout a model's first layer would build
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return min(times)


def attended_pairs(settings, n: int) -> int:
    """Keys each query attends under the method's mask (every causal pair when the window is full)."""
    w, g = settings.n_local, settings.n_global
    if not math.isfinite(w):
        return n * (n + 1) // 2
    return sum(min(i + 1, int(w)) + (min(g, i + 1 - int(w)) if i >= w else 0) for i in range(n))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="8192,16384,32768")
    parser.add_argument("--methods", default="lm-infinite,streaming-llm,self-extend,rerope,leaky-rerope,string,dca")
    parser.add_argument("--out", default="results/bench")
    args = parser.parse_args()
    torch.manual_seed(0)
    inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM))
    rope = Rope(None, inv_freq.float(), False)
    rows = []
    for n in [int(x) for x in args.lengths.split(",")]:
        q = torch.randn(1, HEADS, n, HEAD_DIM)
        k, v = torch.randn(1, KV_HEADS, n, HEAD_DIM), torch.randn(1, KV_HEADS, n, HEAD_DIM)
        base = best_seconds(partial(F.scaled_dot_product_attention, q, k, v, is_causal=True, enable_gqa=True))
        rows.append({"method": "vanilla (SDPA causal)", "n": n, "seconds": base, "speedup": 1.0, "limit": 1.0})
        for name in args.methods.split(","):
            settings = parse_method(name).settings(L_PRE, n)
            plan = Plan.contiguous(n, settings.n_global)
            s = best_seconds(partial(lambda_attention, q, k, v, plan, settings, rope, HEAD_DIM**-0.5))
            limit = (n * (n + 1) // 2) / attended_pairs(settings, n)
            rows.append({"method": name, "n": n, "seconds": s, "speedup": base / s, "limit": limit})
            print(f"n={n} {name}: {s:.3f} s, {base / s:.2f}x vanilla (limit {limit:.2f}x)", flush=True)
    meta = {
        "command": " ".join(["python", *sys.argv]),
        "machine": platform.platform(),
        "threads": torch.get_num_threads(),
        "versions": versions(),
        "git": git_hash(),
    }
    lines = ["| method | n | seconds | speed vs vanilla | arithmetic limit |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['n']} | {r['seconds']:.3f} | {r['speedup']:.2f}x | {r['limit']:.2f}x |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "methods.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    head = f"Command: `{meta['command']}` on {meta['machine']}, {meta['threads']} threads, git {meta['git']}\n\n"
    (out / "methods.md").write_text(head + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
