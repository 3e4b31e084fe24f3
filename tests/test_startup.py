"""The command line answers at once: `--help`, every `COMMAND --help` and `--version` load no torch, transformers,
pandas or datasets (checked in a fresh interpreter; bench/bench_cli.py times it)."""

from __future__ import annotations

import subprocess
import sys

from lminf_eval import __version__

HEAVY = ["torch", "transformers", "pandas", "datasets", "sacrebleu", "rouge_score", "matplotlib", "lm_eval"]


def loaded_after(args: list[str]) -> tuple[list[str], str]:
    """(heavy modules in sys.modules, stdout) after `lminf-eval ARGS` in a fresh interpreter."""
    code = (
        "import sys\nfrom lminf_eval.harness.cli import app\n"
        f"try:\n    app({args!r})\nexcept SystemExit:\n    pass\n"
        f"print('LOADED', [m for m in {HEAVY!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    head, _, loaded = out.rpartition("LOADED ")
    return eval(loaded), head  # noqa: S307 (our own print of a list of names)


def test_help_of_every_command_loads_no_heavy_library():
    from lminf_eval.harness.cli import app
    from lminf_eval.harness.task import TASKS

    builtin = [name for name, task in TASKS.items() if task.__module__.startswith("lminf_eval.tasks")]
    others = [  # report, methods, view (a task's command is made by `_command`)
        c.name for c in app.registered_commands if c.name and "_command" not in c.callback.__qualname__
    ]
    commands = [*builtin, *others]  # (not a plug-in task another test registered)
    for args in (["--help"], *([c, "--help"] for c in dict.fromkeys(commands))):
        loaded, out = loaded_after(args)
        assert loaded == [], (args, loaded)
        assert "Usage" in out, (args, out)


def test_version():
    loaded, out = loaded_after(["--version"])
    assert out.strip() == f"lminf-eval {__version__}" and loaded == []
