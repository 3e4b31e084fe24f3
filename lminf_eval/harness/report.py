"""`lminf-eval report`: paper-style tables from results folders (methods as rows, lengths as columns),
one table per command, dataset and metric; runs of several models stack their rows. Each number keeps its
95% interval (or lm-eval's standard error) where the run recorded one."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from .schema import Results, Table


def load_run(path: Path) -> Results:
    file = path / "results.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{path} holds no results.json: pass a folder written by an lminf-eval command")
    try:
        return Results.from_json(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        message = f"{file} is not a complete results.json (cut short?): rerun the command with --resume"
        raise UserError(message) from None
    except ValueError as err:  # (a hand-edited file: what is wrong with it)
        raise UserError(f"{file} is not a readable results.json ({err}): rerun the command with --resume") from None


def corpus(run: Results) -> str | None:
    """The corpus a run's numbers come from: none for a task that makes its own inputs (passkey, timing), also
    in folders written when every command still recorded the default --dataset."""
    from .. import tasks  # noqa: F401  (registers the built-in tasks)
    from .task import TASKS

    task_type = TASKS.get(run.command)
    return None if task_type is not None and "dataset" in task_type.ignores else run.dataset


def documents(run: Results) -> Table | None:
    """Documents behind each (method, length) number, where the task records them (ppl)."""
    counts = {
        (label, length): cell["docs"]
        for label, by_length in run.metrics.items()
        if isinstance(by_length, dict)
        for length, cell in by_length.items()
        if isinstance(cell, dict) and "docs" in cell
    }
    if not counts:
        return None
    labels = list(dict.fromkeys(label for label, _ in counts))
    columns = list(dict.fromkeys(length for _, length in counts))  # in the run's order, not sorted as text
    return Table(labels, columns, [[counts.get((label, c)) for c in columns] for label in labels])


def status_line(path: Path, run: Results, docs: Table | None) -> str:
    """How complete a run is: its status, finished of planned cells, out-of-memory cells, documents per cell."""
    cells = run.cells
    planned = f" of {cells.planned}" if cells.planned is not None else ""
    total = "?" if cells.total is None else cells.total
    line = f"- {path}: {run.status}, {total}{planned} cells, {cells.oom} OOM"
    if docs is not None:
        seen = {n for row in docs.data for n in row if n is not None}
        low, high = min(seen), max(seen)
        line += f", documents per cell: {low}" if low == high else f", documents per cell: {low} to {high} (table docs)"
    return line


def stacked(tables: list[Table]) -> Table:
    """Tables of several runs one under the other (the columns of the first, then any new ones)."""
    columns = list(dict.fromkeys(c for t in tables for c in t.columns))

    def matrix(part: str) -> list[list] | None:
        if all(getattr(t, part) is None for t in tables):
            return None
        rows = []
        for t in tables:
            m, at = getattr(t, part), {c: j for j, c in enumerate(t.columns)}
            rows += [[m[i][at[c]] if m is not None and c in at else None for c in columns] for i in range(len(t.index))]
        return rows

    index = [label for t in tables for label in t.index]
    return Table(index, columns, matrix("data"), "method", matrix("lo"), matrix("hi"), matrix("stderr"))


def build_report(paths: list[Path]) -> str:
    groups: dict[tuple, list[Table]] = {}
    statuses = []
    for path in paths:
        run = load_run(path)
        docs = documents(run)
        statuses.append(status_line(path, run, docs))
        tables = dict(run.tables)
        if docs is not None and len({n for row in docs.data for n in row}) > 1:  # cells rest on different counts
            tables["docs"] = docs
        for name, table in tables.items():
            labels = [f"{run.model} {label}" if len(paths) > 1 else label for label in table.index]
            groups.setdefault((run.command, corpus(run), name), []).append(table.with_labels(labels))
    if not groups:
        raise UserError("no tables found in the given results folders")
    parts = ["\n".join(statuses)]
    for (command, dataset, name), tables in groups.items():
        source = f" ({dataset})" if dataset else ""
        parts.append(f"### {command}: {name}{source}\n\n{stacked(tables).markdown()}")
    return "\n\n".join(parts)
