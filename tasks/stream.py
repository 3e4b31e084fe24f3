"""Perplexity on one unbounded stream (the paper's extreme-length run): documents concatenated into a stream
of `--stream-tokens` tokens, read chunk by chunk through the g + w ring cache (fixed buffers, allocated once); NLL
per window of the stream and resident memory as it goes."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psutil

from lminf_eval.errors import UserError
from lminf_eval.harness.task import Cell, Task, option, register_task

from .base import method_table, ok_rows

if TYPE_CHECKING:
    import torch


def stream_nll(model, ids: torch.Tensor, chunk: int, report_every: int, cache=None) -> dict:
    """Read `ids` chunk by chunk through `cache` (None: the patched model's default, LMInfiniteCache); NLL per
    window of `report_every` tokens, and resident memory as it goes."""
    import psutil
    import torch

    carry = None
    proc = psutil.Process()
    sums, counts, rss = [], [], []
    total = 0.0
    with torch.no_grad():
        for s in range(0, ids.shape[1], chunk):
            piece = ids[:, s : s + chunk]
            out = model(piece, cache=cache, use_cache=True)
            cache = out.cache
            logp = torch.log_softmax(out.logits.float(), dim=-1)
            nll = -logp[:, :-1].gather(-1, piece[:, 1:, None])[0, :, 0]
            if carry is not None:
                nll = torch.cat((-carry[0, piece[0, 0]].reshape(1), nll))
            carry = logp[:, -1]
            first = s if s else 1
            for pos, value in zip(range(first, first + nll.numel()), nll.tolist(), strict=True):
                window = pos // report_every
                while len(sums) <= window:
                    sums.append(0.0)
                    counts.append(0)
                sums[window] += value
                counts[window] += 1
                total += value
            rss.append([s + piece.shape[1], proc.memory_info().rss / 2**20])
    return {
        "window_tokens": report_every,
        "window_nll": [round(a / max(c, 1), 4) for a, c in zip(sums, counts, strict=True)],
        "mean_nll": total / max(1, ids.shape[1] - 1),
        "rss_mb": [[t, round(m, 1)] for t, m in rss],
        "cache_slots": getattr(cache, "size", None) or getattr(cache.layers[0], "used", None),
    }


def bounded_methods(l_pre: int) -> list[str]:
    """The methods whose cache stays bounded (drops keys), as presets: the ones a stream can run."""
    from lminf_eval.errors import LMInfiniteError
    from lminf_eval.methods import PRESETS, parse_method

    out = []
    for name in PRESETS:
        try:  # (a preset whose defaults do not fit this L_pre, e.g. STRING on a tiny model, is not offered)
            settings = parse_method(name).settings(l_pre, l_pre)
        except LMInfiniteError:
            continue
        if settings is not None and settings.bounded:
            out.append(name)
    return out


@dataclass
class StreamOptions:
    stream_tokens: int = option(100_000, "Tokens in the stream (documents cycled if the corpus is shorter).", min=2)
    chunk_size: int | None = option(None, "Tokens per forward (default: L_pre).", min=1)


@register_task
class Stream(Task):
    name = "stream"
    result_fields = {"window_nll": list, "mean_nll": (int, float)}
    help = "Perplexity and memory along one long stream read chunk by chunk through the bounded cache."
    Options = StreamOptions
    default_lengths = "1x"  # (the stream's length is --stream-tokens)
    default_methods = ("lm-infinite", "streaming-llm")  # (bounded caches: vanilla's grows with the stream)
    ignores = ("lengths", "num_docs", "min_tokens")
    settings_defaults = {"n_global": 10}  # the paper's streams
    stream: torch.Tensor

    def prepare(self) -> None:
        import torch

        ctx = self.ctx
        for m in ctx.methods:
            settings = ctx.settings[m.label]
            if settings is None or not settings.bounded:
                raise UserError(
                    f"stream needs a bounded method ({', '.join(bounded_methods(ctx.l_pre))}), not {m.label!r}"
                )
        n = self.options.stream_tokens
        need, free = 8 * n, psutil.virtual_memory().available  # (the token ids alone, int64)
        if need > free // 2:
            raise UserError(
                f"--stream-tokens {n} needs {need / 2**30:.1f} GiB for its token ids, more than half of the "
                f"{free / 2**30:.1f} GiB free: lower --stream-tokens"
            )
        docs = self.documents(None, 2, 10**9)
        corpus = torch.tensor([i for d in docs for i in d.ids])
        repeats = -(-n // len(corpus))  # cycle through the corpus if it is shorter
        self.stream = corpus.repeat(repeats)[:n].unsqueeze(0).to(ctx.device)

    def data_digest(self) -> str:
        return hashlib.sha256(self.stream.cpu().numpy().tobytes()).hexdigest()[:16]

    def cells(self) -> list[Cell]:
        n = self.stream.shape[1]
        return [Cell({"method": m.label, "stream": n}, m, None, n) for m in self.ctx.methods]

    def run_cell(self, cell) -> dict:
        from lminf_eval.ring_cache import LMInfiniteRingCache

        chunk = self.options.chunk_size or self.ctx.l_pre
        every = max(chunk, self.stream.shape[1] // 50)
        ring = LMInfiniteRingCache.for_model(self.ctx.model)  # (every bounded method fits a ring)
        return stream_nll(self.ctx.model, self.stream, chunk, every, ring)

    def summarize(self, rows):
        metrics, nll, rss = {}, {}, {}
        n = self.stream.shape[1]
        marks = sorted({m for m in (n // 10, 100_000, 1_000_000, n) if m <= n})
        for r in ok_rows(rows):
            label = r["cell"]["method"]
            metrics[label] = {k: r[k] for k in ("window_tokens", "window_nll", "mean_nll", "rss_mb", "cache_slots")}
            w = r["window_nll"]
            for frac in (0.1, 0.5, 1.0):
                nll[label, f"NLL @{frac:.0%}"] = w[max(0, int(len(w) * frac) - 1)]
            for mark in marks:
                at = [m for t, m in r["rss_mb"] if t <= mark]
                rss[label, f"RSS MB @{mark:,}"] = at[-1] if at else float("nan")
        cols_n = ["NLL @10%", "NLL @50%", "NLL @100%"]
        cols_r = [f"RSS MB @{m:,}" for m in marks]
        return metrics, {
            "stream_nll": method_table(nll, self.labels, cols_n),
            "stream_rss": method_table(rss, self.labels, cols_r),
        }

    def plots(self, rows) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5))
        for r in ok_rows(rows):
            w = r["window_nll"]
            ax.plot([(i + 1) * r["window_tokens"] for i in range(len(w))], w, label=r["cell"]["method"])
        ax.set_xlabel("tokens into the stream")
        ax.set_ylabel("mean NLL per window")
        ax.set_title(f"{self.ctx.run_config.model} on {self.ctx.run_config.dataset}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.ctx.run.path / "stream_nll.png", dpi=120)
        plt.close(fig)
