"""GPU benchmark (App. G's setting): vanilla SDPA vs LM-Infinite's compiled FlexAttention path, one run.

    python bench/bench_cuda.py [--lengths 8192,16384,32768] [--decode 32768] [--out DIR]

A Llama-2-7B-shaped model (32 layers, d 4096, L_pre 4096) with random bf16 weights: speed does not
depend on the weights, and the real checkpoint needs the hub. Prefill: one forward, no cache, logits for
the last token, the median of three after a warm-up at the same length (the warm-up pays compilation).
Decode: ms/token of greedy steps after a real prefill of the context into each method's own cache.
Kernel: one layer's attention alone, flex vs SDPA causal, in attended pairs per second.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import lminf_eval
from lminf_eval.harness.measure import decode_times
from lminf_eval.harness.results import git_hash, versions
from lminf_eval.patch import position_encoding

GIB = 1 << 30
PROFILE = False  # --profile: print where the LM-Infinite kernel call spends its GPU time


def build(layers: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        vocab_size=32000,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    return model


def timed(fn, repeats: int = 3) -> tuple[float, float]:
    """Median seconds of `repeats` calls after one warm-up, and the peak GiB allocated above the start."""
    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / GIB


def prefill(model, n: int) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (1, n), device="cuda")
    with torch.no_grad():
        seconds, peak = timed(lambda: model(ids, use_cache=False, logits_to_keep=1))
    return {"kind": "prefill", "n": n, "seconds": seconds, "peak_gib": peak}


def decode(model, n: int, steps: int = 32) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (1, n), device="cuda")
    with torch.no_grad():
        out = model(ids, use_cache=True, logits_to_keep=1)
    times = decode_times(model, out.cache, out.logits[:, -1:].argmax(-1), n, steps + 4)
    del out
    return {"kind": "decode", "n": n, "ms_per_token": 1000 * statistics.median(times[4:])}


def kernel(method: str, n: int, rotary) -> dict:
    """One layer's attention (Llama-2-7B: 32 heads of 128) on random q/k/v; `rotary` from the built model."""
    from lminf_eval import Settings
    from lminf_eval.attention import Plan, lambda_attention

    q, k, v = (torch.randn(1, 32, n, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    if method == "vanilla":
        seconds, _ = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        pairs = n * (n + 1) // 2
    else:
        settings = Settings.resolve(4096, n_global=10, backend=BACKENDS[method])
        w, g = settings.n_local, settings.n_global

        def call():  # a new plan each call: the block masks are rebuilt, as per forward
            lambda_attention(q, k, v, Plan.contiguous(n, g, "cuda"), settings, rotary, 128**-0.5)

        seconds, _ = timed(call)
        if PROFILE and method == "lm-infinite":
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                call()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12), flush=True)
        pairs = sum(min(i + 1, w) + (g if i >= w else 0) for i in range(n))
    return {"kind": "kernel", "method": method, "n": n, "seconds": seconds, "tpairs_per_s": 32 * pairs / seconds / 1e12}


METHODS = ("vanilla", "lm-infinite", "lm-infinite-blocks")
# lm-infinite: the FlexAttention backend; lm-infinite-blocks: the blocked kernel with FlashAttention-2 calls
BACKENDS = {"lm-infinite": "flex", "lm-infinite-blocks": "blocks"}


def table(results: list[dict]) -> str:
    by = {(r["kind"], r["method"], r["n"]): r for r in results}
    lines = [
        "| measure | n | vanilla (SDPA) | LM-Infinite (flex) | ratio | LM-Infinite (FA2 blocks) | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    spec = [
        ("prefill", "seconds", "prefill s", "{:.3f}", False),
        ("prefill", "peak_gib", "prefill peak GiB above weights", "{:.2f}", False),
        ("decode", "ms_per_token", "decode ms/token", "{:.1f}", False),
        ("kernel", "tpairs_per_s", "attention Tpairs/s (1 layer)", "{:.2f}", True),
    ]
    for kind, key, label, fmt, higher in spec:
        for n in sorted({r["n"] for r in results if r["kind"] == kind}):
            a = by.get((kind, "vanilla", n))
            if not a:
                continue
            cells = [f"| {label} | {n} | {fmt.format(a[key])} "]
            for method in METHODS[1:]:
                b = by.get((kind, method, n))
                ratio = (b[key] / a[key] if higher else a[key] / b[key]) if b else None
                cells.append(f"| {fmt.format(b[key])} | {ratio:.2f}x " if b else "| - | - ")
            lines.append("".join(cells) + "|")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="8192,16384,32768")
    parser.add_argument("--decode", default="32768")
    parser.add_argument("--kernel", default="32768")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--out", default="results/bench")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    global PROFILE
    PROFILE = args.profile
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    results = []

    def record(method: str, row: dict) -> None:
        results.append({"method": method, **row})
        print(json.dumps(results[-1]), flush=True)

    model = build(args.layers)
    rotary = position_encoding(model)
    for n in ints(args.kernel):
        for method in METHODS:
            record(method, kernel(method, n, rotary))
    for method in METHODS:
        if method in BACKENDS:
            lminf_eval.apply_lm_infinite(model, n_global=10, backend=BACKENDS[method])
        for n in ints(args.lengths):
            record(method, prefill(model, n))
        for n in ints(args.decode):
            record(method, decode(model, n))
    meta = {
        "command": " ".join(["python"] + sys.argv),
        "device": torch.cuda.get_device_name(),
        "machine": platform.platform(),
        "torch": torch.__version__,
        "versions": versions(),
        "git": git_hash(),
        "model": f"Llama-2-7B shape, {args.layers} layers, random bf16 weights",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cuda.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    md = table(results)
    (out / "cuda.md").write_text(f"Command: `{meta['command']}` on {meta['device']}, torch {meta['torch']}\n\n{md}\n")
    print(md)


if __name__ == "__main__":
    main()
