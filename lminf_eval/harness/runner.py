"""The loop every task shares: cells (method x document x length ...) run one by one, each written as it
finishes; Ctrl-C and out-of-memory keep what finished; --resume skips it; ranks split the cells."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from itertools import groupby
from pathlib import Path
from types import SimpleNamespace

import torch
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..attention.dispatch import paths_run
from ..errors import UserError
from ..methods import Method, applied, parse_methods
from ..patch import pretraining_length as config_pretraining_length
from ..rope_scaling import reset_dynamic_rope
from ..settings import Settings
from .config import RunConfig, parse_lengths
from .data import check_dataset, iter_texts, resolve_dataset
from .models import load_model, model_source, pretraining_length_for, weights_digest
from .results import RunDir, cell_id, default_output_dir, format_number, git_hash, versions
from .schema import Cells, MethodSettings, Resolved, Results
from .schema import Table as ResultsTable
from .task import Cell, Context, Task, console


def distributed(device: str) -> tuple[int, int]:
    """(rank, world) under `torchrun` / `accelerate launch`; (0, 1) otherwise. On CPU the processes form a
    gloo group (without `cpu=True` each would run every cell alone)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu" or (device == "auto" and not torch.cuda.is_available()))
    return state.process_index, state.num_processes


def barrier(world: int) -> None:
    if world > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def chosen_output_dir(run_config: RunConfig, world: int) -> Path | None:
    """--output-dir, or a new timestamped folder; None for a plain --resume, which picks its folder once the
    run's fingerprint is known (`RunDir.opened`)."""
    if run_config.output_dir:
        return Path(run_config.output_dir)
    if run_config.resume:
        return None
    path = default_output_dir(run_config.command, run_config.model)
    if world > 1:  # every rank must write into rank 0's folder
        from accelerate.utils import broadcast_object_list

        path = Path(broadcast_object_list([str(path)])[0])
    return path


def resolve_device(device: str, dtype: str) -> tuple[torch.device, str]:
    """`--device` and `--dtype` with `auto` resolved (cuda and bfloat16 when a GPU is visible)."""
    asked_dtype = dtype
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", device):
        raise UserError(f"unsupported --device {device!r}: use auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA device is visible: use --device cpu")
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if dtype not in ("float32", "float16", "bfloat16"):
        raise UserError(f"unknown --dtype {asked_dtype!r}: use auto, float32, float16 or bfloat16")
    return torch.device(device), dtype


def is_oom(err: BaseException) -> bool:
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(err, RuntimeError) and any(
        s in str(err) for s in ("out of memory", "can't allocate memory", "not enough memory")
    )


@dataclass(frozen=True)
class RunSetup:
    """What a run computes, resolved from its flags (`resolve_run`)."""

    model: str | None  # kind:source (`models.model_source`); None for a model object
    methods: list[Method]
    l_pre: int | None  # None: only the loaded model can say (a GGUF, a hub model's config in a dry run)
    lengths: list[int] | None  # None when L_pre is not known yet
    settings: dict[str, Settings | None] | None  # method label -> its settings (None: unpatched); None as lengths


def resolve_run(
    model: str | None,
    methods: list[str],
    *,
    pretraining_length: int | None = None,
    config=None,
    lengths: str | list | None = None,
    target_length: int | None = None,
    layers: tuple[dict, ...] = (),
) -> RunSetup:
    """The one place a run's flags become what it computes, for the run, its dry run and the lm-eval model type.
    L_pre: `pretraining_length` (the flag), else the model registry's, else `config`'s (the model's config, or
    a function that reads it, called only when needed). `lengths` (token counts or multiples of L_pre) and
    `layers` (the task's paper defaults, then the run's flags) resolve each method's settings (`Method.settings`),
    sized for the longest length (or `target_length`). A bad value is a UserError."""
    chosen = parse_methods(methods)
    source = ":".join(model_source(model)) if isinstance(model, str) else None
    l_pre = pretraining_length or (pretraining_length_for(model) if isinstance(model, str) else None)
    if not l_pre and config is not None:
        l_pre = config_pretraining_length(config() if callable(config) else config)
    if not l_pre:
        return RunSetup(source, chosen, None, None, None)
    sizes = parse_lengths(lengths, l_pre) if lengths is not None else None
    target = target_length or (max(sizes) if sizes else None)
    settings = {m.label: m.settings(l_pre, target, *layers) for m in chosen}
    return RunSetup(source, chosen, l_pre, sizes, settings)


