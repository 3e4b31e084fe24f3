"""The loop every task shares: cells (method x document x length ...) run one by one, each written as it
finishes; Ctrl-C and out-of-memory keep what finished; --resume skips it; ranks split the cells."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .config import RunConfig, parse_lengths
from .data import check_dataset
from .errors import UserError
from .methods import Method, applied, parse_methods
from .models import load_model, pretraining_length_for
from .patch import pretraining_length
from .results import RunDir, cell_id, default_output_dir, format_number, git_hash, latest_run, versions

console = Console(stderr=True)


@dataclass
class Cell:
    key: dict  # what identifies the result (method label, document, length, ...), JSON-serialisable
    method: Method
    data: Any = None  # whatever the task needs to run it
    tokens: int = 0  # for the tokens/s readout


@dataclass
class Context:
    cfg: RunConfig
    model: Any
    tokenizer: Any
    device: torch.device
    l_pre: int
    lengths: list[int]
    methods: list[Method]
    run: RunDir
    defaults: dict = field(default_factory=dict)  # LM-Infinite settings shared by all methods
    extra: dict = field(default_factory=dict)  # task scratch (documents, ...)


def distributed() -> tuple[int, int]:
    """(rank, world) under `accelerate launch`; (0, 1) otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    from accelerate import PartialState

    state = PartialState()
    return state.process_index, state.num_processes


def barrier(world: int) -> None:
    if world > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def shared_output_dir(cfg: RunConfig, world: int) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir)
    if cfg.resume:
        found = latest_run(cfg.command, cfg.model)
        if found is None:
            raise UserError(f"--resume found no earlier {cfg.command} run of {cfg.model}: pass --output-dir")
        return found
    path = default_output_dir(cfg.command, cfg.model)
    if world > 1:  # every rank must write into rank 0's folder
        from accelerate.utils import broadcast_object_list

        path = Path(broadcast_object_list([str(path)])[0])
    return path


def resolve_device(cfg: RunConfig) -> tuple[torch.device, str]:
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA device is visible: use --device cpu")
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    if dtype not in ("float32", "float16", "bfloat16"):
        raise UserError(f"unknown --dtype {cfg.dtype!r}: use auto, float32, float16 or bfloat16")
    return torch.device(device), dtype


def is_oom(err: BaseException) -> bool:
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(err, RuntimeError) and any(
        s in str(err) for s in ("out of memory", "can't allocate memory", "not enough memory")
    )


def execute(task, cfg: RunConfig) -> Path:
    rank, world = distributed()
    parse_methods(cfg.method)  # fail fast on a typo, before a model loads
    check_dataset(cfg.dataset, cfg.text_field, cfg.split)
    device, dtype = resolve_device(cfg)
    out = shared_output_dir(cfg, world)
    run = RunDir(out, rank, world)
    if not cfg.resume and rank == 0 and any(out.glob("samples*.jsonl")):
        raise UserError(f"{out} already holds results: pass --resume to continue it, or another --output-dir")
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(cfg.model, dtype, str(device), cfg.device_map)
    l_pre = cfg.pretraining_length or pretraining_length_for(cfg.model) or pretraining_length(model.config)
    if not l_pre:
        raise UserError(f"{cfg.model} config has no pretraining length: pass --pretraining-length")
    ctx = Context(
        cfg, model, tokenizer, device, l_pre, parse_lengths(cfg.lengths, l_pre), parse_methods(cfg.method), run
    )
    ctx.defaults = {
        "n_global": cfg.n_global if cfg.n_global is not None else task.default_n_global,
        "n_local": cfg.n_local,
        "limit_distance": cfg.limit_distance,
        "top_k": cfg.top_k,
        "top_k_from_layer": cfg.top_k_from_layer,
        "top_k_distance": cfg.top_k_distance,
    }
    for method in ctx.methods:  # bad settings or an unsupported model fail now, not after hours of vanilla
        if method.patched:
            with applied(model, method, ctx.defaults, l_pre):
                pass
    task.prepare(ctx)
    cells = task.cells(ctx)
    done = run.finished() if cfg.resume else set()
    mine = [c for i, c in enumerate(cells) if i % world == rank and cell_id(c.key) not in done]
    started = time.time()
    interrupted = False
    try:
        _run_cells(task, ctx, mine, len(cells), len(cells) - len(mine) if world == 1 else 0)
    except KeyboardInterrupt:
        interrupted = True
    barrier(world)
    if rank == 0:
        if world > 1:
            run.merge_ranks()
        _summarize(task, ctx, started, "interrupted" if interrupted else "complete")
    if interrupted:
        console.print(f"[yellow]interrupted: finished cells are in {out}; rerun with --resume --output-dir {out}")
        raise KeyboardInterrupt
    return out


def _run_cells(task, ctx: Context, cells: list[Cell], total: int, skipped: int) -> None:
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
            with applied(ctx.model, method, ctx.defaults, ctx.l_pre):
                for cell in group:
                    label = " ".join(f"{v}" for k, v in cell.key.items() if k != "method")
                    progress.update(bar, description=f"{task.name} {method.label} {label}")
                    start = time.time()
                    try:
                        result = task.run_cell(ctx, cell)
                        ctx.run.record(cell.key, "ok", time.time() - start, result)
                    except Exception as err:
                        if not is_oom(err):
                            raise
                        if torch.cuda.is_available():
                            torch.cuda.empty_cache()
                        ctx.run.record(cell.key, "oom", time.time() - start, {"error": str(err).splitlines()[0][:200]})
                        console.print(f"[red]OOM[/red] {method.label} {label}: recorded, continuing")
                    tokens += cell.tokens
                    progress.update(bar, advance=1, rate=f"{tokens / max(time.time() - t0, 1e-9):,.0f} tok/s")


def _summarize(task, ctx: Context, started: float, status: str) -> None:
    rows = ctx.run.read_samples()
    metrics, tables = task.summarize(ctx, rows)
    summary = {
        "command": ctx.cfg.command,
        "status": status,
        "config": ctx.cfg.to_dict(),
        "resolved": {
            "pretraining_length": ctx.l_pre,
            "lengths": ctx.lengths,
            "methods": [
                {"label": m.label, "settings": m.settings(ctx.defaults) if m.patched else None} for m in ctx.methods
            ],
        },
        "versions": versions(),
        "git": git_hash(),
        "device": str(ctx.device) + (f" ({torch.cuda.get_device_name()})" if ctx.device.type == "cuda" else ""),
        "wall_seconds": round(time.time() - started, 2),
        "cells": {"total": len(rows), "oom": sum(r["status"] == "oom" for r in rows)},
        "metrics": metrics,
    }
    ctx.run.write_summary(summary, tables)
    if rows:
        task.plots(ctx, rows)
    for name, df in tables.items():
        print_table(name, df)
    console.print(f"results: {ctx.run.path}")


def print_table(name: str, df) -> None:
    table = Table(title=name)
    table.add_column(df.index.name or "")
    for col in df.columns:
        table.add_column(str(col), justify="right")
    for idx, row in df.iterrows():
        table.add_row(str(idx), *[format_number(v) for v in row.tolist()])
    Console().print(table)
