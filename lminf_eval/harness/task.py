"""What a task is, as the runner and the CLI see it: a registered, typed plug-in (lm-eval's `register_task` is
the model). The built-in tasks live in the top-level `tasks/` folder; third-party packages add theirs through
the `lminf_eval.tasks` entry point group (each entry point names a module or a `Task` subclass).

A task declares its command name, help, default lengths, the LM-Infinite settings its paper runs use, and its
own flags as an `Options` dataclass (`option(default, help)` fields) beside its code; the CLI builds its
command from these. The runner makes one task object per run and calls prepare -> cells -> run_cell (per
cell, written as it finishes) -> summarize -> plots.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Hashable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import UserError
from .console import console
from .flags import option

if TYPE_CHECKING:  # (not at run time: the CLI builds its commands from this module without torch or pandas)
    import pandas as pd
    import torch

    from ..methods import Method
    from ..settings import Settings
    from .config import RunConfig
    from .data import Document
    from .results import RunDir

__all__ = ["DOCUMENT_FLAGS", "Cell", "Context", "Task", "console", "option", "register_task"]  # the plug-in API

# the flags of a task that reads documents (ppl, generate): a task that makes its own inputs ignores them
DOCUMENT_FLAGS = ("dataset", "text_field", "split", "num_docs", "min_tokens")


@dataclass
class NoOptions:
    """A task without flags of its own."""


@dataclass
class Cell:
    key: dict  # what identifies the result (method label, document, length, ...), JSON-serialisable
    method: Method
    data: Any = None  # whatever the task needs to run it
    tokens: int = 0  # for the tokens/s readout


@dataclass
class Context:
    """One run: its configuration, the loaded model, the resolved lengths and methods, the results folder."""

    run_config: RunConfig
    model: Any
    tokenizer: Any
    device: torch.device
    l_pre: int
    lengths: list[int]
    methods: list[Method]
    settings: dict[str, Settings | None]  # method label -> its resolved LM-Infinite settings (None: unpatched)
    run: RunDir


class Task:
    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    default_lengths: ClassVar[str] = "0.5x,1x,2x,4x,8x,16x,32x"
    default_methods: ClassVar[tuple[str, ...]] = ("vanilla", "lm-infinite")
    settings_defaults: ClassVar[dict] = {}  # LM-Infinite settings the paper used for this task (e.g. n_global)
    # what a finished ("ok") row must hold, field -> type; a row without it is damaged and its cell runs again
    result_fields: ClassVar[dict[str, type | tuple[type, ...]]] = {}
    # shared flags (RunConfig fields, settings) the task does not read: absent from its command and its --config
    ignores: ClassVar[tuple[str, ...]] = ()

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.options = ctx.run_config.options

    @property
    def labels(self) -> list[str]:
        return [m.label for m in self.ctx.methods]

    @classmethod
    def answer(cls, run_config: RunConfig) -> str | None:
        """Text that answers the flags without a model or a run (lm-eval's `--tasks list`); None: run."""
        return None

    def prepare(self) -> None:
        """Load data, validate options; called once before cells are listed."""

    def documents(self, num_docs: int | None, min_tokens: int, max_tokens: int) -> list[Document]:
        """The run's documents (--dataset, --text-field, --split): the first `num_docs` (None: all) of at least
        `min_tokens` tokens, cut to `max_tokens`; fewer than asked is a one-line error."""
        from .data import load_documents

        run_config = self.ctx.run_config
        return load_documents(
            run_config.dataset,
            self.ctx.tokenizer,
            num_docs,
            min_tokens,
            max_tokens,
            run_config.text_field,
            run_config.split,
        )

    def fingerprint(self) -> dict:
        """What else changes this task's numbers, beyond its flags and data (a resumed run must match it); a
        key is added only where it applies, so an older run without it still resumes."""
        return {}

    def data_digest(self) -> str | None:
        """A hash of the data the cells read, so a resumed run can check it reads the same: by default the
        documents a task keeps in `self.docs` (None for a task that generates its inputs from the seed)."""
        docs = getattr(self, "docs", None)
        if docs is None:
            return None
        digest = hashlib.sha256()
        for doc in docs:
            digest.update(doc.id.encode() + b"\0" + array("l", doc.ids).tobytes())
        return digest.hexdigest()[:16]

    def cells(self) -> list[Cell]:
        raise NotImplementedError

    def run_cell(self, cell: Cell) -> dict:
        raise NotImplementedError

    def batch_key(self, cell: Cell) -> Hashable | None:
        """Cells with equal keys may share one batched forward (`--batch-size`); None: the cell runs alone."""
        return None

    def run_batch(self, cells: list[Cell]) -> list[dict]:
        """The results of cells with one batch key, in order (a task that batches overrides it)."""
        return [self.run_cell(cell) for cell in cells]

    def batches(self, cells: list[Cell]) -> list[list[Cell]]:
        """Consecutive cells with one batch key, up to the task's `--batch-size` each (1 when it has none)."""
        size, out = getattr(self.options, "batch_size", 1), []
        for cell in cells:
            key = self.batch_key(cell) if size > 1 else None
            if out and key is not None and len(out[-1]) < size and self.batch_key(out[-1][0]) == key:
                out[-1].append(cell)
            else:
                out.append([cell])
        return out

    def summarize(self, rows: list[dict]) -> tuple[dict, dict[str, pd.DataFrame]]:
        raise NotImplementedError

    def plots(self, rows: list[dict]) -> None:
        """PNG figures into the run folder, where a curve says more than a table."""


TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make `cls` a command (`lminf-eval NAME`) and a step that profiles can run. A name is
    taken once: another class under a registered name is refused (registering the same class again is a no-op)."""
    if not cls.name:
        raise UserError(f"task class {cls.__name__} has no name: set `name = ...` on it")
    taken = TASKS.get(cls.name)
    if taken is not None and taken is not cls:
        raise UserError(
            f"task name {cls.name!r} of {cls.__module__}.{cls.__qualname__} is taken by "
            f"{taken.__module__}.{taken.__qualname__}: give the task another name"
        )
    TASKS[cls.name] = cls
    return cls


def load_plugins() -> None:
    """Register tasks from installed packages' `lminf_eval.tasks` entry points."""
    for ep in entry_points(group="lminf_eval.tasks"):
        loaded = ep.load()
        if isinstance(loaded, type) and issubclass(loaded, Task):
            register_task(loaded)
