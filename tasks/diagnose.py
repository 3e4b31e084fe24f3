"""Why vanilla models fail past L_pre (paper Fig. 1), measured on the unmodified model:
(a) the largest attention logit seen within distance <= d, per head: it keeps growing past L_pre;
(b) attention entropy per query row against the number of attended tokens: it keeps growing;
(c) a 2-D PCA of layer-2 hidden states coloured by position: the first tokens sit apart;
plus the share of attention on position 0 from queries inside the training window (does the model use its
first token as a sink, which is what makes LM-Infinite's global tokens matter?).
Attention statistics are gathered blockwise by a registered attention function, so memory stays O(block x n).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from lminf_eval.errors import UserError
from lminf_eval.harness.task import Cell, Task, console, register_task
from lminf_eval.settings import FLAG_NAMES

from .base import method_table, ok_rows

if TYPE_CHECKING:
    import torch

    from lminf_eval.harness.data import Document

BLOCK = 512  # query rows scored at once: memory O(BLOCK x n)
SINK_FROM = 64  # queries from this position on count towards the position-0 share (earlier ones see few keys)


def bucket_edges(n: int) -> list[int]:
    """Distance buckets 0, 1, 2-3, 4-7, ...: bucket b holds distances in [2^(b-1), 2^b)."""
    return [0] + [2**b for b in range(int(math.log2(max(n, 2))) + 1)]


def sink_rows(n: int, l_pre: int) -> tuple[int, int]:
    """The queries [lo, hi) whose attention on position 0 is averaged: from SINK_FROM, inside the training window."""
    return SINK_FROM, max(SINK_FROM + 1, min(n, l_pre))


class Stats:
    """Per layer: max logit per (head, distance bucket) and mean entropy per query position."""

    def __init__(self, layers: set[int], n: int, l_pre: int, block: int = BLOCK):
        self.layers, self.n, self.block = layers, n, block
        self.sink_rows = sink_rows(n, l_pre)
        self.nb = len(bucket_edges(n))
        self.max_logit: dict[int, torch.Tensor] = {}
        self.entropy: dict[int, torch.Tensor] = {}
        self.sink: dict[int, float] = {}  # mean attention probability on position 0 over `sink_rows`

    def observe(self, layer: int, q: torch.Tensor, k: torch.Tensor, scaling: float) -> None:
        import torch

        b, hq, n, _ = q.shape
        k = k.repeat_interleave(hq // k.shape[1], 1)
        top = torch.full((hq, self.nb), -math.inf)
        ent = torch.empty(n)
        sink, (lo, hi) = 0.0, self.sink_rows
        for s in range(0, n, self.block):
            e = min(n, s + self.block)
            scores = (q[0, :, s:e].float() @ k[0, :, :e].float().transpose(-1, -2)) * scaling  # [h, B, e]
            dist = torch.arange(s, e)[:, None] - torch.arange(e)[None, :]
            causal = dist >= 0
            bucket = torch.where(dist > 0, torch.log2(dist.clamp(min=1).float()).floor().long() + 1, 0)
            flat = scores.masked_fill(~causal, -math.inf).reshape(hq, -1)
            idx = bucket.clamp(min=0, max=self.nb - 1).reshape(1, -1).expand(hq, -1)
            top = top.scatter_reduce(1, idx, flat, reduce="amax")
            p = torch.softmax(scores.masked_fill(~causal, -math.inf), dim=-1)
            ent[s:e] = -(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean(0)
            sink += float(p[:, max(0, lo - s) : max(0, hi - s), 0].sum())
        self.max_logit[layer] = top
        self.sink[layer] = sink / (hq * (hi - lo))
        self.entropy[layer] = ent


def make_attention(stats: Stats):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if module.layer_idx in stats.layers:
            stats.observe(module.layer_idx, query, key, scaling or query.shape[-1] ** -0.5)
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )

    return attention


@register_task
class Diagnose(Task):
    name = "diagnose"
    result_fields = {"edges": list, "max_logit": dict, "entropy": dict}
    help = "Why vanilla fails past L_pre: max logit vs distance, entropy, hidden-state PCA (paper Fig. 1)."
    default_lengths = "2x"
    default_methods = ("vanilla",)  # (the unmodified model is what it studies)
    ignores = ("num_docs", "min_tokens", *FLAG_NAMES)
    docs: list[Document]

    def layers(self) -> set[int]:
        n = self.ctx.model.config.num_hidden_layers
        return {min(2, n - 1), n // 2, n - 1}

    def prepare(self) -> None:
        ctx = self.ctx
        if any(m.name != "vanilla" for m in ctx.methods):
            console.print("[yellow]diagnose studies the unmodified model: methods other than vanilla are ignored")
        from lminf_eval.families import FAMILIES  # (here: the families import torch, --help must not)

        family = FAMILIES.get(ctx.model.config.model_type)
        if family is not None and not family.registry_attention:
            raise UserError("diagnose reads attention through transformers' registry: use a RoPE model")
        n = max(ctx.lengths)
        if n <= SINK_FROM:
            raise UserError(f"diagnose reads queries from position {SINK_FROM} on: pass --lengths above {SINK_FROM}")
        # one document: the figures describe a single long read
        self.docs = self.documents(1, n, n)

    def cells(self) -> list[Cell]:
        vanilla = next((m for m in self.ctx.methods if m.name == "vanilla"), None)
        if vanilla is None:
            raise UserError("diagnose needs --method vanilla")
        return [Cell({"method": vanilla.label, "doc": d.id}, vanilla, d, len(d.ids)) for d in self.docs]

    def run_cell(self, cell) -> dict:
        import torch
        from transformers import AttentionInterface

        ctx, model = self.ctx, self.ctx.model
        ids = torch.tensor([cell.data.ids], device=ctx.device)
        stats = Stats(self.layers(), ids.shape[1], ctx.l_pre)
        AttentionInterface.register("lminf_diagnose", make_attention(stats))
        saved = model.config._attn_implementation
        model.set_attn_implementation("lminf_diagnose")
        try:
            with torch.no_grad():
                out = model(ids, use_cache=False, output_hidden_states=True, logits_to_keep=1)
        finally:
            model.set_attn_implementation(saved)
        hidden = out.hidden_states[min(2, len(out.hidden_states) - 1)][0].float()
        centred = hidden - hidden.mean(0)
        _, _, v = torch.pca_lowrank(centred, q=2, center=False)
        xy = (centred @ v[:, :2]).tolist()
        keep = sorted(set(range(min(64, len(xy)))) | set(range(0, len(xy), max(1, len(xy) // 2000))))
        return {
            "edges": bucket_edges(ids.shape[1]),
            "max_logit": {str(k): v.tolist() for k, v in stats.max_logit.items()},
            "entropy": {str(k): [round(x, 4) for x in v.tolist()] for k, v in stats.entropy.items()},
            "sink": {str(k): round(v, 4) for k, v in stats.sink.items()},
            "pca": {"positions": keep, "xy": [[round(xy[i][0], 3), round(xy[i][1], 3)] for i in keep]},
        }

    def summarize(self, rows):
        rows = ok_rows(rows)
        if not rows:
            return {}, {}
        r = rows[0]
        edges, n = r["edges"], self.ctx.l_pre
        marks = [m for m in (n // 2, n, 2 * n, 4 * n, 8 * n) if m <= edges[-1] * 2]
        logit, entropy, sink = {}, {}, {}
        rows_used = "on position 0 ({}..{})".format(*sink_rows(max(self.ctx.lengths), n))
        for layer, grid in r["max_logit"].items():
            per_head = np.maximum.accumulate(np.array(grid), axis=1)  # max within distance <= bucket end
            for m in marks:
                b = min(len(edges) - 1, int(math.log2(m)))
                logit[f"layer {layer}", f"d<={m}"] = float(per_head[:, b].mean())
            ent = np.array(r["entropy"][layer])
            for m in marks:
                if m <= len(ent):
                    entropy[f"layer {layer}", f"pos {m}"] = float(ent[max(0, m - 64) : m].mean())
            if "sink" in r:
                sink[f"layer {layer}", rows_used] = r["sink"][layer]
        layers = [f"layer {k}" for k in r["max_logit"]]
        return {"doc": r["cell"]["doc"]}, {
            "diagnose_max_logit": method_table(logit, layers, [f"d<={m}" for m in marks], index_name="layer"),
            "diagnose_entropy": method_table(entropy, layers, [f"pos {m}" for m in marks], index_name="layer"),
            "diagnose_sink": method_table(sink, layers, [rows_used], index_name="layer"),
        }

    def plots(self, rows) -> None:
        ctx = self.ctx
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = ok_rows(rows)
        if not rows:
            return
        r = rows[0]
        edges = np.array(r["edges"][1:] + [r["edges"][-1] * 2])
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        layer = sorted(r["max_logit"], key=int)[-1]
        grid = np.maximum.accumulate(np.array(r["max_logit"][layer]), axis=1)
        for head in grid:
            axes[0].plot(edges[: len(head)], head, alpha=0.7)
        axes[0].set(
            xscale="log", xlabel="distance d", ylabel="max logit within <= d", title=f"(a) layer {layer}, per head"
        )
        for name, ent in sorted(r["entropy"].items(), key=lambda kv: int(kv[0])):
            ent = np.array(ent)
            smooth = np.convolve(ent, np.ones(64) / 64, mode="valid")
            axes[1].plot(np.arange(len(smooth)) + 64, smooth, label=f"layer {name}")
        axes[1].set(
            xscale="log",
            xlabel="attended tokens (query position)",
            ylabel="entropy (nats)",
            title="(b) attention entropy",
        )
        axes[1].legend()
        pos, xy = np.array(r["pca"]["positions"]), np.array(r["pca"]["xy"])
        sc = axes[2].scatter(xy[:, 0], xy[:, 1], c=np.log2(pos + 1), s=6, cmap="viridis")
        fig.colorbar(sc, ax=axes[2], label="log2(position + 1)")
        axes[2].set(title="(c) layer-2 hidden states, PCA", xlabel="PC1", ylabel="PC2")
        for ax in axes[:2]:
            ax.axvline(ctx.l_pre, color="k", linestyle="--", linewidth=1)
        fig.suptitle(f"{ctx.run_config.model}: vanilla attention past L_pre = {ctx.l_pre}")
        fig.tight_layout()
        fig.savefig(ctx.run.path / "diagnose.png", dpi=110)
        plt.close(fig)
