"""Passkey retrieval (paper Table 2): a number hidden in filler text, asked for at the end.

`--distractors K` adds K decoy needles carrying other numbers under other names, and the question names
the true one (RULER's multi-key needle task). Keys, names and positions are drawn from `--seed`.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import numpy as np
import torch

from lminf_eval.errors import UserError
from lminf_eval.task import Cell, Task, option, register_task

from .base import greedy, method_table, ok_rows, truncated

PREFIX = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
NAMED_NEEDLE = " The pass key of {name} is {key}. Remember it. {key} is the pass key of {name}."
NAMED_QUESTION = " What is the pass key of {name}? The pass key of {name} is"
NAMES = ["Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kemal", "Lena"]


def make_prompt(tokenizer, length: int, depth: float, rng: random.Random, distractors: int = 0):
    """-> (token ids of about `length` tokens, key as string, needle depth used). Depth 0 puts the needle
    right after the prefix, 1 right before the question."""
    key = str(rng.randint(1, 9_999_999))
    if distractors:
        names = rng.sample(NAMES, distractors + 1)
        decoys = [NAMED_NEEDLE.format(name=n, key=rng.randint(1, 9_999_999)) for n in names[1:]]
        needle, question = NAMED_NEEDLE.format(name=names[0], key=key), NAMED_QUESTION.format(name=names[0])
    else:
        decoys, needle, question = [], NEEDLE.format(key=key), QUESTION

    placement = rng.random()  # decoy positions are redrawn identically for every trial length below

    def build(slots: int) -> list[int]:
        pieces = [FILLER] * slots
        place = random.Random(placement)
        for decoy in decoys:  # decoys anywhere, the true needle at its depth
            pieces.insert(place.randint(0, len(pieces)), decoy)
        pieces.insert(round(depth * len(pieces)), needle)
        return tokenizer(PREFIX + "".join(pieces) + question, add_special_tokens=True).input_ids

    per_filler = max(1, len(tokenizer(FILLER * 8, add_special_tokens=False).input_ids) // 8)
    slots = max(1, length // per_filler)
    for _ in range(4):  # tokenisation is not additive: converge on the length
        ids = build(slots)
        if abs(len(ids) - length) < per_filler:
            break
        slots = max(1, slots + (length - len(ids)) // per_filler)
    return ids, key


def first_integer(text: str) -> str | None:
    match = re.search(r"\d+", text)
    return match.group(0) if match else None


@dataclass
class PasskeyOptions:
    depths: str | None = option(None, "Needle depths to sweep, e.g. 0,0.25,0.5,0.75,1 (default: uniform random).")
    num_samples: int = option(4, "Prompts per length (and depth).", min=1)
    distractors: int = option(0, "Decoy needles with other names and numbers.", min=0)
    new_tokens: int = option(10, "Tokens generated for the answer.", min=1)


@register_task
class Passkey(Task):
    name = "passkey"
    help = "Passkey retrieval with optional distractors, over lengths and needle depths (paper Table 2)."
    Options = PasskeyOptions
    default_lengths = "1x,1.5x,2x"
    settings_defaults = {"n_global": 10}  # the paper's passkey runs
    depths: list[float | None]

    def prepare(self) -> None:
        options = self.options
        if options.distractors < 0 or options.distractors >= len(NAMES):
            raise UserError(f"--distractors must be between 0 and {len(NAMES) - 1}")
        try:
            self.depths = [float(d) for d in options.depths.split(",")] if options.depths else [None]
        except ValueError:
            raise UserError(f"cannot parse --depths {options.depths!r}: use fractions like 0,0.25,0.5,0.75,1") from None
        if any(d is not None and not 0 <= d <= 1 for d in self.depths):
            raise UserError("--depths must lie between 0 and 1")

    def cells(self) -> list[Cell]:
        cells = []
        for m in self.ctx.methods:
            for length in self.ctx.lengths:
                for depth in self.depths:
                    for i in range(self.options.num_samples):
                        key = {"method": m.label, "length": length, "depth": depth, "sample": i}
                        cells.append(Cell(key, m, None, length))
        return cells

    def run_cell(self, cell) -> dict:
        ctx, k = self.ctx, cell.key
        # the prompt depends on (seed, length, depth, sample) only, so every method sees the same one
        rng = random.Random(f"{ctx.run_config.seed}-{k['length']}-{k['depth']}-{k['sample']}")
        depth = k["depth"] if k["depth"] is not None else rng.random()
        ids, key = make_prompt(ctx.tokenizer, k["length"], depth, rng, self.options.distractors)
        prompt = truncated(cell.method, torch.tensor([ids], device=ctx.device), ctx.l_pre)
        pad = ctx.tokenizer.pad_token_id if ctx.tokenizer.pad_token_id is not None else ctx.tokenizer.eos_token_id
        out = greedy(ctx.model, prompt, self.options.new_tokens, pad)
        answer = ctx.tokenizer.decode(out, skip_special_tokens=True)
        return {
            "prompt_tokens": len(ids),
            "depth_used": round(depth, 4),
            "key": key,
            "answer": answer,
            "correct": first_integer(answer) == key,
        }

    def summarize(self, rows):
        ctx, labels = self.ctx, self.labels
        acc, by_depth, counts = {}, {}, {}
        oom = {(r["cell"]["method"], r["cell"]["length"]) for r in rows if r["status"] == "oom"}
        for r in ok_rows(rows):
            c = r["cell"]
            counts.setdefault((c["method"], c["length"]), []).append(r["correct"])
            d = "random" if c["depth"] is None else c["depth"]
            counts.setdefault((c["method"], c["length"], d), []).append(r["correct"])
        for key, vals in counts.items():
            (acc if len(key) == 2 else by_depth)[key] = 100.0 * sum(vals) / len(vals)
        table = method_table(acc, labels, ctx.lengths, oom=oom)
        table["avg"] = table.apply(lambda row: np.nanmean([v for v in row if isinstance(v, float)] or [np.nan]), axis=1)
        metrics = {m.label: {str(L): acc.get((m.label, L)) for L in ctx.lengths} for m in ctx.methods}
        tables = {"passkey_accuracy": table}
        depths = sorted({k[2] for k in by_depth}, key=str)
        if len(depths) > 1:  # one row per (method, depth): the heatmaps as a table
            rows_d = [f"{m} @ {d}" for m in labels for d in depths]
            values = {(f"{m} @ {d}", L): v for (m, L, d), v in by_depth.items()}
            tables["passkey_by_depth"] = method_table(values, rows_d, ctx.lengths, index_name="method @ depth")
            for m in labels:
                metrics[m]["by_depth"] = {f"{d}@{L}": by_depth.get((m, L, d)) for d in depths for L in ctx.lengths}
        return metrics, tables

    def plots(self, rows) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ctx, depths = self.ctx, self.depths
        if len(depths) < 2:
            return
        for m in ctx.methods:
            grid = np.full((len(depths), len(ctx.lengths)), np.nan)
            for r in ok_rows(rows):
                c = r["cell"]
                if c["method"] == m.label:
                    i, j = depths.index(c["depth"]), ctx.lengths.index(c["length"])
                    grid[i, j] = (0 if np.isnan(grid[i, j]) else grid[i, j]) + r["correct"]
            grid = 100 * grid / self.options.num_samples
            fig, ax = plt.subplots(figsize=(1.2 * len(ctx.lengths) + 2, 0.6 * len(depths) + 1.5))
            im = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(ctx.lengths)), [str(L) for L in ctx.lengths])
            ax.set_yticks(range(len(depths)), [str(d) for d in depths])
            ax.set_xlabel("prompt tokens")
            ax.set_ylabel("needle depth")
            ax.set_title(f"passkey accuracy %: {m.label}")
            fig.colorbar(im)
            fig.tight_layout()
            fig.savefig(ctx.run.path / f"passkey_heatmap_{_slug(m.label)}.png", dpi=110)
            plt.close(fig)


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)
