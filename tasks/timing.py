"""Encoding and decoding speed and peak memory (paper App. G), every method against vanilla in one run.

Encoding: one forward over `length` tokens that fills the method's cache (its logits for the last token
only). Decoding: `--new-tokens` greedy steps on top of it, median seconds per token; with `--compile`, also
compiled decoding (`decode_compiled_s_per_token`): the ring cache for methods with a bounded cache, transformers'
StaticCache for vanilla, the compile itself not counted. Memory: the CUDA allocator's peak on GPU, the process's
resident set (sampled) on CPU, above what the model uses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from lminf_eval.harness.task import DOCUMENT_FLAGS, Cell, Task, option, register_task

from .base import check_compile, method_table, ok_rows, truncated


@dataclass
class TimingOptions:
    new_tokens: int = option(16, "Decoding steps timed.", min=1)
    compile: bool = option(False, "Also time compiled decoding (ring cache; vanilla: transformers' StaticCache).")


@register_task
class Timing(Task):
    name = "timing"
    result_fields = {"encode_s": (int, float), "decode_s_per_token": (int, float)}
    help = "Encoding/decoding speed and peak memory against vanilla (paper App. G)."
    Options = TimingOptions
    default_lengths = "1x,2x,4x"
    settings_defaults = {"n_global": 100}
    ignores = DOCUMENT_FLAGS  # (random token ids)

    def prepare(self) -> None:
        if self.options.compile:
            check_compile(self.ctx)

    def cells(self) -> list[Cell]:
        return [Cell({"method": m.label, "length": n}, m, None, n) for m in self.ctx.methods for n in self.ctx.lengths]

    def run_cell(self, cell) -> dict:
        import torch

        from lminf_eval.harness.measure import PeakMemory, compiled_decode_times, decode_times, median, sync

        ctx = self.ctx
        gen = torch.Generator().manual_seed(ctx.run_config.seed)
        ids = torch.randint(0, ctx.model.config.vocab_size, (1, cell.key["length"]), generator=gen).to(ctx.device)
        ids = truncated(cell.method, ids, ctx.l_pre)
        model = ctx.model
        with torch.no_grad():
            model(ids[:, :16], use_cache=False)  # warm-up
            with PeakMemory(ctx.device) as mem:
                sync(ctx.device)
                t = time.perf_counter()
                out = model(ids, use_cache=True, logits_to_keep=1)
                sync(ctx.device)
                encode = time.perf_counter() - t
                token = out.logits[:, -1:].argmax(-1)
                times = decode_times(model, out.cache, token, ids.shape[1], self.options.new_tokens)
            del out
            compiled = compiled_decode_times(model, ids, self.options.new_tokens) if self.options.compile else None
        return {
            "encode_s": encode,
            "decode_s_per_token": median(times),
            "decode_compiled_s_per_token": median(compiled) if compiled else None,
            "peak_mem_mb": mem.peak,
            "memory": "cuda-allocator" if ctx.device.type == "cuda" else "rss",
        }

    def summarize(self, rows):
        lengths, labels = self.ctx.lengths, self.labels
        values: dict = {"encode_s": {}, "decode_s_per_token": {}, "peak_mem_mb": {}}
        if self.options.compile:
            values["decode_compiled_s_per_token"] = {}
        oom = {(r["cell"]["method"], r["cell"]["length"]) for r in rows if r["status"] == "oom"}
        for r in ok_rows(rows):
            for metric in values:
                if r.get(metric) is not None:
                    values[metric][r["cell"]["method"], r["cell"]["length"]] = r[metric]
        tables = {m: method_table(v, labels, lengths, oom=oom) for m, v in values.items()}
        base = next((m.label for m in self.ctx.methods if m.name == "vanilla"), None)
        if base:
            for metric in values:
                ratio = {
                    (label, n): values[metric][base, n] / v
                    for (label, n), v in values[metric].items()
                    if (base, n) in values[metric] and v > 0
                }
                tables[f"speedup_{metric}"] = method_table(ratio, labels, lengths)
        if self.options.compile:  # each method's eager decode over its compiled decode
            eager, compiled = values["decode_s_per_token"], values["decode_compiled_s_per_token"]
            ratio = {key: eager[key] / v for key, v in compiled.items() if key in eager and v > 0}
            tables["compiled_speedup_decode"] = method_table(ratio, labels, lengths)
        metrics = {label: {str(n): {m: values[m].get((label, n)) for m in values} for n in lengths} for label in labels}
        return metrics, tables