def resolve_task_run(task_type: type[Task], run_config: RunConfig, config=None) -> RunSetup:
    """`resolve_run` for a task's run: its default lengths and paper settings under the run's flags."""
    return resolve_run(
        run_config.model,
        run_config.method,
        pretraining_length=run_config.pretraining_length,
        config=config,
        lengths=run_config.lengths or task_type.default_lengths,
        layers=(task_type.settings_defaults, run_config.settings),
    )


def execute(task_type: type[Task], run_config: RunConfig) -> Path:
    """Run every cell of `task_type` for `run_config` (resuming if asked), then write results.json and tables.
    Nothing is written before every input has been checked and the first cell is about to start. SIGTERM
    ends the run as Ctrl-C does at any moment of it (`_sigterm_as_interrupt`)."""
    with _sigterm_as_interrupt():
        return _execute(task_type, run_config)


def _execute(task_type: type[Task], run_config: RunConfig) -> Path:
    rank, world = distributed(run_config.device)
    parse_methods(run_config.method)  # fail fast on a typo, before a model loads
    if run_config.dataset is not None:  # (None: a task that makes its own inputs)
        check_dataset(run_config.dataset, run_config.text_field, run_config.split)
    device, dtype = resolve_device(run_config.device, run_config.dtype)
    run = RunDir(chosen_output_dir(run_config, world), rank, world)
    if run.path is not None and rank == 0:  # (checked again under the folder's lock when it opens)
        run.refuse_results(run_config.resume)
    torch.manual_seed(run_config.seed)
    model, tokenizer = load_model(run_config.model, dtype, str(device), run_config.device_map)
    setup = resolve_task_run(task_type, run_config, model.config)
    if not setup.l_pre:
        raise UserError(f"{run_config.model} config has no pretraining length: pass --pretraining-length")
    _try_each_method(model, setup)  # bad settings or an unsupported model fail now, not after hours of vanilla
    ctx = Context(run_config, model, tokenizer, device, setup.l_pre, setup.lengths, setup.methods, setup.settings, run)
    task = task_type(ctx)
    task.prepare()
    cells = task.cells()
    with run.opened(_fingerprint(task, dtype), run_config, lambda: barrier(world)):
        todo = _cells_to_run(task, cells, rank, world)
        started = time.time()
        interrupted = False
        try:
            _run_cells(task, todo, len(cells), len(cells) - len(todo) if world == 1 else 0)
        except KeyboardInterrupt:
            interrupted = True
        with _signals_deferred() as deferred:  # results.json is written whole, whatever arrives meanwhile
            barrier(world)
            if rank == 0:
                if world > 1:
                    run.merge_ranks()
                _summarize(task, cells, started, interrupted)
        interrupted = interrupted or deferred.arrived
    if interrupted:
        out = run.path
        console.print(f"[yellow]interrupted: finished cells are in {out}; rerun with --resume --output-dir {out}")
        raise KeyboardInterrupt
    return run.path


def _try_each_method(model, setup: RunSetup) -> None:
    """Put each patched method on the model and take it off again: its settings are checked against the model."""
    for method in setup.methods:
        if method.patched:
            with applied(model, setup.settings[method.label], setup.l_pre):
                pass


def _cells_to_run(task: Task, cells: list[Cell], rank: int, world: int) -> list[Cell]:
    """This rank's share of the cells, less those a resumed run finished (and, with --keep-oom, those it
    recorded as out of memory)."""
    run_config, done = task.ctx.run_config, set()
    if run_config.resume:
        keep = ("ok", "oom") if run_config.keep_oom else ("ok",)
        done = {cell_id(r["cell"]) for r in _planned_rows(task, cells) if r["status"] in keep}
    return [c for i, c in enumerate(cells) if i % world == rank and cell_id(c.key) not in done]


