"""How a flag is declared: `option(default, help, min)`, a dataclass field the CLI turns into `--name`. Used by
the common flags (`config.RunConfig`) and by each task's `Options` (`task.py` re-exports it for plug-ins)."""

from __future__ import annotations

from dataclasses import field
from typing import Any


def option(default: Any, help: str, min: int | None = None) -> Any:
    """A flag: its default, its help line and, for a number, the least value it accepts (every int flag
    declares one; the CLI refuses smaller values and values of the wrong type in one line)."""
    metadata = {"help": help} if min is None else {"help": help, "min": min}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)
