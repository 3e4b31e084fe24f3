"""`lminf-eval report`: paper-style tables from results folders (methods as rows, lengths as columns),
one table per command, dataset and metric; runs of several models stack their rows."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .errors import UserError
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


def status_line(path: Path, run: dict) -> str:
    """How complete a run is: its status, finished of planned cells, out-of-memory cells."""
    cells = run.get("cells", {})
    planned = f" of {cells['planned']}" if "planned" in cells else ""
    return f"- {path}: {run.get('status', '?')}, {cells.get('total', '?')}{planned} cells, {cells.get('oom', 0)} OOM"


def build_report(paths: list[Path]) -> str:
    groups: dict[tuple, list[pd.DataFrame]] = {}
    statuses = []
    for path in paths:
        run = load_run(path)
        statuses.append(status_line(path, run))
        config = run["config"]
        for name, split in run.get("tables", {}).items():
            df = pd.DataFrame(split["data"], index=split["index"], columns=split["columns"])
            df.index = [f"{config['model']} {label}" if len(paths) > 1 else label for label in df.index]
            df.index.name = "method"
            groups.setdefault((run["command"], config["dataset"], name), []).append(df)
    if not groups:
        raise UserError("no tables found in the given results folders")
    parts = ["\n".join(statuses)]
    for (command, dataset, name), frames in groups.items():
        parts.append(f"### {command}: {name} ({dataset})\n\n{to_markdown(pd.concat(frames))}")
    return "\n\n".join(parts)
