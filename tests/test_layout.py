"""The package's shape: no import circle among lminf_eval's modules (tasks/ included, as lminf_eval.tasks), not
even through imports made for type hints only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in ((ROOT / "lminf_eval", "lminf_eval"), (ROOT / "tasks", "lminf_eval.tasks")):
        for file in folder.rglob("*.py"):
            parts = list(file.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = file
    return out


def imports(name: str, file: Path, known: set[str], type_only: bool = True) -> set[str]:
    """Modules of ours that `name` imports, anywhere in it (functions included); with `type_only`, also those
    imported for type hints only (under `if TYPE_CHECKING:`)."""
    tree = ast.parse(file.read_text())
    package = name if file.name == "__init__.py" else name.rsplit(".", 1)[0]
    skip = (
        set()
        if type_only
        else {
            id(n)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
            for n in ast.walk(node)
        }
    )
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = f"{base}.{node.module}" if node.level and node.module else (node.module or base)
            if node.module:  # (`from . import x` needs the package initialised, as every submodule does)
                found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names}
    return {m for m in found if m in known and m != name}


@pytest.mark.parametrize("type_only", [False, True], ids=["at-run-time", "type-only-included"])
def test_no_import_circle(type_only):
    mods = modules()
    graph = {name: imports(name, file, set(mods), type_only) for name, file in mods.items()}
    assert graph["lminf_eval.harness.cli"] and graph["lminf_eval.attention.dispatch"]  # the parser sees imports
    if type_only:  # (and the imports made for type hints only)
        assert "lminf_eval.harness.config" in graph["lminf_eval.harness.task"]
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_the_library_imports_none_of_the_harness():
    """`import lminf_eval` (apply/remove, methods, cache, attention) brings torch and transformers only: no
    CLI, table, data-set or scoring library, and not the harness package (checked in a fresh interpreter)."""
    import subprocess
    import sys

    harness_only = ["typer", "rich", "pandas", "datasets", "sacrebleu", "rouge_score", "matplotlib", "lm_eval"]
    code = (
        "import sys, lminf_eval, lminf_eval.methods, lminf_eval.attention\n"
        "[getattr(lminf_eval, name) for name in lminf_eval.__all__]\n"  # (every public name, loaded)
        f"print([m for m in {harness_only + ['lminf_eval.harness']!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
