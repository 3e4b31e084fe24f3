"""GPU benchmark: LM-Infinite's prefill, attention and decoding against vanilla SDPA, one run of <= 8 minutes.

    python bench/bench_cuda.py [--out results/bench] [--budget-s 420]     (make bench-gpu: one H100/H200)
    python bench/bench_cuda.py --dry-run [--out DIR]                       (the whole script at toy sizes, any CPU)

A Llama-2-7B-shaped model (32 layers, d 4096, 32 heads of 128, L_pre 4096; LM-Infinite g = 10, w = L = 4096)
with random bf16 weights: speed does not depend on the weights, and the real checkpoint needs the hub.
1. error: one layer's attention at 8k through every LM-Infinite path (flash-window, flex, blocks) in bf16,
   the max |error| on 4 heads against the float64 dense reference of the definition (tests/reference.py);
2. attention: one layer at 32k, SDPA causal against each path: ms, attended Tpairs/s, ratio;
3. prefill: the whole model at 8k..128k, SDPA against `auto` (the best path; which one ran is recorded): seconds
   (median of 3 after a warm-up that pays compilation), peak GiB allocated above the weights;
4. decode at 32k after a real prefill: ms/token eager (DynamicCache against LMInfiniteCache) and compiled
   (StaticCache against the g + w ring, both `mode="reduce-overhead"`); KV GiB; graph breaks and graphs.
Each ratio has its arithmetic limit beside it: the FLOPs (prefill), attended pairs (attention) or bytes read
(decode) of vanilla over ours. Cells that would pass the time budget are recorded as skipped, never guessed.
--dry-run runs all of it at toy sizes on the CPU, where the CUDA-only kernels have reference implementations
and compiles use the aot_eager backend, so a GPU window never finds a typo.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
GIB = 1 << 30
PATHS = ("flash-window", "flex", "blocks")  # LM-Infinite's backends, each timed alone in sections 1-2


@dataclass(frozen=True)
class Size:
    layers: int
    hidden: int
    heads: int
    intermediate: int
    l_pre: int
    vocab: int
    n_global: int
    error_n: int
    attention_n: int
    prefill: tuple[int, ...]
    decode_n: int
    steps: int
    repeats: int
    compile_backend: str


GPU = Size(32, 4096, 32, 11008, 4096, 32000, 10, 8192, 32768, (8192, 32768, 65536, 131072), 32768, 32, 3, "inductor")
DRY = Size(2, 256, 4, 512, 64, 256, 4, 256, 512, (128, 256), 256, 4, 1, "aot_eager")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(size: Size, device: torch.device) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=size.l_pre,
        vocab_size=size.vocab,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


def timed(fn, device: torch.device, repeats: int) -> tuple[float, float | None]:
    """Median seconds of `repeats` calls after one warm-up, and the peak GiB allocated above the start (CUDA)."""
    with torch.no_grad():
        fn()
        sync(device)
        cuda = device.type == "cuda"
        if cuda:
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t)
    peak = (torch.cuda.max_memory_allocated() - base) / GIB if cuda else None
    return statistics.median(times), peak


def sdpa_kernel(model, device: torch.device) -> str:
    """Which SDPA kernel vanilla's forward ran, read from the profiler (flash, efficient, cudnn or math)."""
    ids = torch.randint(0, model.config.vocab_size, (1, 256), device=device)
    with torch.no_grad(), torch.profiler.profile() as prof:
        model(ids, use_cache=False, logits_to_keep=1)
    names = sorted({e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product")})
    return ", ".join(names) or "none found"


class Bench:
    """The run's rows and its time budget."""

    def __init__(self, size: Size, device: torch.device, budget_s: float):
        self.size, self.device, self.budget_s = size, device, budget_s
        self.start = time.perf_counter()
        self.rows: list[dict] = []

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def record(self, row: dict) -> None:
        self.rows.append(row)
        print(json.dumps(row), flush=True)

    def skip(self, section: str, method: str, n: int) -> None:
        self.record({"section": section, "method": method, "n": n, "skipped": "time budget"})


def qkv(n: int, heads: int, dim: int, device, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    return tuple(torch.randn(1, heads, n, dim, device=device, generator=gen, dtype=torch.bfloat16) for _ in range(3))


def attention_rows(bench: Bench, rotary) -> None:
    """Sections 1 and 2: one layer's attention, every path."""
    from lminf_eval import Settings
    from lminf_eval.attention import Plan, dispatch, lambda_attention

    sys.path.insert(0, str(ROOT / "tests"))
    from reference import reference_attention

    size, device = bench.size, bench.device
    dim, scaling = size.hidden // size.heads, (size.hidden // size.heads) ** -0.5
    g, w = size.n_global, size.l_pre

    def settings(path: str) -> Settings:
        return Settings.resolve(size.l_pre, n_global=g, backend=path)

    n = size.error_n
    q, k, v = qkv(n, size.heads, dim, device)
    plan = Plan.contiguous(n, g, device)
    sub = slice(0, min(4, size.heads))
    ref = reference_attention(q[:, sub], k[:, sub], v[:, sub], plan, settings("blocks"), rotary, scaling)
    for path in PATHS:
        dispatch.paths_run(reset=True)
        with torch.no_grad():
            out = lambda_attention(q, k, v, Plan.contiguous(n, g, device), settings(path), rotary, scaling)
        err = (out[:, sub].double() - ref).abs().max().item()
        bench.record({"section": "error", "method": path, "n": n, "max_abs_error": err, "ran": dispatch.paths_run()})
    del ref

    n = size.attention_n
    q, k, v = qkv(n, size.heads, dim, device, seed=1)
    pairs_vanilla, pairs_ours = n * (n + 1) // 2, lm_infinite_pairs(n, g, w)
    seconds, _ = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), device, size.repeats)
    bench.record({"section": "attention", "method": "vanilla", "n": n, "seconds": seconds, "pairs": pairs_vanilla})
    for path in PATHS:
        if bench.left() < 30 * seconds:
            bench.skip("attention", path, n)
            continue
        dispatch.paths_run(reset=True)

        def call(path=path):  # a new plan each call, as per forward
            lambda_attention(q, k, v, Plan.contiguous(n, g, device), settings(path), rotary, scaling)

        seconds_ours, _ = timed(call, device, size.repeats)
        row = {"section": "attention", "method": path, "n": n, "seconds": seconds_ours, "pairs": pairs_ours}
        bench.record({**row, "ran": dispatch.paths_run()})


def prefill_rows(bench: Bench, model, method: str) -> None:
    """Section 3: the whole model, one forward, logits of the last token only."""
    from lminf_eval.attention import dispatch

    size, device = bench.size, bench.device
    for n in size.prefill:
        last = next((r for r in reversed(bench.rows) if r.get("section") == "prefill" and "seconds" in r), None)
        guess = last["seconds"] * (n / last["n"]) ** 2 * (size.repeats + 1) if last else 0.0
        if guess > bench.left():
            bench.skip("prefill", method, n)
            continue
        ids = torch.randint(0, size.vocab, (1, n), device=device)
        dispatch.paths_run(reset=True)
        seconds, peak = timed(lambda ids=ids: model(ids, use_cache=False, logits_to_keep=1), device, size.repeats)
        row = {"section": "prefill", "method": method, "n": n, "seconds": seconds, "peak_gib": peak}
        bench.record({**row, "ran": dispatch.paths_run()})


def decode_rows(bench: Bench, model, method: str) -> None:
    """Section 4: greedy steps after a real prefill of decode_n tokens, eager and compiled."""
    from torch._dynamo.utils import counters

    from lminf_eval.harness.measure import compiled_decode_times, decode_times

    size, device, n = bench.size, bench.device, bench.size.decode_n
    if bench.left() < 60:
        bench.skip("decode", f"{method} eager", n)
        bench.skip("decode", f"{method} compiled", n)
        return
    ids = torch.randint(0, size.vocab, (1, n), device=device)
    with torch.no_grad():
        out = model(ids, use_cache=True, logits_to_keep=1)
    times = decode_times(model, out.cache, out.logits[:, -1:].argmax(-1), n, size.steps + 4)
    row = {"section": "decode", "method": f"{method} eager", "n": n, "seconds": statistics.median(times[4:])}
    bench.record({**row, "cache": type(out.cache).__name__, "kv_gib": kv_gib(out.cache)})
    del out
    torch._dynamo.reset()
    counters.clear()
    times = compiled_decode_times(model, ids, size.steps, backend=size.compile_backend)
    row = {"section": "decode", "method": f"{method} compiled", "n": n, "seconds": statistics.median(times)}
    row["graph_breaks"] = sum(counters["graph_break"].values())
    row["graphs"] = counters["stats"]["unique_graphs"]
    row["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"]
    slots = n if method == "vanilla" else size.n_global + size.l_pre
    row["kv_gib"] = slots * 2 * size.layers * size.hidden * 2 / GIB  # bf16 keys and values of the slots a step reads
    bench.record(row)


def kv_gib(cache) -> float:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)) / GIB


