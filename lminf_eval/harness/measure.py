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
