"""Passkey retrieval (paper Table 2) and RULER's needle variants: values hidden in a haystack, asked for
at the end.

The paper's passkey is one unnamed number in repeated filler. `--distractors K` adds K decoy needles under
other keys and the question names the true one (RULER's multikey); `--variants` adds `multivalue` (V values
stored under the asked key, all to be returned) and `multiquery` (Q keys asked at once, every value to be
returned). Keys are names, words, numbers or UUIDs (`--key-type`), values numbers, words or UUIDs
(`--value-type`); every key and value of a prompt is distinct. `--haystack` is the paper's repeated filler,
`essay` (English prose shipped in data/haystack, PSF licence) or any text file. Scoring is exact match per
needle: a value counts when it appears in the answer as a whole token (a number: the answer's first number,
for the single variant, as in the paper); `recall` is the share of asked values found, `correct` all of them.
Keys, values, names and positions are drawn from `--seed`.
"""

from __future__ import annotations

import hashlib
import random
import re
import uuid
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from lminf_eval.errors import UserError
from lminf_eval.harness.intervals import Estimate, accuracy
from lminf_eval.harness.models import shipped
from lminf_eval.harness.task import DOCUMENT_FLAGS, Cell, Task, option, register_task

from .base import check_compile, greedy, left_padded, length_dependent, method_table, ok_rows, slug, truncated

PREFIX = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
NAMED_NEEDLE = " The pass key of {name} is {key}. Remember it. {key} is the pass key of {name}."
NAMED_QUESTION = " What is the pass key of {name}? The pass key of {name} is"
MULTI_QUESTION = " What are all the pass keys of {names}? The pass keys of {names} are"
NAMES = ["Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kemal", "Lena"]
ADJECTIVES = (
    "amber brisk calm daring eager faint gentle hollow idle jolly keen lively mellow nimble odd plain quiet "
    "rapid silent tidy upper vivid wary young zesty bold crisp dusty early frosty"
).split()
NOUNS = (
    "anchor badger cedar dune ember falcon glacier harbor island juniper kettle lantern meadow nectar orchard "
    "pebble quarry raven saddle thistle umbrella valley walnut yarrow zephyr beacon canyon dolphin fern grove"
).split()
VARIANTS = ("single", "multivalue", "multiquery")
KEY_TYPES = ("name", "word", "number", "uuid")
VALUE_TYPES = ("number", "word", "uuid")
HAYSTACKS = {"repeat": None, "essay": shipped("data", "haystack", "python-howto.txt")}


@dataclass(frozen=True)
class Needles:
    """What one prompt hides and asks: the needle variant and its sizes, key/value kinds, decoys."""

    variant: str = "single"
    distractors: int = 0
    values: int = 4  # per key, for multivalue
    queries: int = 4  # keys asked, for multiquery
    key_type: str = "name"
    value_type: str = "number"

    @property
    def asked(self) -> int:
        """How many values the answer must hold."""
        return {"single": 1, "multivalue": self.values, "multiquery": self.queries}[self.variant]


def draw(kind: str, count: int, rng: random.Random) -> list[str]:
    """`count` distinct keys or values of a kind."""
    if kind == "name":
        if count > len(NAMES):
            raise UserError(f"at most {len(NAMES)} name keys per prompt: use --key-type word, number or uuid")
        return rng.sample(NAMES, count)
    if kind == "word" and count > len(ADJECTIVES) * len(NOUNS):  # (drawing more distinct words would never end)
        raise UserError(f"at most {len(ADJECTIVES) * len(NOUNS)} distinct words per prompt: use number or uuid")
    out: list[str] = []
    while len(out) < count:
        if kind == "number":
            item = str(rng.randint(1, 9_999_999))
        elif kind == "word":
            item = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        else:
            item = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        if item not in out:
            out.append(item)
    return out


def haystack_units(haystack: str) -> tuple[str, ...]:
    """The pieces a haystack is made of, in order (cycled when a prompt needs more): the filler sentence
    group, or the sentences of a text (read again when the file changes)."""
    path = HAYSTACKS.get(haystack, Path(haystack))
    if path is None:
        return (FILLER,)
    try:
        stat = path.stat()
    except OSError as err:
        raise UserError(f"--haystack {haystack}: {err.strerror}: use repeat, essay or a readable text file") from None
    return _units(haystack, path, stat.st_mtime_ns, stat.st_size)


