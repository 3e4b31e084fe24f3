"""Encoding and decoding speed and peak memory (paper App. G), every method against vanilla in one run.

Encoding: one forward over `length` tokens that fills the method's cache (its logits for the last token
only). Decoding: `--new-tokens` (default 16) greedy steps on top of it, median seconds per token. Memory:
the CUDA allocator's peak on GPU, the process's resident set (sampled) on CPU, above what the model uses.
"""

from __future__ import annotations

import threading
import time

import psutil
import torch

from lminf_eval.runner import Cell

from .base import Task, labels, method_table, ok_rows, truncated


class PeakMemory:
    """Peak memory during a block, in MB above its start: CUDA allocator, or RSS sampled every 5 ms."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.proc, self.stop = psutil.Process(), threading.Event()
            self.base = self.top = self.proc.memory_info().rss
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self.stop.is_set():
            self.top = max(self.top, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        else:
            self.stop.set()
            self.thread.join()
            self.peak = (max(self.top, self.proc.memory_info().rss) - self.base) / 2**20


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timing(Task):
    name = "timing"
    default_n_global = 100
    default_lengths = "1x,2x,4x"

    def cells(self, ctx) -> list[Cell]:
        return [Cell({"method": m.label, "length": n}, m, None, n) for m in ctx.methods for n in ctx.lengths]

    def run_cell(self, ctx, cell) -> dict:
        gen = torch.Generator().manual_seed(ctx.cfg.seed)
        ids = torch.randint(0, ctx.model.config.vocab_size, (1, cell.key["length"]), generator=gen).to(ctx.device)
        ids = truncated(cell.method, ids, ctx.l_pre)
        model, steps = ctx.model, ctx.cfg.new_tokens or 16
        with torch.no_grad():
            model(ids[:, :16], use_cache=False)  # warm-up
            with PeakMemory(ctx.device) as mem:
                sync(ctx.device)
                t = time.perf_counter()
                out = model(ids, use_cache=True, logits_to_keep=1)
                sync(ctx.device)
                encode = time.perf_counter() - t
                cache, token, times = out.cache, out.logits[:, -1:].argmax(-1), []
                for i in range(steps):
                    mask = torch.ones(1, ids.shape[1] + i + 1, dtype=torch.long, device=ctx.device)
                    t = time.perf_counter()
                    out = model(token, attention_mask=mask, cache=cache, use_cache=True)
                    sync(ctx.device)
                    times.append(time.perf_counter() - t)
                    cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        return {
            "encode_s": encode,
            "decode_s_per_token": sorted(times)[len(times) // 2],
            "peak_mem_mb": mem.peak,
            "memory": "cuda-allocator" if ctx.device.type == "cuda" else "rss",
        }

    def summarize(self, ctx, rows):
        values: dict = {"encode_s": {}, "decode_s_per_token": {}, "peak_mem_mb": {}}
        oom = {(r["cell"]["method"], r["cell"]["length"]) for r in rows if r["status"] == "oom"}
        for r in ok_rows(rows):
            for metric in values:
                values[metric][r["cell"]["method"], r["cell"]["length"]] = r[metric]
        tables = {m: method_table(v, labels(ctx), ctx.lengths, oom=oom) for m, v in values.items()}
        base = next((m.label for m in ctx.methods if m.name == "vanilla"), None)
        if base:
            for metric in ("encode_s", "decode_s_per_token", "peak_mem_mb"):
                ratio = {
                    (label, n): values[metric][base, n] / v
                    for (label, n), v in values[metric].items()
                    if (base, n) in values[metric] and v > 0
                }
                tables[f"speedup_{metric}"] = method_table(ratio, labels(ctx), ctx.lengths)
        metrics = {
            label: {str(n): {m: values[m].get((label, n)) for m in values} for n in ctx.lengths}
            for label in labels(ctx)
        }
        return metrics, tables
