"""Per-position perplexity (paper Table 1, Fig. 3/5): one forward per document, every position's NLL kept.

"Perplexity at L" is exp of the mean NLL over the bucket of positions just before L, across the documents
long enough to reach it, each read by a forward of length L. One forward of the whole document serves every
L for a method whose rotation does not depend on the forward's length (a causal model scores a prefix the
same in any longer forward); dynamic NTK's does, so it reads the document once per milestone (`per_length_nll`).
(One unbounded stream read chunk by chunk is the `stream` task.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from lminf_eval.harness.data import Document
from lminf_eval.harness.intervals import Estimate, bootstrap_mean
from lminf_eval.harness.task import Cell, Task, console, option, register_task

from .base import length_dependent, method_table, ok_rows

if TYPE_CHECKING:
    import torch

LOGIT_CHUNK = 1024  # positions per vocabulary projection: 32k x 49k fp32 logits at once would be 6 GB


def token_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """NLL of tokens 1..n-1 given their prefix, from one forward of the base model (ids [1, n])."""
    return batch_nll(model, ids)[0]


def batch_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """[b, n-1]: each row's NLL of tokens 1..n-1 given their prefix, rows of one length read in one forward;
    the vocabulary projection runs in chunks so memory stays O(n·d)."""
    import torch

    with torch.no_grad():
        hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
        head = model.get_output_embeddings()
        out = []
        for s in range(0, ids.shape[1] - 1, LOGIT_CHUNK):
            e = min(ids.shape[1] - 1, s + LOGIT_CHUNK)
            logp = torch.log_softmax(head(hidden[:, s:e]).float(), dim=-1)
            out.append(-logp.gather(-1, ids[:, s + 1 : e + 1, None])[..., 0])
    return torch.cat(out, dim=1)


def strided_nll(model, ids: torch.Tensor, window: int) -> torch.Tensor:
    """The `truncate` baseline for perplexity: windows of `window` tokens advancing by window/2, each scoring
    only targets not scored before, so every token sees between window/2 and window tokens of context."""
    import torch

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


def bucket_span(length: int, bucket: int) -> tuple[int, int]:
    """The NLL indices of "perplexity at `length`": targets length-bucket .. length-1 (target p at index p-1)."""
    return max(0, length - bucket - 1), length - 1


def forward_lengths(lengths: list[int], n: int, l_pre: int) -> list[int]:
    """The forwards a length-dependent RoPE reads a document of `n` tokens with: one per milestone it reaches
    and one of the whole document, those at or below L_pre merged into the longest of them (the base there is
    L_pre's, transformers' threshold being `length > L_pre`, and a prefix scores the same in a longer forward)."""
    wanted = sorted({m for m in lengths if m <= n} | {n})
    inside = [m for m in wanted if m <= l_pre]
    return inside[-1:] + [m for m in wanted if m > l_pre]


def per_length_nll(
    model, ids: torch.Tensor, lengths: list[int], l_pre: int, bucket: int
) -> tuple[torch.Tensor, dict[int, torch.Tensor], list[int]]:
    """(NLL of the whole document, {milestone: its bucket's NLL}, the forwards' lengths) for a method whose
    rotation follows the forward's length: each milestone's bucket from a forward of the document cut to that
    milestone, the whole document's NLL (the curve, "overall") from a forward of all of it."""
    from lminf_eval.rope_scaling import reset_dynamic_rope

    n = ids.shape[1]
    forwards = forward_lengths(lengths, n, l_pre)
    buckets, whole = {}, None
    for f in forwards:
        reset_dynamic_rope(model)  # the base of this forward's length, not of the longest one before it
        part = token_nll(model, ids[:, :f])
        for m in lengths:
            if m <= n and min(x for x in forwards if x >= m) == f:
                lo, hi = bucket_span(m, bucket)
                buckets[m] = part[lo:hi]
        if f == n:
            whole = part
    reset_dynamic_rope(model)
    return whole, buckets, forwards


def _rounded(nll: torch.Tensor) -> list[float | None]:
    return [round(x, 4) if math.isfinite(x) else None for x in nll.tolist()]


def _metric(nll: Estimate, ppl: Estimate) -> dict:
    """One cell of results.json's metrics: the numbers and their 95% intervals (null with one document)."""
    return {"ppl": float(ppl), "nll": float(nll), "ppl_ci95": [ppl.lo, ppl.hi], "nll_ci95": [nll.lo, nll.hi]}


@dataclass
class PerplexityOptions:
    bucket_size: int | None = option(None, "Positions averaged for each milestone (default: L_pre/8).", min=1)
    log_x: bool = option(False, "Log-scale position axis in the NLL plot.")
    batch_size: int = option(1, "Documents per forward (methods read per milestone, and truncate, run alone).", min=1)


@register_task
class Perplexity(Task):
    name = "ppl"
    result_fields = {"nll": list}
    help = "Per-position perplexity at milestone lengths (paper Table 1, Fig. 3/5)."
    Options = PerplexityOptions
    settings_defaults = {"n_global": 100}  # the paper's perplexity runs
    docs: list[Document]

    def prepare(self) -> None:
        ctx, run_config = self.ctx, self.ctx.run_config
        max_len = max(ctx.lengths)
        if max_len <= ctx.l_pre:
            console.print(
                f"[yellow]warning: every length is within the pretraining length {ctx.l_pre}; "
                "LM-Infinite equals vanilla there (pass lengths like 2x,4x for a length-generalisation run)"
            )
        self.docs = self.documents(run_config.num_docs, run_config.min_tokens or max_len, max_len)

    def per_length(self) -> list[str]:
        """The methods read once per milestone (`length_dependent`)."""
        return [m.label for m in self.ctx.methods if length_dependent(self.ctx.settings[m.label])]

    def fingerprint(self) -> dict:
        # (absent when no method is read per length: such a run computes what it did before this existed)
        return {"per_length": self.per_length()} if self.per_length() else {}

    def cells(self) -> list[Cell]:
        ctx, per_length = self.ctx, set(self.per_length())

        def tokens(m, d) -> int:
            n = len(d.ids)
            return sum(forward_lengths(ctx.lengths, n, ctx.l_pre)) if m.label in per_length else n

        return [Cell({"method": m.label, "doc": d.id}, m, d, tokens(m, d)) for m in ctx.methods for d in self.docs]

    def batch_key(self, cell) -> int | None:
        """Documents of one length batch, for methods that read each in one plain forward."""
        if cell.method.truncate or length_dependent(self.ctx.settings[cell.method.label]):
            return None
        return len(cell.data.ids)

    def run_batch(self, cells) -> list[dict]:
        import torch

        if len(cells) == 1:
            return [self.run_cell(cells[0])]
        ids = torch.tensor([cell.data.ids for cell in cells], device=self.ctx.device)
        nll = batch_nll(self.ctx.model, ids)
        return [self._result(cell, ids.shape[1], row) for cell, row in zip(cells, nll, strict=True)]

    def _result(self, cell, tokens: int, nll, extra: dict | None = None) -> dict:
        import torch

        extra = extra or {}
        if not torch.isfinite(nll).all() or any(None in v for v in extra.get("per_length", {}).values()):
            console.print(f"[yellow]{cell.method.label} {cell.data.id}: non-finite NLL (kept as NaN)")
        return {"tokens": tokens, "nll": _rounded(nll), **extra}

    def run_cell(self, cell) -> dict:
        import torch

        ctx = self.ctx
        ids = torch.tensor([cell.data.ids], device=ctx.device)
        extra = {}
        if cell.method.truncate:
            nll = strided_nll(ctx.model, ids, ctx.l_pre)
        elif length_dependent(ctx.settings[cell.method.label]):
            nll, buckets, forwards = per_length_nll(ctx.model, ids, ctx.lengths, ctx.l_pre, self.bucket())
            extra = {"forwards": forwards, "per_length": {str(m): _rounded(v) for m, v in buckets.items()}}
        else:
            nll = token_nll(ctx.model, ids)
        return self._result(cell, ids.shape[1], nll, extra)

    # --- summaries -------------------------------------------------------------------------------

    def bucket(self) -> int:
        return self.options.bucket_size or max(1, self.ctx.l_pre // 8)

    @staticmethod
    def _lengths(rows, label: str) -> np.ndarray:
        """Targets scored per document of `label`, in `curves`' row order."""
        return np.array([len(r["nll"]) for r in ok_rows(rows) if "nll" in r and r["cell"]["method"] == label])

    @staticmethod
    def _own_buckets(rows, label: str) -> list[dict | None]:
        """Per document of `label`, in `curves`' row order: its buckets from forwards of each milestone's length
        (a method read per length), or None (every bucket from the one forward of the document)."""
        return [r.get("per_length") for r in ok_rows(rows) if "nll" in r and r["cell"]["method"] == label]

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

    def summarize(self, rows):
        lengths = self.ctx.lengths
        b = self.bucket()
        ppl, nll_tab, oom = {}, {}, set()
        for r in rows:
            if r["status"] == "oom":
                oom.update((r["cell"]["method"], c) for c in [*lengths, "overall"])
        metrics = {}
        for label, mat in self.curves(rows).items():
            metrics[label] = {}
            n_targets, own = self._lengths(rows, label), self._own_buckets(rows, label)
            for length in lengths:
                lo, hi = bucket_span(length, b)
                reach = n_targets >= hi  # the documents that reach `length`
                vals = mat[reach, lo:hi]
                if not vals.size:
                    continue
                for k, i in enumerate(np.flatnonzero(reach)):  # a method read per length: its own forward's bucket
                    if own[i] is not None:
                        vals[k] = np.array(own[i][str(length)], dtype=float)
                bad = int(np.isnan(vals).any(axis=1).sum())  # non-finite NLL (stored as null)
                if bad:  # marked, not dropped: methods are never compared on different documents
                    ppl[label, length] = nll_tab[label, length] = "NaN"
                    metrics[label][str(length)] = {"ppl": None, "nll": None, "docs": int(len(vals)), "non_finite": bad}
                    continue
                per_doc = vals.sum(1), np.full(len(vals), vals.shape[1])
                nll_tab[label, length], ppl[label, length] = self._estimates(float(vals.mean()), *per_doc)
                metrics[label][str(length)] = _metric(nll_tab[label, length], ppl[label, length]) | {"docs": len(vals)}
            inside = np.arange(mat.shape[1])[None, :] < n_targets[:, None]
            if np.isnan(mat[inside]).any():
                nll_tab[label, "overall"] = ppl[label, "overall"] = "NaN"
                metrics[label]["overall"] = {"ppl": "NaN", "nll": "NaN"}
                continue
            nll_tab[label, "overall"], ppl[label, "overall"] = self._estimates(
                float(np.nanmean(mat)), np.nansum(mat, 1), n_targets
            )
            metrics[label]["overall"] = _metric(nll_tab[label, "overall"], ppl[label, "overall"])
        cols = [*lengths, "overall"]
        tables = {
            "ppl": method_table(ppl, self.labels, cols, oom=oom),
            "nll": method_table(nll_tab, self.labels, cols, oom=oom),
        }
        metrics["bucket_size"] = b
        per_length = [label for label in self.labels if any(r is not None for r in self._own_buckets(rows, label))]
        if per_length:
            metrics["per_length"] = per_length  # read once per milestone (the others: one forward per document)
        return metrics, tables

    def _estimates(self, mean: float, sums, counts) -> tuple[Estimate, Estimate]:
        """(mean NLL, perplexity) of the documents' targets (NLL sum and count per document), each with a 95%
        bootstrap interval over documents (none with one document), seeded by --seed."""
        lo, hi = bootstrap_mean(sums, counts, self.ctx.run_config.seed) or (None, None)
        return Estimate(mean, lo, hi), Estimate(*(None if v is None else math.exp(min(v, 700)) for v in (mean, lo, hi)))

    def plots(self, rows) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ctx = self.ctx
        fig, ax = plt.subplots(figsize=(8, 4.5))
        b = self.bucket()
        for label, mat in self.curves(rows).items():
            mean = np.nanmean(mat, axis=0)
            b = max(b, mat.shape[1] // 200)  # a readable curve at 32x too
            kernel = np.ones(b) / b
            smooth = np.convolve(np.nan_to_num(mean, nan=np.nanmax(mean)), kernel, mode="valid")
            ax.plot(np.arange(len(smooth)) + b, smooth, label=label)
        ax.axvline(ctx.l_pre, color="k", linestyle="--", linewidth=1, label=f"L_pre = {ctx.l_pre}")
        if self.options.log_x:
            ax.set_xscale("log")
        ax.set_xlabel("token position")
        ax.set_ylabel(f"NLL (moving average over {b})")
        ax.set_title(f"{ctx.run_config.model} on {ctx.run_config.dataset}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(ctx.run.path / "nll_vs_position.png", dpi=120)
        plt.close(fig)