def dry_run(task_type: type[Task], run_config: RunConfig) -> dict:
    """What a run would do, every argument checked offline and nothing loaded (a profile's dry run): the
    model's source, the dataset, L_pre, the lengths and each method's resolved settings. A hub model's L_pre
    comes from the registry or --pretraining-length (its config is on the hub); a bad value is a UserError."""
    parse_methods(run_config.method)  # (errors in the order the run meets them: methods, model, dataset)
    kind, source = model_source(run_config.model)
    dataset = (
        resolve_dataset(run_config.dataset, run_config.text_field, run_config.split) if run_config.dataset else None
    )
    if dataset is not None and dataset.kind == "local":
        iter_texts(run_config.dataset, dataset)
    setup = resolve_task_run(task_type, run_config, (lambda: _local_config(source)) if kind == "local" else None)
    out = {"command": task_type.name, "model": setup.model, "dataset": dataset and f"{dataset.kind}:{dataset.target}"}
    if not setup.l_pre:  # (a GGUF's L_pre is read when it loads)
        return out | {"pretraining_length": "from the model", "lengths": run_config.lengths, "methods": None}
    settings = {label: _jsonable(s) for label, s in setup.settings.items()}
    return out | {"pretraining_length": setup.l_pre, "lengths": setup.lengths, "methods": settings}


def _local_config(source: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source)


def _fingerprint(task: Task, dtype: str) -> dict:
    """Everything that changes a number: a resumed run must match it (`RunDir.open`)."""
    ctx, run_config = task.ctx, task.ctx.run_config
    return {
        "command": run_config.command,
        "model": run_config.model,
        "weights": weights_digest(ctx.model),
        "dtype": dtype,
        "dataset": [run_config.dataset, run_config.text_field, run_config.split],
        "documents": task.data_digest(),
        "num_docs": run_config.num_docs,
        "min_tokens": run_config.min_tokens,
        "pretraining_length": ctx.l_pre,
        "lengths": ctx.lengths,
        "methods": {label: _jsonable(s) for label, s in ctx.settings.items()},
        "seed": run_config.seed,
        "options": asdict(task.options),
    } | task.fingerprint()


@contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (timeout, Slurm, Kubernetes) ends the run as Ctrl-C does: finished cells kept, resumable. Held
    for the whole run, so no moment of it (model load, cells, summary) dies of the default handler."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _signals_deferred():
    """While results are written, Ctrl-C and SIGTERM are noted instead of raised: the summary (and its status,
    which says what finished) is written whole, then the run ends as interrupted (`.arrived`)."""
    state = SimpleNamespace(arrived=False)
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def note(signum, frame):
        state.arrived = True

    previous = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield state
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_cells(task: Task, cells: list[Cell], total: int, skipped: int) -> None:
    ctx = task.ctx
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[rate]}"),
    ]
    tokens, t0 = 0, time.time()
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task(task.name, total=total, completed=skipped, rate="")
        for method, group in groupby(cells, key=lambda c: c.method):
            with applied(ctx.model, ctx.settings[method.label], ctx.l_pre):
                for batch in task.batches(list(group)):  # (one cell each, unless --batch-size batches them)
                    label = " ".join(f"{v}" for k, v in batch[0].key.items() if k != "method")
                    label += f" (+{len(batch) - 1})" if len(batch) > 1 else ""
                    progress.update(bar, description=f"{task.name} {method.label} {label}")
                    start = time.time()
                    paths_run(reset=True)
                    reset_dynamic_rope(ctx.model)  # (Dynamic NTK: each batch's base from its own length)
                    try:
                        results = task.run_batch(batch)
                        seconds, paths = (time.time() - start) / len(batch), paths_run(reset=True)
                        for cell, result in zip(batch, results, strict=True):  # (a batch's time split evenly)
                            ctx.run.record(cell.key, "ok", seconds, result, paths)
                    except Exception as err:
                        if not is_oom(err):
                            raise
                        if torch.cuda.is_available():
                            torch.cuda.empty_cache()
                        error = {"error": str(err).splitlines()[0][:200]}
                        for cell in batch:
                            ctx.run.record(cell.key, "oom", (time.time() - start) / len(batch), error)
                        console.print(f"[red]OOM[/red] {method.label} {label}: recorded, continuing")
                    tokens += sum(cell.tokens for cell in batch)
                    progress.update(bar, advance=len(batch), rate=f"{tokens / max(time.time() - t0, 1e-9):,.0f} tok/s")