def lm_infinite_pairs(n: int, g: int, w: int) -> int:
    """Pairs LM-Infinite attends over n tokens: the window's, and the global keys past it."""
    return sum(min(i + 1, w) + (min(g, i + 1 - w) if i >= w else 0) for i in range(n))


def limits(size: Size, n: int) -> dict:
    """Vanilla over LM-Infinite: FLOPs of a prefill (linear layers the same for both, attention per pair), and
    bytes a decode step reads (weights, then the KV slots it attends to)."""
    g, w, d, layers = size.n_global, size.l_pre, size.hidden, size.layers
    per_token = 2 * layers * (4 * d * d + 3 * d * size.intermediate)  # q, k, v, o and the MLP, 2 FLOPs a MAC
    per_pair = 4 * layers * d  # q·k and p·v
    pairs_ours = lm_infinite_pairs(n, g, w)
    flops = (n * per_token + n * (n + 1) // 2 * per_pair) / (n * per_token + pairs_ours * per_pair)
    weights = 2 * (layers * (4 * d * d + 3 * d * size.intermediate) + 2 * size.vocab * d)
    slot = 2 * layers * d * 2
    return {"flops": flops, "bytes": (weights + n * slot) / (weights + min(n, g + w) * slot)}


def table(rows: list[dict], size: Size) -> str:
    """Markdown; row names as in earlier tables ("prefill s", "decode ms/token", "attention") so they compare."""
    by = {(r["section"], r["method"], r["n"]): r for r in rows}
    lines = [
        "| measure | n | LM-Infinite path | vanilla (SDPA) | LM-Infinite | ratio | arithmetic limit | path that ran |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def ran(r):
        return ", ".join(f"{k} x{v}" for k, v in r.get("ran", {}).items()) or "-"

    for r in rows:
        if r["section"] == "error":
            lines.append(f"| bf16 max abs error vs float64 | {r['n']} | {r['method']} | | {r['max_abs_error']:.2e} "
                         f"| | | {ran(r)} |")  # fmt: skip
    for r in rows:
        if r["section"] != "attention" or r["method"] == "vanilla":
            continue
        base = by.get(("attention", "vanilla", r["n"]))
        if "skipped" in r or not base:
            lines.append(f"| attention ms (1 layer) | {r['n']} | {r['method']} | | skipped (time budget) | | | |")
            continue
        rate = lambda x: x["pairs"] * size.heads / x["seconds"] / 1e12  # noqa: E731
        lines.append(f"| attention ms (1 layer) | {r['n']} | {r['method']} | {1e3 * base['seconds']:.2f} "
                     f"| {1e3 * r['seconds']:.2f} | {base['seconds'] / r['seconds']:.2f}x "
                     f"| {base['pairs'] / r['pairs']:.2f}x | {ran(r)} |")  # fmt: skip
        lines.append(f"| attention Tpairs/s (1 layer) | {r['n']} | {r['method']} | {rate(base):.3g} "
                     f"| {rate(r):.3g} | {rate(r) / rate(base):.2f}x | 1.00x | |")  # fmt: skip
    for n in size.prefill:
        a, b = by.get(("prefill", "vanilla", n)), by.get(("prefill", "lm-infinite", n))
        if not a or not b or "skipped" in a or "skipped" in b:
            lines.append(f"| prefill s | {n} | auto | skipped (time budget) | | | | |")
            continue
        lim = limits(size, n)["flops"]
        lines.append(f"| prefill s | {n} | auto | {a['seconds']:.3f} | {b['seconds']:.3f} "
                     f"| {a['seconds'] / b['seconds']:.2f}x | {lim:.2f}x | {ran(b)} |")  # fmt: skip
        if a["peak_gib"] is not None:
            lines.append(f"| prefill peak GiB above weights | {n} | auto | {a['peak_gib']:.2f} | {b['peak_gib']:.2f} "
                         f"| {a['peak_gib'] / max(b['peak_gib'], 1e-9):.2f}x | | |")  # fmt: skip
    n = size.decode_n
    for kind, ours in (("eager", "LMInfiniteCache"), ("compiled", "ring")):
        a, b = by.get(("decode", f"vanilla {kind}", n)), by.get(("decode", f"lm-infinite {kind}", n))
        if not a or not b or "skipped" in a or "skipped" in b:
            lines.append(f"| decode ms/token | {n} | {kind} | skipped (time budget) | | | | |")
            continue
        if kind == "compiled":
            extra = f"graph breaks {a['graph_breaks']}/{b['graph_breaks']}, graphs {a['graphs']}/{b['graphs']}"
        else:
            extra = f"{a['cache']} / {b['cache']}"
        kv_limit = n / min(n, size.n_global + size.l_pre)
        lines.append(f"| decode ms/token | {n} | {kind} ({ours}) | {1e3 * a['seconds']:.1f} | {1e3 * b['seconds']:.1f} "
                     f"| {a['seconds'] / b['seconds']:.2f}x | {limits(size, n)['bytes']:.2f}x | {extra} |")  # fmt: skip
        lines.append(f"| KV GiB | {n} | {kind} ({ours}) | {a['kv_gib']:.3f} | {b['kv_gib']:.3f} "
                     f"| {a['kv_gib'] / b['kv_gib']:.2f}x | {kv_limit:.2f}x | |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU: checks the script, no numbers")
    parser.add_argument("--out", default=None, help="folder for cuda.{md,json} (default results/bench; dry run: none)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting cells past this many seconds")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("bench_cuda.py needs a CUDA device: run it on a GPU, or `--dry-run` to check it on the CPU")
    import lminf_eval
    from lminf_eval.harness.results import git_hash, versions
    from lminf_eval.patch import position_encoding

    size = DRY if args.dry_run else GPU
    device = torch.device("cpu" if args.dry_run else "cuda")
    bench = Bench(size, device, args.budget_s)
    model = build(size, device)
    meta = {
        "command": " ".join(["python"] + sys.argv),
        "device": "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name(),
        "machine": platform.platform(),
        "torch": torch.__version__,
        "versions": versions(),
        "git": git_hash(),
        "model": f"Llama-2-7B shape at {asdict(size)}, random bf16 weights",
        "sdpa_kernel": sdpa_kernel(model, device),
    }
    print(json.dumps(meta), flush=True)
    attention_rows(bench, position_encoding(model))
    for method in ("vanilla", "lm-infinite"):
        if method == "lm-infinite":
            lminf_eval.apply_lm_infinite(model, n_global=size.n_global)
        prefill_rows(bench, model, method)
        decode_rows(bench, model, method)
    meta["seconds"] = time.perf_counter() - bench.start
    md = table(bench.rows, size)
    header = (
        f"Command: `{meta['command']}` on {meta['device']}, torch {meta['torch']}, git {meta['git']}, "
        f"{meta['seconds']:.0f} s. Vanilla's SDPA kernel: {meta['sdpa_kernel']}.\n\n"
    )
    print(md)
    out = Path(args.out) if args.out else (None if args.dry_run else ROOT / "results" / "bench")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "cuda.json").write_text(json.dumps({"meta": meta, "results": bench.rows}, indent=1))
        (out / "cuda.md").write_text(header + md + "\n")


if __name__ == "__main__":
    main()
