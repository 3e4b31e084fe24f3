"""Timing and memory measurements shared by `lminf-eval timing` and the benchmarks in bench/."""

from __future__ import annotations

import threading
import time

import psutil
import torch


def sync(device: torch.device | str) -> None:
    """Wait for the device, so a clock read after it measures finished work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


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


def decode_times(model, cache, token: torch.Tensor, context: int, steps: int) -> list[float]:
    """Seconds of each of `steps` greedy decoding steps on top of `cache`, which holds `context` tokens;
    `token` [1, 1] is the first token to feed. The mask grows by one each step, as generate() builds it."""
    device = token.device
    times = []
    with torch.no_grad():
        for i in range(steps):
            mask = torch.ones(1, context + i + 1, dtype=torch.long, device=device)
            sync(device)
            t = time.perf_counter()
            out = model(token, attention_mask=mask, cache=cache, use_cache=True)
            sync(device)
            times.append(time.perf_counter() - t)
            cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    return times


def median(values: list[float]) -> float:
    """The upper median (the middle of a sorted odd list, the upper middle of an even one)."""
    return sorted(values)[len(values) // 2]


def compiled_decode_times(
    model, ids: torch.Tensor, steps: int, warmup: int = 3, backend: str | None = None
) -> list[float] | None:
    """Seconds of each of `steps` compiled greedy decoding steps after reading `ids` [1, n] (the first `warmup`
    steps, which compile, not counted): a method whose cache is bounded through the ring cache
    (`lminf_eval.ring_cache`), the unpatched model through transformers' StaticCache; None for the others
    (unbounded patched methods, and vanilla MPT/Bloom, whose own code does not compile into one graph). Both
    compile `fullgraph=True`, with CUDA graphs (`mode="reduce-overhead"`) on CUDA; `backend`: torch.compile's."""
    from transformers import StaticCache

    from lminf_eval.ring_cache import LMInfiniteRingCache, decode_step, supports

    settings = getattr(getattr(model, "lm_infinite", None), "settings", None)
    device, n = ids.device, ids.shape[1]
    if settings is not None and settings.changes_attention:
        if not supports(settings):
            return None
        cache = LMInfiniteRingCache.for_model(model)
        step = decode_step(model, backend=backend)

        def advance(token, i):
            return step(token, cache)
    elif model.config.model_type in ("mpt", "bloom"):
        return None
    else:
        cache = StaticCache(config=model.config, max_cache_len=n + warmup + steps + 1)
        backend = backend or "inductor"
        mode = "reduce-overhead" if device.type == "cuda" and backend == "inductor" else None
        compiled = torch.compile(_static_step, fullgraph=True, mode=mode, backend=backend)

        def advance(token, i):
            return compiled(model, token, cache, torch.tensor([[n + i]], device=device))

    times = []
    with torch.no_grad():
        token = model(ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
        for i in range(warmup + steps):
            sync(device)
            t = time.perf_counter()
            logits = advance(token, i)
            sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t)
            token = logits.argmax(-1, keepdim=True)
    return times


def _static_step(model, token: torch.Tensor, cache, position: torch.Tensor) -> torch.Tensor:
    return model(input_ids=token, cache=cache, position_ids=position, use_cache=True, logits_to_keep=1).logits[:, -1]
