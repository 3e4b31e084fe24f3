"""Core benchmark: vanilla SDPA vs LM-Infinite on SmolLM2-135M, this machine, ratios from one run.

    python bench/bench_core.py [--lengths 4096,8192,16384,32768] [--cached 8192,16384,32768]
                               [--decode 8192,32768] [--kernel 8192,16384,32768] [--out DIR]

Each cell runs in a fresh process so its peak RSS is its own. Prefill: one forward, no cache, logits for
the last token only (the vocabulary projection of 32k positions would dominate both). Prefill keeping the
cache: the same forward with `use_cache=True`, as `generate()` reads a prompt, and the bytes of keys/values
the cache holds afterwards (vanilla: all n; LM-Infinite: first g + last w + slack). Decode: ms/token of
greedy steps on top of a KV cache holding the context; the cache is filled with random keys/values of the
right shapes (values do not change the cost) so that vanilla's 32k prefill is not paid twice.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import sys
import time
from pathlib import Path

import torch

MODEL = "smollm2-135m"


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load(method: str):
    import lminf_eval
    from lminf_eval.harness.models import load_model

    model, _ = load_model(MODEL)
    model.set_attn_implementation("sdpa")
    if method == "lm-infinite":
        lminf_eval.apply_lm_infinite(model, n_global=10)
    return model


def warm_prefill(method: str, n: int):
    """The model and n random token ids, after a short warm-up forward: a prefill cell's starting state."""
    torch.manual_seed(0)
    model = load(method)
    ids = torch.randint(0, model.config.vocab_size, (1, n))
    with torch.no_grad():
        model(ids[:, :256], use_cache=False, logits_to_keep=1)
    return model, ids


def prefill_cell(method: str, n: int, queue, keep_cache: bool = False) -> None:
    model, ids = warm_prefill(method, n)
    with torch.no_grad():
        base = rss_mb()
        t = time.perf_counter()
        out = model(ids, use_cache=keep_cache, logits_to_keep=1)
        seconds = time.perf_counter() - t
    kind = "prefill_cached" if keep_cache else "prefill"
    result = {"kind": kind, "method": method, "n": n, "seconds": seconds, "peak_rss_mb": rss_mb(), "model_rss_mb": base}
    if keep_cache:
        tensors = [t for layer in out.cache.layers for t in (layer.keys, layer.values)]
        result["cache_mb"] = sum(t.numel() * t.element_size() for t in tensors) / 2**20
    queue.put(result)


def cached_prefill_cell(method: str, n: int, queue) -> None:
    prefill_cell(method, n, queue, keep_cache=True)


def filled_cache(model, method: str, n: int):
    """A cache in the state it would have after reading n tokens."""
    from transformers import DynamicCache

    from lminf_eval import LMInfiniteCache

    config = model.config
    heads, dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    if method == "vanilla":
        cache = DynamicCache(config=config)
        for layer in range(config.num_hidden_layers):
            cache.update(torch.randn(1, heads, n, dim), torch.randn(1, heads, n, dim), layer)
        return cache
    s = model.lm_infinite.settings
    cache = LMInfiniteCache(config.num_hidden_layers, s.n_global, s.n_local)
    for start in range(0, n, 4096):  # the same begin/update/end sequence a chunked prefill performs
        m = min(4096, n - start)
        cache.begin(None, 1, m, "cpu")
        for layer in range(config.num_hidden_layers):
            cache.update(torch.randn(1, heads, m, dim), torch.randn(1, heads, m, dim), layer)
        cache.end()
    return cache


def decode_cell(method: str, n: int, queue, steps: int = 64) -> None:
    from lminf_eval.harness.measure import decode_times, median

    torch.manual_seed(0)
    model = load(method)
    cache = filled_cache(model, method, n)
    times = decode_times(model, cache, torch.tensor([[1]]), n, steps + 4)
    ms = 1000 * median(times[4:])  # after warm-up
    queue.put({"kind": "decode", "method": method, "n": n, "ms_per_token": ms, "peak_rss_mb": rss_mb()})


def kernel_cell(method: str, n: int, queue, repeats: int = 3) -> None:
    """One attention layer of SmolLM2's shape: LM-Infinite kernel vs SDPA causal, attended pairs per second."""
    import torch.nn.functional as F

    from lminf_eval import Settings
    from lminf_eval.attention import Plan, lambda_attention
    from lminf_eval.patch import position_encoding, pretraining_length

    model = load("vanilla")  # its shapes, rotary frequencies and pretraining length
    config = model.config
    settings = Settings.resolve(pretraining_length(config), n_global=10)
    w, g, d = settings.n_local, settings.n_global, config.head_dim
    torch.manual_seed(0)
    q = torch.randn(1, config.num_attention_heads, n, d)
    k, v = torch.randn(1, config.num_key_value_heads, n, d), torch.randn(1, config.num_key_value_heads, n, d)
    if method == "vanilla":
        F.scaled_dot_product_attention(q[:, :, :512], k[:, :, :512], v[:, :, :512], is_causal=True, enable_gqa=True)

        def call():
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        pairs = n * (n + 1) // 2
    else:
        plan, rope = Plan.contiguous(n, g), position_encoding(model)

        def call():  # the layout is built on the first call and reused, as by layers 2.. of a model
            lambda_attention(q, k, v, plan, settings, rope, d**-0.5)

        call()
        pairs = sum(min(i + 1, w) + (g if i >= w else 0) for i in range(n))
    times = []
    for _ in range(repeats):  # the best of a few: one call is seconds long, and this machine is shared
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    seconds = min(times)
    queue.put(
        {
            "kind": "kernel",
            "method": method,
            "n": n,
            "seconds": seconds,
            "gpairs_per_s": config.num_attention_heads * pairs / seconds / 1e9,
        }
    )


