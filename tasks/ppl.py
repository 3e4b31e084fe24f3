"""Per-position perplexity (paper Table 1, Fig. 3/5): one forward per document, every position's NLL kept.

"Perplexity at L" is exp of the mean NLL over the bucket of positions just before L, across the documents
long enough to reach it. `--stream-tokens N` is the extreme-length mode: documents concatenated into one
stream, read chunk by chunk through the bounded cache, NLL reported per window of the stream.
"""

from __future__ import annotations

import math

import numpy as np
import psutil
import torch

from lminf_eval.data import load_documents
from lminf_eval.errors import UserError
from lminf_eval.runner import Cell, console

from .base import Task, labels, method_table, ok_rows

LOGIT_CHUNK = 1024  # positions per vocabulary projection: 32k x 49k fp32 logits at once would be 6 GB


def token_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """NLL of tokens 1..n-1 given their prefix, from one forward of the base model; the vocabulary
    projection runs in chunks so memory stays O(n·d)."""
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
        head = model.get_output_embeddings()
        out = []
        for s in range(0, ids.shape[1] - 1, LOGIT_CHUNK):
            e = min(ids.shape[1] - 1, s + LOGIT_CHUNK)
            logp = torch.log_softmax(head(hidden[:, s:e]).float(), dim=-1)
            out.append(-logp.gather(-1, ids[:, s + 1 : e + 1, None])[..., 0])
    return torch.cat(out, dim=1)[0]