def _summarize(task: Task, cells: list[Cell], started: float, interrupted: bool) -> None:
    """results.json and the tables; "complete" only when every planned cell has a result."""
    ctx = task.ctx
    rows = _planned_rows(task, cells)
    missing = len({cell_id(c.key) for c in cells} - {cell_id(r["cell"]) for r in rows})
    status = "interrupted" if interrupted else ("complete" if not missing else "incomplete")
    metrics, tables = task.summarize(rows)
    summary = Results(
        command=ctx.run_config.command,
        argv=ctx.run_config.argv,
        status=status,
        config=ctx.run_config.to_dict(),
        resolved=Resolved(
            ctx.l_pre, ctx.lengths, [MethodSettings(m.label, _jsonable(ctx.settings[m.label])) for m in ctx.methods]
        ),
        versions=versions(),
        git=git_hash(),
        device=str(ctx.device) + (f" ({torch.cuda.get_device_name()})" if ctx.device.type == "cuda" else ""),
        wall_seconds=round(time.time() - started, 2),
        cells=Cells(len(rows), len(cells), sum(r["status"] == "oom" for r in rows)),
        attention_paths=_paths_by_method(rows),
        metrics=metrics,
        tables={name: ResultsTable.from_frame(df) for name, df in tables.items()},
    )
    try:  # (results.json last: a folder that says "complete" holds every table and plot)
        if rows:
            task.plots(rows)
        ctx.run.write_summary(summary, tables)
    except OSError as err:
        raise UserError(
            f"cannot write results to {ctx.run.path} ({err.strerror}): finished cells are kept; free space and --resume"
        ) from None
    for name, df in tables.items():
        print_table(name, df)
    console.print(f"results: {ctx.run.path}")


def _paths_by_method(rows: list[dict]) -> dict[str, dict[str, int]]:
    """Which attention path ran for each method, over its cells (calls: one per layer per forward)."""
    found: dict[str, Counter] = {}
    for row in rows:
        found.setdefault(str(row["cell"].get("method")), Counter()).update(row.get("attention_paths") or {})
    return {method: dict(paths) for method, paths in found.items() if paths}


def _planned_rows(task: Task, cells: list[Cell]) -> list[dict]:
    """The recorded rows that count: cells of this run's plan, finished with what the task writes (or out of
    memory). Another run's lines and damaged results are left out, with a word; their cells run again."""
    planned = {cell_id(c.key) for c in cells}
    rows, outside, damaged = [], 0, 0
    for row in task.ctx.run.read_samples():
        if cell_id(row["cell"]) not in planned:
            outside += 1
        elif row.get("status") == "oom" or (row.get("status") == "ok" and _holds(row, task.result_fields)):
            rows.append(row)
        else:
            damaged += 1
    if outside:
        console.print(f"[yellow]{task.ctx.run.path}: {outside} recorded cell(s) outside this run's plan, ignored")
    if damaged:
        console.print(f"[yellow]{task.ctx.run.path}: {damaged} recorded cell(s) without a usable result run again")
    return rows


def _holds(row: dict, fields: dict) -> bool:
    return all(isinstance(row.get(name), kind) for name, kind in fields.items())


def _jsonable(settings) -> dict | None:
    """Settings as JSON: infinite lengths as the string "inf"."""
    if settings is None:
        return None
    return {k: ("inf" if v == float("inf") else v) for k, v in asdict(settings).items()}


def print_table(name: str, df) -> None:
    """A results table on the terminal: borderless and tightly padded, so 8 lengths fit in 80 columns."""
    table = Table(title=name, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True, padding=(0, 1))
    table.add_column(df.index.name or "", no_wrap=True)
    for col in df.columns:
        table.add_column(str(col), justify="right", no_wrap=True)
    for idx, row in df.iterrows():
        table.add_row(str(idx), *[format_number(v) for v in row.tolist()])
    Console().print(table)
