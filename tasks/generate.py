"""Generation quality after long prefixes (paper Table 3): at each milestone position p, greedily generate
`--new-tokens` (default 100) from tokens [0, p) and score them against the document's own tokens
[p, p + new_tokens) with corpus BLEU (sacrebleu) and ROUGE-1/2/L F1 (rouge-score)."""

from __future__ import annotations

from dataclasses import dataclass

from lminf_eval.harness.data import Document
from lminf_eval.harness.task import Cell, Task, option, register_task

from .base import check_compile, greedy, method_table, ok_rows, truncated

ROUGE = ("rouge1", "rouge2", "rougeL")


def score(hypotheses: list[str], references: list[str]) -> dict:
    """Corpus BLEU over all pairs; ROUGE F1 averaged over pairs; all on a 0-100 scale."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE), use_stemmer=False)
    rouge = {k: 0.0 for k in ROUGE}
    for hyp, ref in zip(hypotheses, references, strict=True):
        for k, v in scorer.score(ref, hyp).items():
            rouge[k] += v.fmeasure
    n = max(1, len(hypotheses))
    return {"bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score, **{k: 100 * v / n for k, v in rouge.items()}}


@dataclass
class GenerationOptions:
    new_tokens: int = option(100, "Tokens generated and scored after each position.", min=1)
    compile: bool = option(False, "Methods with a bounded cache decode through the ring cache, compiled.")
    batch_size: int = option(1, "Documents per batch at each position (one prefix length: no padding).", min=1)


@register_task
class Generation(Task):
    name = "generate"
    result_fields = {"hypothesis": str, "reference": str}
    help = "BLEU and ROUGE of greedy continuations after long prefixes (paper Table 3)."
    Options = GenerationOptions
    default_lengths = "0.5x,1x,2x,4x"
    settings_defaults = {"n_global": 100}  # the paper's generation runs
    docs: list[Document]

    def prepare(self) -> None:
        ctx, run_config = self.ctx, self.ctx.run_config
        if self.options.compile:
            check_compile(ctx)
        need = max(ctx.lengths) + self.options.new_tokens
        self.docs = self.documents(run_config.num_docs, max(run_config.min_tokens or 0, need), need)

    def cells(self) -> list[Cell]:
        return [
            Cell({"method": m.label, "doc": d.id, "position": p}, m, d, p)
            for m in self.ctx.methods
            for d in self.docs
            for p in self.ctx.lengths
        ]

    def batch_key(self, cell) -> int:
        """Documents at one position: prefixes of one length, a batch without padding."""
        return cell.key["position"]

    def run_cell(self, cell) -> dict:
        return self.run_batch([cell])[0]

    def run_batch(self, cells) -> list[dict]:
        import torch

        ctx, p, n = self.ctx, cells[0].key["position"], self.options.new_tokens
        prefixes = [truncated(cell.method, cell.data.ids[:p], ctx.l_pre) for cell in cells]
        pad = ctx.tokenizer.pad_token_id if ctx.tokenizer.pad_token_id is not None else ctx.tokenizer.eos_token_id
        out = greedy(ctx.model, torch.tensor(prefixes, device=ctx.device), n, pad, self.options.compile)
        decode = ctx.tokenizer.decode
        return [
            {
                "hypothesis": decode(new, skip_special_tokens=True),
                "reference": decode(cell.data.ids[p : p + n], skip_special_tokens=True),
            }
            for cell, new in zip(cells, out, strict=True)
        ]

    def summarize(self, rows):
        labels, lengths = self.labels, self.ctx.lengths
        groups: dict = {}
        for r in ok_rows(rows):
            c = r["cell"]
            groups.setdefault((c["method"], c["position"]), ([], []))
            groups[c["method"], c["position"]][0].append(r["hypothesis"])
            groups[c["method"], c["position"]][1].append(r["reference"])
        oom = {(r["cell"]["method"], r["cell"]["position"]) for r in rows if r["status"] == "oom"}
        scores = {key: score(h, ref) for key, (h, ref) in groups.items()}
        metrics = {m: {str(p): s for (mm, p), s in scores.items() if mm == m} for m in labels}
        tables = {
            metric: method_table({k: v[metric] for k, v in scores.items()}, labels, lengths, oom=oom)
            for metric in ("bleu", *ROUGE)
        }
        return metrics, tables