@cache
def _units(haystack: str, path: Path, mtime_ns: int, size: int) -> tuple[str, ...]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        raise UserError(f"--haystack {haystack}: {err.strerror}: use repeat, essay or a readable text file") from None
    sentences = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    units = tuple(" " + piece for s in sentences if s for piece in _short_pieces(s))
    if not units:
        raise UserError(f"--haystack {haystack} holds no text")
    return units


UNIT_CHARS = 100  # a haystack piece is at most this long (a text without sentence punctuation still fills)
TOLERANCE = 8  # a prompt holds between length - TOLERANCE and length tokens (else the length is refused)


def _short_pieces(sentence: str) -> list[str]:
    """A sentence, cut at word boundaries (or inside a word longer than a piece) into pieces of at most
    UNIT_CHARS: a text without sentence punctuation still fills a prompt in small steps."""
    pieces, current = [], ""
    for word in sentence.split(" "):
        while len(word) > UNIT_CHARS:
            pieces += [current] if current else []
            current, pieces, word = "", [*pieces, word[:UNIT_CHARS]], word[UNIT_CHARS:]
        if current and len(current) + 1 + len(word) > UNIT_CHARS:
            pieces.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    return [*pieces, current] if current else pieces


def make_prompt(tokenizer, length: int, depth: float, rng: random.Random, needles: Needles = Needles(),
                haystack: str = "repeat") -> tuple[list[int], list[str]]:  # fmt: skip
    """-> (token ids of about `length` tokens, the values the answer must hold). Depth 0 puts the (first)
    asked needle right after the prefix, 1 right before the question; the other needles go anywhere."""
    n_keys = (needles.queries if needles.variant == "multiquery" else 1) + needles.distractors
    per_key = needles.values if needles.variant == "multivalue" else 1
    named = n_keys > 1 or needles.variant == "multivalue"
    keys = draw(needles.key_type, n_keys, rng) if named else [""]
    values = draw(needles.value_type, per_key + n_keys - 1, rng)  # decoy keys hold one value each
    stored = [(keys[max(0, i - per_key + 1)], v) for i, v in enumerate(values)]  # (key, value), asked first
    asked_keys = keys[: needles.queries] if needles.variant == "multiquery" else keys[:1]
    answers = [v for k, v in stored if k in asked_keys]
    if not named:
        pieces, question = [NEEDLE.format(key=values[0])], QUESTION
    else:
        pieces = [NAMED_NEEDLE.format(name=k, key=v) for k, v in stored]
        names = ", ".join(asked_keys)
        question = NAMED_QUESTION.format(name=names) if len(answers) == 1 else MULTI_QUESTION.format(names=names)
    needle, others = pieces[0], pieces[1:]
    units = haystack_units(haystack)
    placement = rng.random()  # other needles' positions are redrawn identically for every trial length below

    def build(slots: int, extra: int = 0) -> list[int]:
        """The prompt with `slots` haystack pieces and the first `extra` characters of the next one."""
        hay = [units[i % len(units)] for i in range(slots)] + ([units[slots % len(units)][:extra]] if extra else [])
        place = random.Random(placement)
        for other in others:
            hay.insert(place.randint(0, len(hay)), other)
        hay.insert(round(depth * len(hay)), needle)
        return tokenizer(PREFIX + "".join(hay) + question, add_special_tokens=True).input_ids

    fixed = len(build(0))
    if fixed > length:
        raise UserError(
            f"a {length}-token passkey prompt cannot hold its needles and question ({fixed} tokens): raise "
            "--lengths or lower --distractors/--values/--queries"
        )
    # the most whole pieces that stay within the length (tokenisation is not additive: estimate, then step)...
    sample = "".join(units[i % len(units)] for i in range(8))
    per_unit = max(1, len(tokenizer(sample, add_special_tokens=False).input_ids) // 8)
    slots = max(0, (length - fixed) // per_unit)
    for _ in range(6):
        step = round((length - len(build(slots))) / per_unit)
        if step == 0:
            break
        slots = max(0, slots + step)
    while slots and len(build(slots)) > length:
        slots -= 1
    while len(build(slots + 1)) <= length:
        slots += 1
    # ...then as much of the next piece as fits, found by bisection over its characters
    lo, hi = 0, len(units[slots % len(units)])
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(build(slots, mid)) <= length else (lo, mid - 1)
    ids = build(slots, lo)
    if len(ids) < length - TOLERANCE:
        raise UserError(
            f"passkey prompt of {len(ids)} tokens for length {length}: pass a --haystack of plain text, or other "
            "--lengths"
        )
    return ids, answers


def first_integer(text: str) -> str | None:
    match = re.search(r"\d+", text)
    return match.group(0) if match else None


def found(answer: str, value: str, strict_number: bool) -> bool:
    """Exact match of one needle's value in the answer: the first number when `strict_number` (the paper's
    single passkey), else the value as a whole token anywhere."""
    if strict_number:
        return first_integer(answer) == value
    return re.search(rf"(?<![\w-]){re.escape(value)}(?![\w-])", answer) is not None


@dataclass
class PasskeyOptions:
    depths: str | None = option(None, "Needle depths to sweep, e.g. 0,0.25,0.5,0.75,1 (default: uniform random).")
    num_samples: int = option(4, "Prompts per length (and depth).", min=1)
    distractors: int = option(0, "Decoy needles under other keys (RULER multikey).", min=0)
    variants: str = option("single", "Needle variants to sweep: single, multivalue, multiquery.")
    values: int = option(4, "Values stored under the asked key (multivalue).", min=2)
    queries: int = option(4, "Keys asked at once (multiquery).", min=2)
    key_type: str = option("name", "Needle keys: name, word, number or uuid (unnamed when one needle only).")
    value_type: str = option("number", "Needle values: number, word or uuid.")
    haystack: str = option("repeat", "repeat (the paper's filler), essay (shipped prose), or a text file.")
    new_tokens: int = option(0, "Tokens generated for the answer (0: 10 per asked number or word, 30 per uuid).", min=0)
    compile: bool = option(False, "Methods with a bounded cache decode through the ring cache, compiled.")
    batch_size: int = option(1, "Prompts of one length per batch, left-padded (Dynamic NTK runs alone).", min=1)


@register_task
class Passkey(Task):
    name = "passkey"
    result_fields = {"answer": str, "correct": bool, "recall": (int, float)}
    help = "Passkey retrieval and RULER's needle variants, over lengths and needle depths (paper Table 2)."
    Options = PasskeyOptions
    default_lengths = "1x,1.5x,2x"
    settings_defaults = {"n_global": 10}  # the paper's passkey runs
    ignores = DOCUMENT_FLAGS  # (the haystack is --haystack)
    depths: list[float | None]

    def prepare(self) -> None:
        options = self.options
        if options.compile:
            check_compile(self.ctx)
        try:
            self.depths = [float(d) for d in options.depths.split(",")] if options.depths else [None]
        except ValueError:
            raise UserError(f"cannot parse --depths {options.depths!r}: use fractions like 0,0.25,0.5,0.75,1") from None
        if any(d is not None and not 0 <= d <= 1 for d in self.depths):
            raise UserError("--depths must lie between 0 and 1")
        self.variants = [v for v in options.variants.replace(",", " ").split() if v]
        for flag, chosen, given in (
            ("--depths", self.depths, options.depths),
            ("--variants", self.variants, options.variants),
        ):
            if len(set(chosen)) < len(chosen):
                raise UserError(f"{flag} {given} lists a value twice: list each once")
        for name, chosen, allowed in (
            ("--variants", self.variants or ["(none)"], VARIANTS),
            ("--key-type", [options.key_type], KEY_TYPES),
            ("--value-type", [options.value_type], VALUE_TYPES),
        ):
            if any(c not in allowed for c in chosen):
                raise UserError(f"unknown {name} {','.join(chosen)}: choose from {', '.join(allowed)}")
        self.needles = {
            v: Needles(v, options.distractors, options.values, options.queries, options.key_type, options.value_type)
            for v in self.variants
        }
        keys = max((n.queries if v == "multiquery" else 1) + n.distractors for v, n in self.needles.items())
        if options.key_type == "name" and keys > len(NAMES):
            raise UserError(f"{keys} keys per prompt but only {len(NAMES)} names: lower --distractors/--queries or "
                            "pass --key-type word")  # fmt: skip
        if options.key_type == "word" and keys > len(ADJECTIVES) * len(NOUNS):
            raise UserError(f"{keys} keys per prompt but only {len(ADJECTIVES) * len(NOUNS)} distinct words: lower "
                            "--distractors/--queries or pass --key-type number or uuid")  # fmt: skip
        haystack_units(options.haystack)  # a missing or empty file fails now
        for needles in self.needles.values():  # a length no prompt can land on fails now, not mid-run
            for length in self.ctx.lengths:
                make_prompt(self.ctx.tokenizer, length, 0.5, random.Random(0), needles, options.haystack)

    def data_digest(self) -> str:
        """The haystack by content: a file edited between a run and its --resume is a different run."""
        return hashlib.sha256("".join(haystack_units(self.options.haystack)).encode()).hexdigest()[:16]

    def cells(self) -> list[Cell]:
        cells = []
        for m in self.ctx.methods:
            for variant in self.variants:
                for length in self.ctx.lengths:
                    for depth in self.depths:
                        for i in range(self.options.num_samples):
                            key = {"method": m.label, "variant": variant, "length": length, "depth": depth, "sample": i}
                            cells.append(Cell(key, m, None, length))
        return cells

    def row(self, cell_key: dict) -> str:
        """A table row: the method, and the variant when several are swept."""
        return cell_key["method"] + (f" [{cell_key['variant']}]" if len(self.variants) > 1 else "")

    def batch_key(self, cell) -> tuple | None:
        """Prompts of one variant and length (within a few tokens: left-padded) batch; not Dynamic NTK, whose
        rotation padding would change."""
        if length_dependent(self.ctx.settings[cell.method.label]):
            return None
        return cell.key["variant"], cell.key["length"]

    def run_cell(self, cell) -> dict:
        return self.run_batch([cell])[0]

    def run_batch(self, cells) -> list[dict]:
        ctx, options = self.ctx, self.options
        needles = self.needles[cells[0].key["variant"]]
        prompts = [self._prompt(cell) for cell in cells]
        pad = ctx.tokenizer.pad_token_id if ctx.tokenizer.pad_token_id is not None else ctx.tokenizer.eos_token_id
        rows = [truncated(cell.method, prompt[0], ctx.l_pre) for cell, prompt in zip(cells, prompts, strict=True)]
        ids, mask = left_padded(rows, pad, ctx.device)
        per_value = 30 if needles.value_type == "uuid" else 10
        n_new = options.new_tokens or per_value * len(prompts[0][1])
        out = greedy(ctx.model, ids, n_new, pad, options.compile, mask)
        results = []
        for (prompt, answers, depth), new in zip(prompts, out, strict=True):
            answer = ctx.tokenizer.decode(new, skip_special_tokens=True)
            strict = len(answers) == 1 and needles.value_type == "number"
            hits = [found(answer, v, strict) for v in answers]
            results.append({
                "prompt_tokens": len(prompt),
                "depth_used": round(depth, 4),
                "key": answers[0] if len(answers) == 1 else answers,
                "answer": answer,
                "recall": sum(hits) / len(hits),
                "correct": all(hits),
            })  # fmt: skip
        return results

    def _prompt(self, cell) -> tuple[list[int], list[str], float]:
        """The cell's prompt, its answers and the needle depth used; it depends on (seed, variant, length,
        depth, sample) only, so every method sees the same one."""
        k = cell.key
        tag = "" if k["variant"] == "single" else f"-{k['variant']}"
        rng = random.Random(f"{self.ctx.run_config.seed}-{k['length']}-{k['depth']}-{k['sample']}{tag}")
        depth = k["depth"] if k["depth"] is not None else rng.random()
        ids, answers = make_prompt(self.ctx.tokenizer, k["length"], depth, rng, self.needles[k["variant"]],
                                   self.options.haystack)  # fmt: skip
        return ids, answers, depth

    def summarize(self, rows):
        ctx = self.ctx
        labels = [self.row({"method": m, "variant": v}) for m in self.labels for v in self.variants]
        acc, recall, by_depth, counts = {}, {}, {}, {}
        oom = {(self.row(r["cell"]), r["cell"]["length"]) for r in rows if r["status"] == "oom"}
        for r in ok_rows(rows):
            c, label = r["cell"], self.row(r["cell"])
            d = "random" if c["depth"] is None else c["depth"]
            counts.setdefault((label, c["length"]), []).append((r["correct"], r.get("recall", r["correct"])))
            counts.setdefault((label, c["length"], d), []).append((r["correct"], r.get("recall", r["correct"])))
        for key, vals in counts.items():
            (acc if len(key) == 2 else by_depth)[key] = accuracy(sum(v[0] for v in vals), len(vals))  # (Wilson 95%)
            if len(key) == 2:
                recall[key] = 100.0 * sum(v[1] for v in vals) / len(vals)
        pooled = {  # every prompt of a row, for the interval of its average
            label: [v[0] for key, vals in counts.items() if key[0] == label and len(key) == 2 for v in vals]
            for label in labels
        }
        table = method_table(acc, labels, ctx.lengths, oom=oom)
        tables = {"passkey_accuracy": self._with_average(table, pooled)}
        metrics = {label: {str(L): acc.get((label, L)) for L in ctx.lengths} for label in labels}
        for label in labels:
            metrics[label]["ci95"] = {
                str(L): [acc[label, L].lo, acc[label, L].hi] for L in ctx.lengths if (label, L) in acc
            }
        if any(n.asked > 1 for n in self.needles.values()):  # share of asked values found (RULER's score)
            tables["passkey_recall"] = self._with_average(method_table(recall, labels, ctx.lengths, oom=oom))
            for label in labels:
                metrics[label]["recall"] = {str(L): recall.get((label, L)) for L in ctx.lengths}
        depths = sorted({k[2] for k in by_depth}, key=str)
        if len(depths) > 1:  # one row per (method, depth): the heatmaps as a table
            rows_d = [f"{m} @ {d}" for m in labels for d in depths]
            values = {(f"{m} @ {d}", L): v for (m, L, d), v in by_depth.items()}
            tables["passkey_by_depth"] = method_table(values, rows_d, ctx.lengths, index_name="method @ depth")
            for m in labels:
                metrics[m]["by_depth"] = {f"{d}@{L}": by_depth.get((m, L, d)) for d in depths for L in ctx.lengths}
        return metrics, tables

    @staticmethod
    def _with_average(table, pooled: dict[str, list[bool]] | None = None):
        """An `avg` column: the mean over lengths; with `pooled` (each row's prompts), its Wilson 95% interval."""
        average = table.apply(lambda row: np.nanmean([v for v in row if isinstance(v, float)] or [np.nan]), axis=1)
        table["avg"] = average.astype(object)  # (a cell may become an Estimate below)
        for label, hits in (pooled or {}).items():
            if hits and not np.isnan(table.loc[label, "avg"]):
                interval = accuracy(sum(hits), len(hits))
                table.loc[label, "avg"] = Estimate(table.loc[label, "avg"], interval.lo, interval.hi)
        return table

    def plots(self, rows) -> None:
        import matplotlib

        matplotlib.use("Agg")

        ctx, depths = self.ctx, self.depths
        if len(depths) < 2:
            return
        for m in ctx.methods:
            for variant in self.variants:
                label = self.row({"method": m.label, "variant": variant})
                grid = np.full((len(depths), len(ctx.lengths)), np.nan)
                for r in ok_rows(rows):
                    c = r["cell"]
                    if c["method"] == m.label and c["variant"] == variant:
                        i, j = depths.index(c["depth"]), ctx.lengths.index(c["length"])
                        grid[i, j] = (0 if np.isnan(grid[i, j]) else grid[i, j]) + r["correct"]
                self._heatmap(100 * grid / self.options.num_samples, label)

    def _heatmap(self, grid, label: str) -> None:
        import matplotlib.pyplot as plt

        ctx, depths = self.ctx, self.depths
        fig, ax = plt.subplots(figsize=(1.2 * len(ctx.lengths) + 2, 0.6 * len(depths) + 1.5))
        im = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(ctx.lengths)), [str(L) for L in ctx.lengths])
        ax.set_yticks(range(len(depths)), [str(d) for d in depths])
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("needle depth")
        ax.set_title(f"passkey accuracy %: {label}")
        fig.colorbar(im)
        fig.tight_layout()
        fig.savefig(ctx.run.path / f"passkey_heatmap_{slug(label)}.png", dpi=110)
        plt.close(fig)
