"""Any lm-evaluation-harness task, group or tag (RULER, BABILong, LongBench, hellaswag, a local YAML task)
on every method: lm-eval's own HFLM around the run's one model load, patched by the runner per method.

One cell = one lm-eval evaluation of (method, task), and of the length too for tasks that build their
samples per length: `--lengths` become RULER's `max_seq_lengths` (token counts; the model's own tokenizer is
saved into the run folder for RULER to size its haystacks with) or BABILong's config ("4k"). So `--limit`
counts samples per length and a run resumes per cell. Each cell keeps lm-eval's results, configs, versions
and sample counts; `--log-samples` keeps its per-sample records in lm-eval-samples/.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from lminf_eval.errors import INSTALL_LM_EVAL, UserError
from lminf_eval.harness.intervals import Estimate
from lminf_eval.harness.task import DOCUMENT_FLAGS, Cell, Task, option, register_task

from .base import method_table, ok_rows, slug

MIN_CONTEXT = 16  # a --max-length below this cannot hold a prompt and an answer
MAX_GEN_TOKS = 1 << 16  # more generated tokens per answer than any long-context task asks


@dataclass
class HarnessOptions:
    tasks: str = option(
        "", "lm-eval tasks, groups or tags, comma-separated (e.g. niah_single_1,ruler_vt or ruler); list: every one."
    )
    limit: int = option(0, "Samples per task (and per length for RULER-style tasks; 0: all).", min=0)
    num_fewshot: int = option(-1, "Few-shot examples (-1: each task's own default).", min=-1)
    batch_size: int = option(1, "Requests per forward (lm-eval pads them; padded keys are masked).", min=1)
    max_gen_toks: int = option(0, "Cap on generated tokens per answer (0: each task's own).", min=0)
    max_length: int = option(
        0, "Cut longer contexts from the left, as lm-eval does (0: never; the truncate method: L_pre).", min=0
    )
    gen_kwargs: str | None = option(
        None, "Generation arguments for every task, as lm-eval takes them: do_sample=true,temperature=0.7."
    )
    apply_chat_template: bool = option(False, "Prompts through the tokenizer's chat template (few-shot as turns).")
    include_path: str | None = option(None, "Folder of extra lm-eval task YAMLs (local tasks).")
    log_samples: bool = option(False, "Keep lm-eval's per-sample records in lm-eval-samples/.")


@register_task
class Harness(Task):
    name = "lm-eval"
    help = "Any lm-evaluation-harness task (RULER, LongBench, a local YAML) on every method."
    Options = HarnessOptions
    default_lengths = "1x"
    ignores = DOCUMENT_FLAGS  # (each lm-eval task brings its own data)

    @classmethod
    def answer(cls, run_config) -> str | None:
        """`--tasks list`: every task, group and tag lm-eval knows (with --include-path's), without a model."""
        if run_config.options.tasks.strip() != "list":
            return None
        _require_lm_eval()
        from lm_eval.tasks import TaskManager

        return TaskManager(include_path=run_config.options.include_path).list_all_tasks()

    def prepare(self) -> None:
        _require_lm_eval()
        from lm_eval.tasks import TaskManager

        self.task_names = [t for t in self.options.tasks.replace(",", " ").split() if t]
        if not self.task_names:
            raise UserError("--tasks is required: name lm-eval tasks or groups, e.g. --tasks niah_single_1")
        twice = sorted({t for t in self.task_names if self.task_names.count(t) > 1})
        if twice:
            raise UserError(f"--tasks lists {twice[0]} twice: list each task once")
        if 0 < self.options.max_length < MIN_CONTEXT:
            raise UserError(
                f"--max-length {self.options.max_length} leaves no room for a prompt: use 0 or >= {MIN_CONTEXT}"
            )
        if self.options.max_gen_toks > MAX_GEN_TOKS:
            raise UserError(f"--max-gen-toks must be at most {MAX_GEN_TOKS}, got {self.options.max_gen_toks}")
        if self.options.include_path and not Path(self.options.include_path).is_dir():
            raise UserError(f"--include-path {self.options.include_path} is not a folder of task YAMLs")
        index = TaskManager(include_path=self.options.include_path).task_index
        unknown = [t for t in self.task_names if t not in index]
        if unknown:
            names = ", ".join(unknown)
            raise UserError(f"unknown lm-eval task {names}: see `lm_eval ls tasks`, or pass --include-path")
        self.styles = {t: _length_style(index, t) for t in self.task_names}
        if "babilong" in self.styles.values() and any(n % 1024 for n in self.ctx.lengths):
            raise UserError("BABILong comes in lengths of whole k (0k, 1k, 2k, 4k, ... 128k): pass --lengths 4k,8k")
        self.managers: dict = {}  # max_seq_lengths -> lm-eval TaskManager (made by the first cell that needs it)
        self.gen_kwargs = _gen_kwargs(self.options.gen_kwargs)
        if self.options.max_gen_toks:
            self.gen_kwargs["max_gen_toks"] = self.options.max_gen_toks
        if self.options.apply_chat_template and not getattr(self.ctx.tokenizer, "chat_template", None):
            raise UserError(
                f"--apply-chat-template: {self.ctx.run_config.model}'s tokenizer has no chat template: leave it off"
            )

    def data_digest(self) -> str | None:
        """The local task folder by content (its YAMLs and data files): an edited task is another run."""
        if not self.options.include_path:
            return None
        digest = hashlib.sha256()
        root = Path(self.options.include_path)
        for file in sorted(f for f in root.rglob("*") if f.is_file()):
            digest.update(str(file.relative_to(root)).encode() + b"\0" + file.read_bytes())
        return digest.hexdigest()[:16]

    def cells(self) -> list[Cell]:
        """(method, task), and the length too for a task whose samples are made per length (RULER): one
        evaluation per length, so --limit counts samples per length and a run resumes per length."""
        cells = []
        for m in self.ctx.methods:
            for t in self.task_names:
                for n in self.ctx.lengths if self.styles[t] else [None]:
                    key = {"method": m.label, "task": t} | ({"length": n} if n else {})
                    cells.append(Cell(key, m, None, n or 0))
        return cells

    def run_cell(self, cell) -> dict:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        from lminf_eval.harness.lmeval_model import context_limit

        ctx, options = self.ctx, self.options
        lengths = [cell.key["length"]] if "length" in cell.key else ctx.lengths
        asked = f"{lengths[0] // 1024}k" if self.styles[cell.key["task"]] == "babilong" else lengths
        if str(asked) not in self.managers:  # RULER sizes its haystacks with the model's own tokenizer
            tokenizer_dir = ctx.run.path / "tokenizer"
            if not tokenizer_dir.exists():
                ctx.tokenizer.save_pretrained(tokenizer_dir)
            metadata = {"max_seq_lengths": asked, "tokenizer": str(tokenizer_dir)}
            self.managers[str(asked)] = TaskManager(include_path=options.include_path, metadata=metadata)
        # the runner has applied the method
        lm = HFLM(
            pretrained=ctx.model,
            tokenizer=ctx.tokenizer,
            batch_size=options.batch_size,
            device=str(ctx.device),
            max_length=context_limit(cell.method, ctx.l_pre, options.max_length or None),
        )
        try:
            out = simple_evaluate(
                model=lm,
                tasks=[cell.key["task"]],
                num_fewshot=None if options.num_fewshot < 0 else options.num_fewshot,
                limit=options.limit or None,
                gen_kwargs=self.gen_kwargs or None,
                apply_chat_template=options.apply_chat_template,
                fewshot_as_multiturn=options.apply_chat_template,
                log_samples=options.log_samples,
                bootstrap_iters=1000,
                task_manager=self.managers[str(asked)],
                random_seed=ctx.run_config.seed,
                numpy_random_seed=ctx.run_config.seed,
                torch_random_seed=ctx.run_config.seed,
                fewshot_random_seed=ctx.run_config.seed,
            )
        except FileNotFoundError as err:  # (a local task's data file)
            missing = err.filename or str(err).splitlines()[0][:200]
            raise UserError(f"lm-eval task {cell.key['task']}: missing data ({missing}): fix its data_files") from None
        if options.log_samples:
            folder = ctx.run.path / "lm-eval-samples"
            folder.mkdir(exist_ok=True)
            for task, samples in out.pop("samples").items():
                name = f"{slug(cell.key['method'])}__{task}" + (f"__{lengths[0]}" if "length" in cell.key else "")
                name += ".jsonl"
                (folder / name).write_text("".join(json.dumps(s, default=str) + "\n" for s in samples))
        keep = ("results", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples")
        return {"lm_eval": json.loads(json.dumps({k: out.get(k) for k in keep}, default=str))}

    def summarize(self, rows):
        scores: dict[str, dict] = {}  # lm-eval task -> {(method, metric): value}
        for r in ok_rows(rows):
            for task, metrics in r["lm_eval"]["results"].items():
                for name, value in metrics.items():
                    metric = _metric(name, value, [r["cell"]["length"]] if "length" in r["cell"] else self.ctx.lengths)
                    if metric is not None:
                        scores.setdefault(task, {})[r["cell"]["method"], metric] = _with_stderr(name, value, metrics)
        tables = {}
        for task, values in scores.items():
            columns = list(dict.fromkeys(metric for _, metric in values))
            tables[task] = method_table(values, self.labels, columns)
        metrics = {"results": {}, "configs": {}}  # lm-eval's own, per method and task
        for r in ok_rows(rows):
            task = r["cell"]["task"] + (f" {r['cell']['length']}" if "length" in r["cell"] else "")
            metrics["results"].setdefault(r["cell"]["method"], {})[task] = r["lm_eval"]["results"]
            metrics["configs"][task] = r["lm_eval"]["configs"]
        return metrics, tables


def _with_stderr(name: str, value: float, metrics: dict) -> float:
    """lm-eval's value of `name` ("acc,none") with its standard error ("acc_stderr,none") when lm-eval gives one
    (a number: RULER's per-length scores give "N/A")."""
    metric, _, filt = name.partition(",")
    stderr = metrics.get(f"{metric}_stderr,{filt}")
    if isinstance(stderr, (int, float)) and not isinstance(stderr, bool) and math.isfinite(stderr):
        return Estimate(value, stderr=float(stderr))
    return value


def _require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError(INSTALL_LM_EVAL) from None


def _gen_kwargs(text: str | None) -> dict:
    """`--gen-kwargs do_sample=true,temperature=0.7` as lm-eval reads it (values: numbers, true/false, text)."""
    from lm_eval.utils import handle_arg_string

    out = {}
    for part in filter(None, (text or "").split(",")):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise UserError(f"--gen-kwargs takes key=value pairs (do_sample=true,temperature=0.7), got {part!r}")
        out[key.strip()] = handle_arg_string(value.strip())
    return out


def _length_style(index: dict, name: str) -> str | None:
    """How a task (or any task of a group or tag) takes `max_seq_lengths`: "ruler" (token counts, one
    metric per length, e.g. "4096"), "babilong" (a dataset config such as "4k"), or None (it does not)."""
    entry = index.get(name)
    cfg = (entry.cfg if entry else None) or {}
    if name.startswith("babilong"):
        return "babilong"
    if any(str(m.get("metric", "")).isdigit() for m in cfg.get("metric_list") or []):
        return "ruler"
    subtasks = cfg.get("task") if isinstance(cfg.get("task"), list) else []
    if entry is not None and str(entry.kind).endswith("TAG"):
        subtasks = [n for n, e in index.items() if name in (e.tags or ())]
    styles = {_length_style(index, t) for t in subtasks if isinstance(t, str) and t != name}
    return next((s for s in ("ruler", "babilong") if s in styles), None)


def _metric(name: str, value, lengths: list[int]) -> str | None:
    """The table column of one entry of lm-eval's results ("acc,none" -> "acc"; a RULER length that was not
    asked for, stderr, aliases and sample counts -> None)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or "_stderr" in name or "," not in name:
        return None
    metric, filt = name.split(",", 1)
    if metric.isdigit() and int(metric) not in lengths:  # RULER lists every length it knows (-1: not run)
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    return metric if filt == "none" else f"{metric} ({filt})"