def strided_nll(model, ids: torch.Tensor, window: int) -> torch.Tensor:
    """The `truncate` baseline for perplexity: windows of `window` tokens advancing by window/2, each scoring
    only targets not scored before, so every token sees between window/2 and window tokens of context."""
    n = ids.shape[1]
    nll = torch.empty(n - 1)
    done = 0  # targets 1..done are scored
    for start in range(0, n, max(1, window // 2)):
        end = min(start + window, n)
        part = token_nll(model, ids[:, start:end])  # targets start+1 .. end-1
        nll[done : end - 1] = part[done - start :]
        done = end - 1
        if end == n:
            break
    return nll


def stream_nll(model, ids: torch.Tensor, chunk: int, report_every: int, on_chunk=None) -> dict:
    """Read `ids` chunk by chunk through the model's cache (LM-Infinite: bounded); NLL per window of
    `report_every` tokens, and resident memory as it goes."""
    cache, carry = None, None
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
            if on_chunk:
                on_chunk(s + piece.shape[1])
    return {
        "window_tokens": report_every,
        "window_nll": [round(a / max(c, 1), 4) for a, c in zip(sums, counts, strict=True)],
        "mean_nll": total / max(1, ids.shape[1] - 1),
        "rss_mb": [[t, round(m, 1)] for t, m in rss],
        "cache_slots": cache.layers[0].used if hasattr(cache.layers[0], "used") else None,
    }


class Perplexity(Task):
    name = "ppl"
    default_n_global = 100

    def prepare(self, ctx) -> None:
        cfg = ctx.cfg
        if cfg.stream_tokens:
            self._prepare_stream(ctx)
            return
        max_len = max(ctx.lengths)
        if max_len <= ctx.l_pre:
            console.print(
                f"[yellow]warning: every length is within the pretraining length {ctx.l_pre}; "
                "LM-Infinite equals vanilla there (pass lengths like 2x,4x for a length-generalisation run)"
            )
        ctx.extra["docs"] = load_documents(
            cfg.dataset, ctx.tokenizer, cfg.num_docs, cfg.min_tokens or max_len, max_len, cfg.text_field, cfg.split
        )

    def _prepare_stream(self, ctx) -> None:
        for m in ctx.methods:
            s = m.settings(ctx.defaults)
            if not m.patched or math.isinf(s.get("n_local") or ctx.l_pre) or s.get("top_k"):
                raise UserError(
                    f"--stream-tokens needs a bounded method (lm-infinite, window, lambda-only), not {m.label!r}"
                )
        cfg = ctx.cfg
        docs = load_documents(cfg.dataset, ctx.tokenizer, 10**9, 2, 10**9, cfg.text_field, cfg.split)
        stream: list[int] = []
        while len(stream) < cfg.stream_tokens:  # cycle through the corpus if it is shorter than the stream
            for d in docs:
                stream.extend(d.ids)
        ctx.extra["stream"] = torch.tensor([stream[: cfg.stream_tokens]], device=ctx.device)

    def cells(self, ctx) -> list[Cell]:
        if "stream" in ctx.extra:
            n = ctx.extra["stream"].shape[1]
            return [Cell({"method": m.label, "stream": n}, m, None, n) for m in ctx.methods]
        return [
            Cell({"method": m.label, "doc": d.id}, m, d, len(d.ids)) for m in ctx.methods for d in ctx.extra["docs"]
        ]

    def run_cell(self, ctx, cell) -> dict:
        if "stream" in ctx.extra:
            chunk = ctx.cfg.chunk_size or ctx.l_pre
            every = max(chunk, ctx.extra["stream"].shape[1] // 50)
            return stream_nll(ctx.model, ctx.extra["stream"], chunk, every)
        ids = torch.tensor([cell.data.ids], device=ctx.device)
        if cell.method.name == "truncate":
            nll = strided_nll(ctx.model, ids, ctx.l_pre)
        else:
            nll = token_nll(ctx.model, ids)
        if not torch.isfinite(nll).all():
            console.print(f"[yellow]{cell.method.label} {cell.data.id}: non-finite NLL (kept as NaN)")
        return {"tokens": ids.shape[1], "nll": [round(x, 4) if math.isfinite(x) else None for x in nll.tolist()]}

    # --- summaries -------------------------------------------------------------------------------

    def bucket(self, ctx) -> int:
        return ctx.cfg.bucket_size or max(1, ctx.l_pre // 8)

    def curves(self, rows) -> dict[str, np.ndarray]:
        """method -> [docs, positions] NLL matrix, NaN past each document's end (target position p = index+1)."""
        by: dict[str, list] = {}
        for r in ok_rows(rows):
            if "nll" in r:
                by.setdefault(r["cell"]["method"], []).append(np.array(r["nll"], dtype=float))
        out = {}
        for label, arrays in by.items():
            mat = np.full((len(arrays), max(map(len, arrays))), np.nan)
            for i, a in enumerate(arrays):
                mat[i, : len(a)] = a
            out[label] = mat
        return out

    def summarize(self, ctx, rows):
        if "stream" in ctx.extra:
            return self._summarize_stream(ctx, rows)
        b = self.bucket(ctx)
        ppl, nll_tab, oom = {}, {}, set()
        for r in rows:
            if r["status"] == "oom":
                oom.update((r["cell"]["method"], c) for c in [*ctx.lengths, "overall"])
        metrics = {}
        for label, mat in self.curves(rows).items():
            metrics[label] = {}
            for length in ctx.lengths:
                lo, hi = max(0, length - b - 1), length - 1  # targets length-b .. length-1
                reach = mat.shape[1] >= hi
                vals = mat[:, lo:hi] if reach else np.empty((0, 0))
                vals = vals[~np.isnan(vals).any(axis=1)] if vals.size else vals
                if vals.size:
                    mean = float(vals.mean())
                    nll_tab[label, length] = mean
                    ppl[label, length] = math.exp(min(mean, 700))
                    metrics[label][str(length)] = {"ppl": ppl[label, length], "nll": mean, "docs": int(vals.shape[0])}
            overall = float(np.nanmean(mat))
            nll_tab[label, "overall"] = overall
            ppl[label, "overall"] = math.exp(min(overall, 700))
            metrics[label]["overall"] = {"ppl": ppl[label, "overall"], "nll": overall}
        cols = [*ctx.lengths, "overall"]
        tables = {
            "ppl": method_table(ppl, labels(ctx), cols, oom=oom),
            "nll": method_table(nll_tab, labels(ctx), cols, oom=oom),
        }
        metrics["bucket_size"] = b
        return metrics, tables

    def _summarize_stream(self, ctx, rows):
        metrics, nll, rss = {}, {}, {}
        marks = sorted(
            {m for m in (100_000, 1_000_000, ctx.extra["stream"].shape[1]) if m <= ctx.extra["stream"].shape[1]}
        )
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
            "stream_nll": method_table(nll, labels(ctx), cols_n),
            "stream_rss": method_table(rss, labels(ctx), cols_r),
        }

    def plots(self, ctx, rows) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5))
        if "stream" in ctx.extra:
            for r in ok_rows(rows):
                w = r["window_nll"]
                ax.plot([(i + 1) * r["window_tokens"] for i in range(len(w))], w, label=r["cell"]["method"])
            ax.set_xlabel("tokens into the stream")
            ax.set_ylabel("mean NLL per window")
            name = "stream_nll.png"
        else:
            b = self.bucket(ctx)
            for label, mat in self.curves(rows).items():
                mean = np.nanmean(mat, axis=0)
                b = max(b, mat.shape[1] // 200)  # a readable curve at 32x too
                kernel = np.ones(b) / b
                smooth = np.convolve(np.nan_to_num(mean, nan=np.nanmax(mean)), kernel, mode="valid")
                ax.plot(np.arange(len(smooth)) + b, smooth, label=label)
            ax.axvline(ctx.l_pre, color="k", linestyle="--", linewidth=1, label=f"L_pre = {ctx.l_pre}")
            if ctx.cfg.log_x:
                ax.set_xscale("log")
            ax.set_xlabel("token position")
            ax.set_ylabel(f"NLL (moving average over {b})")
            name = "nll_vs_position.png"
        ax.set_title(f"{ctx.cfg.model} on {ctx.cfg.dataset}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(ctx.run.path / name, dpi=120)
        plt.close(fig)
