"""Results are data: per-cell JSONL written as cells finish, then results.json, CSV and Markdown tables."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from ..errors import UserError
from .console import console
from .models import REPO_ROOT
from .schema import Results, format_number  # noqa: F401  (format_number: the runner's terminal tables)

if TYPE_CHECKING:
    from .config import RunConfig


def cell_id(key: dict) -> str:
    return json.dumps(key, sort_keys=True)


def _lock(path: Path):
    """An exclusive lock on the folder, held until the process ends (or the returned file is closed)."""
    import fcntl

    fh = (path / ".lock").open("w")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        message = f"another lminf-eval run is writing to {path}: wait for it, or use another --output-dir"
        raise UserError(message) from None
    return fh


def _cut_torn_tail(file: Path) -> None:
    """Drop a last line that has no newline: a write cut short by a kill or a full disk."""
    data = file.read_bytes()
    if data and not data.endswith(b"\n"):
        with file.open("r+b") as fh:
            fh.truncate(data.rfind(b"\n") + 1)
        console.print(f"[yellow]{file}: dropped a torn last line (a write cut short); that cell runs again")


def _write_whole(file: Path, text: str) -> None:
    """Write through a temporary file and a rename: a reader (or a kill) never sees half a file."""
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, file)


def git_hash() -> str | None:
    """The commit (+dirty) of the clone the code runs from; None when installed from a wheel."""
    if not (REPO_ROOT / "pyproject.toml").is_file():
        return None
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

    from .. import __version__

    return {
        "lminf_eval": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "python": platform.python_version(),
    }


def model_folder(model: str) -> str:
    """A --model value as a folder name: a local directory or .gguf file by its last component (`tiny-rope`, not
    `_tmp_..._tiny-rope`), a registry name or hub id as it reads (`org_name`). Runs stay apart by their
    timestamped folder, and a resume matches its run by the fingerprint (the full path), not by this name."""
    path = Path(model)
    name = path.name if (path.suffix == ".gguf" or path.exists()) and path.name else model.replace("/", "_")
    return name.removesuffix(".gguf")


def default_output_dir(command: str, model: str) -> Path:
    safe = model_folder(model)
    # (the process id keeps two runs started in the same second apart)
    return Path("results") / command / safe / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def earlier_runs(command: str, model: str) -> list[Path]:
    """Folders of earlier runs of this command and model that hold samples, newest first."""
    parent = default_output_dir(command, model).parent
    return sorted((p for p in parent.glob("*") if any(p.glob("samples*.jsonl"))), reverse=True)


def differences(recorded: dict, now: dict) -> list[str]:
    """Names of the fingerprint entries that differ between a recorded run and this one."""
    return sorted(k for k in recorded.keys() | now.keys() if recorded.get(k) != now.get(k))


@dataclass
class RunDir:
    """A run's folder and its life: picked, created when the first cell is about to start, checked, locked
    while the run lives, with the fingerprint of what it computes (`run.json`) and one line per finished
    cell, unlocked at the end (`opened`)."""

    path: Path | None  # None: a plain --resume, which continues the earlier run with this fingerprint
    rank: int = 0
    world: int = 1
    lock: object = None

    @property
    def samples_file(self) -> Path:
        return self.path / ("samples.jsonl" if self.world == 1 else f"samples.rank{self.rank}.jsonl")

    def fingerprint(self) -> dict | None:
        """What run.json records of the run in this folder; None when it is missing or unreadable."""
        try:
            recorded = json.loads((self.path / "run.json").read_text())["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return recorded if isinstance(recorded, dict) else None

    def open(self, fingerprint: dict, resume: bool) -> None:
        """Create and lock the folder; refuse a folder of another run (or any results without --resume);
        record the fingerprint; cut a torn last line (a write cut short) so the next one starts clean."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            if self.rank == 0:
                self.lock = _lock(self.path)
        except OSError as err:
            raise UserError(f"cannot write to {self.path} ({err.strerror}): pass another --output-dir") from None
        if self.rank != 0:
            return
        try:
            self._check(fingerprint, resume)
        except UserError:
            self.close()
            raise
        try:
            _write_whole(self.path / "run.json", json.dumps({"fingerprint": fingerprint}, indent=1, default=str))
        except OSError as err:
            self.close()
            raise UserError(
                f"cannot write to {self.path} ({err.strerror}): free space, or pass another --output-dir"
            ) from None
        for file in self.path.glob("samples*.jsonl"):
            _cut_torn_tail(file)

    def refuse_results(self, resume: bool) -> bool:
        """Whether the folder holds results; refused (one line) unless the run resumes."""
        held = any(self.path.glob("samples*.jsonl"))
        if held and not resume:
            raise UserError(f"{self.path} already holds results: pass --resume to continue it, or another --output-dir")
        return held

    def _check(self, fingerprint: dict, resume: bool) -> None:
        if not self.refuse_results(resume):
            return
        recorded = self.fingerprint()
        if recorded is None:  # results with no record of what computed them cannot be continued
            raise UserError(f"--resume: {self.path} holds results but no readable run.json: pass another --output-dir")
        diff = differences(recorded, fingerprint)
        if diff:
            raise UserError(
                f"--resume: {self.path} holds a run with another {', '.join(diff)}: pass another --output-dir"
            )

    @contextmanager
    def opened(self, fingerprint: dict, run_config: RunConfig, barrier: Callable[[], None]) -> Iterator[RunDir]:
        """The folder for the run's life: picked when not given (the newest earlier run of this command and
        model with this fingerprint), then opened by rank 0 first (`open`: created, checked, locked, the
        fingerprint recorded), by the other ranks once it has (`barrier`); unlocked when the block ends."""
        if self.path is None:
            self.path = self.resumable(run_config.command, run_config.model, fingerprint)
        if self.rank == 0:  # rank 0 checks and locks the folder before any other rank writes into it
            self.open(fingerprint, run_config.resume)
        try:
            barrier()
            if self.rank != 0:
                self.open(fingerprint, run_config.resume)
            yield self
        finally:
            self.close()

    @staticmethod
    def resumable(command: str, model: str, fingerprint: dict) -> Path:
        """The newest earlier run of this command and model whose fingerprint is this run's."""
        runs = earlier_runs(command, model)
        for path in runs:
            if RunDir(path).fingerprint() == fingerprint:
                return path
        what = f"{command} run of {model}" + (" with these settings" if runs else "")
        raise UserError(f"--resume found no earlier {what}: pass --output-dir")

    def close(self) -> None:
        """Release the folder's lock."""
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    def read_samples(self) -> list[dict]:
        """Every finished cell once (a later line for the same cell, e.g. a retried OOM, wins)."""
        by_cell, bad = {}, 0
        for file in sorted(self.path.glob("samples*.jsonl")):
            for line in file.read_text().splitlines():
                if line.strip():
                    try:
                        row = json.loads(line)
                        by_cell[cell_id(row["cell"])] = row
                    except (json.JSONDecodeError, KeyError, TypeError):
                        bad += 1
        if bad:
            console.print(f"[yellow]{self.path}: {bad} unreadable line(s) in samples; those cells count as not run")
        return list(by_cell.values())

    def record(
        self, key: dict, status: str, seconds: float, result: dict | None = None, paths: dict | None = None
    ) -> None:
        """One line, written in one call and flushed to disk before the next cell starts. `paths`: the
        attention paths the cell ran (calls per path, `dispatch.paths_run`)."""
        row = {"cell": key, "status": status, "seconds": round(seconds, 3), **(result or {})}
        if paths:
            row["attention_paths"] = paths
        if self.world > 1:
            row["rank"] = self.rank
        try:
            with self.samples_file.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as err:
            raise UserError(
                f"cannot write to {self.path} ({err.strerror}): finished cells are kept; free space and --resume"
            ) from None

    def merge_ranks(self) -> None:
        """Rank 0, after every rank finished: one samples.jsonl, as a single-process run writes."""
        rows = self.read_samples()
        (self.path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        for file in self.path.glob("samples.rank*.jsonl"):
            file.unlink()

    def write_summary(self, summary: Results, tables: dict[str, pd.DataFrame]) -> None:
        """Per table: NAME.csv (the values), NAME_intervals.csv (95% intervals or standard errors, where the
        task gives them), NAME.md (both); then results.json."""
        for name, df in tables.items():
            df.to_csv(self.path / f"{name}.csv")
            table = summary.tables[name]
            intervals = table.interval_frame()
            if intervals is not None:
                intervals.to_csv(self.path / f"{name}_intervals.csv")
            (self.path / f"{name}.md").write_text(table.markdown() + "\n")
        _write_whole(self.path / "results.json", summary.to_json())