def run(cell, *args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=cell, args=(*args, queue))
    proc.start()
    while True:  # a cell that dies (an error, the OOM killer) must not leave us waiting forever
        try:
            result = queue.get(timeout=5)
            break
        except Exception:
            if not proc.is_alive():
                raise RuntimeError(f"{cell.__name__}{args} died with exit code {proc.exitcode}") from None
    proc.join()
    print(json.dumps(result), flush=True)
    return result


def table(results: list[dict]) -> str:
    by = {(r["kind"], r["method"], r["n"]): r for r in results}
    lines = [
        "| measure | n | vanilla (SDPA) | LM-Infinite | ratio |",
        "|---|---|---|---|---|",
    ]

    def row(kind, n, key, label, fmt, higher_is_better=False):
        a, b = by.get((kind, "vanilla", n)), by.get((kind, "lm-infinite", n))
        if not a or not b:
            return
        ratio = b[key] / a[key] if higher_is_better else a[key] / b[key]
        lines.append(f"| {label} | {n} | {fmt.format(a[key])} | {fmt.format(b[key])} | {ratio:.2f}x |")

    ns = sorted({r["n"] for r in results})
    for n in ns:
        row("prefill", n, "seconds", "prefill s", "{:.1f}")
    for n in ns:
        row("prefill", n, "peak_rss_mb", "prefill peak RSS MB", "{:.0f}")
    for n in ns:
        row("prefill_cached", n, "peak_rss_mb", "prefill keeping the cache: peak RSS MB", "{:.0f}")
    for n in ns:
        row("prefill_cached", n, "cache_mb", "KV cache held after that prefill, MB", "{:.0f}")
    for n in ns:
        row("decode", n, "ms_per_token", "decode ms/token", "{:.1f}")
    for n in ns:
        row("kernel", n, "gpairs_per_s", "attention Gpairs/s (1 layer)", "{:.3f}", higher_is_better=True)
    pre = {(r["method"], r["n"]): r["seconds"] / r["n"] for r in results if r["kind"] == "prefill"}
    dec = {(r["method"], r["n"]): r["ms_per_token"] for r in results if r["kind"] == "decode"}
    lines.append("")
    for method in ("vanilla", "lm-infinite"):
        if (method, 8192) in pre and (method, 32768) in pre:
            lines.append(
                f"- {method}: prefill time per token at 32k / at 8k = {pre[method, 32768] / pre[method, 8192]:.2f}x"
            )
        if (method, 8192) in dec and (method, 32768) in dec:
            lines.append(
                f"- {method}: decode time per token at 32k / at 8k = {dec[method, 32768] / dec[method, 8192]:.2f}x"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="4096,8192,16384,32768")
    parser.add_argument("--decode", default="8192,32768")
    parser.add_argument("--kernel", default="8192,16384,32768")
    parser.add_argument("--cached", default="8192,16384,32768", help="lengths of the prefill-keeping-the-cache cells")
    parser.add_argument("--out", default="results/bench")
    args = parser.parse_args()
    results = []
    for n in [int(x) for x in args.kernel.split(",") if x]:
        for method in ("vanilla", "lm-infinite"):
            results.append(run(kernel_cell, method, n))
    for n in [int(x) for x in args.decode.split(",") if x]:
        for method in ("vanilla", "lm-infinite"):
            results.append(run(decode_cell, method, n))
    for n in [int(x) for x in args.lengths.split(",") if x]:
        for method in ("vanilla", "lm-infinite"):
            results.append(run(prefill_cell, method, n))
    for n in [int(x) for x in args.cached.split(",") if x]:
        for method in ("vanilla", "lm-infinite"):
            results.append(run(cached_prefill_cell, method, n))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from lminf_eval.harness.results import git_hash, versions

    meta = {
        "command": " ".join(["python"] + sys.argv),
        "machine": platform.platform(),
        "cpus": torch.get_num_threads(),
        "torch": torch.__version__,
        "versions": versions(),
        "git": git_hash(),
        "model": MODEL,
    }
    (out / "core.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    md = table(results)
    (out / "core.md").write_text(
        f"Command: `{meta['command']}` on {meta['machine']}, {meta['cpus']} threads, torch {meta['torch']}\n\n{md}\n"
    )
    print(md)


if __name__ == "__main__":
    main()
