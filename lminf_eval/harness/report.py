"""`lminf-eval report`: paper-style tables from results folders (methods as rows, lengths as columns),
one table per command, dataset and metric; runs of several models stack their rows."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ..errors import UserError
from .results import to_markdown


def load_run(path: Path) -> dict:
    file = path / "results.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{path} holds no results.json: pass a folder written by an lminf-eval command")
    try:
        run = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        run = None
    if not isinstance(run, dict) or "config" not in run:
        raise UserError(f"{file} is not a complete results.json (cut short?): rerun the command with --resume")
    return run


def documents(run: dict) -> pd.DataFrame | None:
    """Documents behind each (method, length) number, where the task records them (ppl)."""
    counts = {
        (label, length): cell["docs"]
        for label, by_length in run.get("metrics", {}).items()
        if isinstance(by_length, dict)
        for length, cell in by_length.items()
        if isinstance(cell, dict) and "docs" in cell
    }
    if not counts:
        return None
    columns = list(dict.fromkeys(length for _, length in counts))  # in the run's order, not sorted as text
    return pd.Series(counts).unstack()[columns].rename_axis(index="method")


def status_line(path: Path, run: dict, docs: pd.DataFrame | None) -> str:
    """How complete a run is: its status, finished of planned cells, out-of-memory cells, documents per cell."""
    cells = run.get("cells", {})
    planned = f" of {cells['planned']}" if "planned" in cells else ""
    line = f"- {path}: {run.get('status', '?')}, {cells.get('total', '?')}{planned} cells, {cells.get('oom', 0)} OOM"
    if docs is not None:
        low, high = int(docs.min().min()), int(docs.max().max())
        line += f", documents per cell: {low}" if low == high else f", documents per cell: {low} to {high} (table docs)"
    return line


def build_report(paths: list[Path]) -> str:
    groups: dict[tuple, list[pd.DataFrame]] = {}
    statuses = []
    for path in paths:
        run = load_run(path)
        docs = documents(run)
        statuses.append(status_line(path, run, docs))
        config = run["config"]
        tables = {
            n: pd.DataFrame(t["data"], index=t["index"], columns=t["columns"]) for n, t in run.get("tables", {}).items()
        }
        if docs is not None and docs.stack().nunique() > 1:  # cells rest on different document counts: show them
            tables["docs"] = docs
        for name, df in tables.items():
            df.index = [f"{config['model']} {label}" if len(paths) > 1 else label for label in df.index]
            df.index.name = "method"
            groups.setdefault((run["command"], config["dataset"], name), []).append(df)
    if not groups:
        raise UserError("no tables found in the given results folders")
    parts = ["\n".join(statuses)]
    for (command, dataset, name), frames in groups.items():
        parts.append(f"### {command}: {name} ({dataset})\n\n{to_markdown(pd.concat(frames))}")
    return "\n\n".join(parts)
