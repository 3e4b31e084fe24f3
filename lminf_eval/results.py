"""Results are data: per-cell JSONL written as cells finish, then results.json, CSV and Markdown tables."""

from __future__ import annotations

import json
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .models import REPO_ROOT


def cell_id(key: dict) -> str:
    return json.dumps(key, sort_keys=True)


def git_hash() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    import datasets
    import torch
    import transformers

    from . import __version__

    return {
        "lminf_eval": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "python": platform.python_version(),
    }


def default_output_dir(command: str, model: str) -> Path:
    safe = model.replace("/", "_").replace(".gguf", "")
    return Path("results") / command / safe / time.strftime("%Y%m%d-%H%M%S")


def latest_run(command: str, model: str) -> Path | None:
    parent = default_output_dir(command, model).parent
    runs = sorted(p for p in parent.glob("*") if p.is_dir()) if parent.exists() else []
    return runs[-1] if runs else None


@dataclass
class RunDir:
    path: Path
    rank: int = 0
    world: int = 1

    def __post_init__(self):
        self.path.mkdir(parents=True, exist_ok=True)

    @property
    def samples_file(self) -> Path:
        return self.path / ("samples.jsonl" if self.world == 1 else f"samples.rank{self.rank}.jsonl")

    def read_samples(self) -> list[dict]:
        rows = []
        for file in sorted(self.path.glob("samples*.jsonl")):
            for line in file.read_text().splitlines():
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass  # a line cut short by a kill: that cell simply runs again on --resume
        seen, unique = set(), []
        for row in rows:
            cid = cell_id(row["cell"])
            if cid not in seen:
                seen.add(cid)
                unique.append(row)
        return unique

    def finished(self) -> set[str]:
        return {cell_id(row["cell"]) for row in self.read_samples()}

    def record(self, key: dict, status: str, seconds: float, result: dict | None = None) -> None:
        row = {"cell": key, "status": status, "seconds": round(seconds, 3), **(result or {})}
        with self.samples_file.open("a") as fh:
            fh.write(json.dumps(row) + "\n")

    def merge_ranks(self) -> None:
        """Rank 0, after every rank finished: one samples.jsonl, as a single-process run writes."""
        rows = self.read_samples()
        (self.path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        for file in self.path.glob("samples.rank*.jsonl"):
            file.unlink()

    def write_summary(self, summary: dict, tables: dict[str, pd.DataFrame]) -> None:
        for name, df in tables.items():
            df.to_csv(self.path / f"{name}.csv")
            (self.path / f"{name}.md").write_text(to_markdown(df) + "\n")
        summary["tables"] = {name: json.loads(df.to_json(orient="split")) for name, df in tables.items()}
        (self.path / "results.json").write_text(json.dumps(summary, indent=1, default=str))


def format_number(v) -> str:
    """Perplexities span 1 to 1e5: two decimals in the normal range, 3 significant digits outside it."""
    if isinstance(v, float):
        if v != v:
            return "-"
        return f"{v:.3g}" if abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-2) else f"{v:.2f}"
    return str(v)


def to_markdown(df: pd.DataFrame) -> str:
    """A pipe table without the optional `tabulate` dependency."""
    head = [df.index.name or ""] + [str(c) for c in df.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for idx, row in df.iterrows():
        lines.append("| " + " | ".join([str(idx)] + [format_number(v) for v in row.tolist()]) + " |")
    return "\n".join(lines)
