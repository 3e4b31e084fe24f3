"""The harness's terminal: progress, warnings and notes go to stderr, so stdout holds only what a command
prints as its answer (tables, --dry-run plans)."""

from __future__ import annotations

from rich.console import Console

console = Console(stderr=True)
