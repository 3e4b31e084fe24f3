"""results.json as types: what a run writes (`runner`), and what `report` and scripts/reproduce.py read, in one
place. Older folders (before argv, cell counts or intervals were kept) read through the same defaults here, so a
reader never guesses at a missing key."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from .intervals import Estimate

if TYPE_CHECKING:
    import pandas as pd

Matrix = list[list[Any]]


def format_number(v) -> str:
    """Perplexities span 1 to 1e5: two decimals in the normal range, 3 significant digits outside it."""
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:
            return "-"
        return f"{v:.3g}" if abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-2) else f"{v:.2f}"
    return str(v)


def format_cell(v, lo=None, hi=None, stderr=None) -> str:
    """A number with its interval as `value [lo, hi]`, or with lm-eval's standard error as `value ± stderr`."""
    text = format_number(v)
    if lo is not None and hi is not None:
        return f"{text} [{format_number(lo)}, {format_number(hi)}]"
    if stderr is not None:
        return f"{text} ± {format_number(stderr)}"
    return text


def _number(v):
    """A cell as JSON: a finite number, a marker ("OOM", "NaN"), or None (not run)."""
    if isinstance(v, float):
        return None if math.isnan(v) else float(v)
    if hasattr(v, "item"):  # numpy scalars
        return _number(v.item())
    return v


@dataclass
class Table:
    """Rows (methods) x columns (lengths, metrics); `lo`/`hi` the 95% interval of each cell and `stderr` lm-eval's
    standard error, where known (None elsewhere, or the whole matrix None when no cell has one)."""

    index: list[str]
    columns: list[str]
    data: Matrix
    index_name: str = "method"
    lo: Matrix | None = None
    hi: Matrix | None = None
    stderr: Matrix | None = None

    @classmethod
    def from_frame(cls, df: pd.DataFrame) -> Table:
        """From a task's table, whose cells may be `Estimate`s."""
        cells = [list(row) for row in df.itertuples(index=False, name=None)]

        def part(name: str) -> Matrix | None:
            out = [[getattr(v, name, None) if isinstance(v, Estimate) else None for v in row] for row in cells]
            return out if any(v is not None for row in out for v in row) else None

        return cls(
            index=[str(i) for i in df.index],
            columns=[str(c) for c in df.columns],
            data=[[_number(v) for v in row] for row in cells],
            index_name=df.index.name or "",
            lo=part("lo"),
            hi=part("hi"),
            stderr=part("stderr"),
        )

    def cell(self, i: int, j: int) -> tuple:
        """(value, lo, hi, stderr) of one cell."""
        extra = [m[i][j] if m is not None else None for m in (self.lo, self.hi, self.stderr)]
        return (self.data[i][j], *extra)

    def frame(self) -> pd.DataFrame:
        """The values alone (what the CSV holds), NaN where not run."""
        import pandas as pd

        df = pd.DataFrame(self.data, index=pd.Index(self.index, name=self.index_name), columns=self.columns)
        return df.where(df.notna(), float("nan"))

    def interval_frame(self) -> pd.DataFrame | None:
        """`COLUMN lo` / `COLUMN hi` (and `COLUMN stderr`) beside each other, for the CSV next to the values."""
        import pandas as pd

        parts = {"lo": self.lo, "hi": self.hi, "stderr": self.stderr}
        parts = {k: m for k, m in parts.items() if m is not None}
        if not parts:
            return None
        columns = {f"{c} {k}": [row[j] for row in m] for j, c in enumerate(self.columns) for k, m in parts.items()}
        return pd.DataFrame(columns, index=pd.Index(self.index, name=self.index_name))

    def markdown(self) -> str:
        """A pipe table (without the optional `tabulate` dependency), each number with its interval."""
        head = [self.index_name] + self.columns
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for i, label in enumerate(self.index):
            cells = [format_cell(*self.cell(i, j)) for j in range(len(self.columns))]
            lines.append("| " + " | ".join([label, *cells]) + " |")
        return "\n".join(lines)

    def with_labels(self, index: list[str]) -> Table:
        return Table(index, self.columns, self.data, self.index_name, self.lo, self.hi, self.stderr)

    @classmethod
    def from_dict(cls, d: dict) -> Table:
        """Also the `df.to_json(orient="split")` form that folders written before this schema hold."""
        return cls(
            index=[str(i) for i in d["index"]],
            columns=[str(c) for c in d["columns"]],
            data=d["data"],
            index_name=d.get("index_name") or "method",
            lo=d.get("lo"),
            hi=d.get("hi"),
            stderr=d.get("stderr"),
        )


@dataclass
class Cells:
    """How complete a run is: cells with a result, cells planned, cells out of memory."""

    total: int | None = None
    planned: int | None = None
    oom: int = 0


@dataclass
class MethodSettings:
    label: str
    settings: dict | None  # None: the unmodified model


@dataclass
class Resolved:
    """What the run's flags came to: L_pre, lengths in tokens, each method's settings."""

    pretraining_length: int | None = None
    lengths: list[int] = field(default_factory=list)
    methods: list[MethodSettings] = field(default_factory=list)


@dataclass
class Results:
    """One results.json."""

    command: str
    status: str
    config: dict  # RunConfig.to_dict(): the flags as given and defaulted
    metrics: dict  # each task's own numbers (per method and length, lm-eval's full results, ...)
    tables: dict[str, Table]
    argv: list[str] = field(default_factory=list)  # empty in folders written before it was kept
    resolved: Resolved = field(default_factory=Resolved)
    versions: dict = field(default_factory=dict)  # lminf_eval (always), torch, transformers, datasets, python
    git: str | None = None  # commit (+dirty) when run from a clone, else None
    device: str = ""
    wall_seconds: float | None = None
    cells: Cells = field(default_factory=Cells)
    attention_paths: dict = field(default_factory=dict)  # method -> {attention path: calls} (dispatch.paths_run)

    @property
    def model(self) -> str:
        return str(self.config["model"])

    @property
    def dataset(self) -> str | None:
        """The corpus the numbers come from; None for a task that makes its own inputs (passkey, timing)."""
        return self.config.get("dataset")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, default=str)

    @classmethod
    def from_dict(cls, d: dict) -> Results:
        """KeyError, TypeError or ValueError (saying what is wrong) for a file that is not a results.json."""
        _check_shape(d)
        resolved = d.get("resolved") or {}
        return cls(
            command=d["command"],
            status=d["status"],
            config=dict(d["config"]),
            metrics=d.get("metrics") or {},
            tables={name: Table.from_dict(t) for name, t in (d.get("tables") or {}).items()},
            argv=list(d.get("argv") or []),
            resolved=Resolved(
                resolved.get("pretraining_length"),
                list(resolved.get("lengths") or []),
                [MethodSettings(m["label"], m["settings"]) for m in resolved.get("methods") or []],
            ),
            versions=dict(d.get("versions") or {}),
            git=d.get("git"),
            device=d.get("device") or "",
            wall_seconds=d.get("wall_seconds"),
            cells=Cells(**(d.get("cells") or {})),
            attention_paths=dict(d.get("attention_paths") or {}),
        )

    @classmethod
    def from_json(cls, text: str) -> Results:
        return cls.from_dict(json.loads(text))


def as_typed(argv: list[str]) -> list[str]:
    """A run's command line as a user would type it: without the --output-dir and --resume a profile adds."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--output-dir":
            skip = True
        elif arg != "--resume":
            out.append(arg)
    return out


def _check_shape(d) -> None:
    """The types a reader relies on, so a hand-edited file is one message, not a failure deep in `report`."""
    expect = {"command": str, "status": str, "config": dict, "metrics": dict, "tables": dict}
    if not isinstance(d, dict):
        raise ValueError("not a JSON object")
    for name, kind in expect.items():
        if name in d and not isinstance(d[name], kind):
            raise ValueError(f"{name} is a {type(d[name]).__name__}, not a {kind.__name__}")
    if not isinstance(d.get("config", {}).get("model"), str):
        raise ValueError("config.model is missing")
    for key in ("cells", "resolved", "versions", "attention_paths"):
        if d.get(key) is not None and not isinstance(d[key], dict):
            raise ValueError(f"{key} is a {type(d[key]).__name__}, not an object")
    for name, table in d.get("tables", {}).items():
        if not isinstance(table, dict):
            raise ValueError(f"table {name} is not an object")
        rows, cols = table.get("index", []), table.get("columns", [])
        for part in ("data", "lo", "hi", "stderr"):
            matrix = table.get(part)
            if matrix is None and part != "data":
                continue
            if (
                not isinstance(matrix, list)
                or len(matrix) != len(rows)
                or any(not isinstance(r, list) or len(r) != len(cols) for r in matrix)
            ):
                raise ValueError(f"table {name}: {part} is not {len(rows)} rows of {len(cols)} values")
