"""`lminf-eval`: the command line. One command per registered task (`lminf_eval.harness.task.TASKS`), each taking
- the flags every task shares (`RunConfig`'s fields),
- LM-Infinite's settings (`lminf_eval.settings`), with the defaults this task resolves them to,
- the task's own flags (its `Options` dataclass, declared beside its code),
and `--config FILE.yaml` for any of them (flags given on the command line win). `run_task` turns them into
one `RunConfig` and hands it to the runner.
"""

from __future__ import annotations

import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, get_type_hints

import typer
from typer.core import TyperGroup

from .. import tasks  # noqa: F401  (registers the built-in tasks)
from ..errors import UserError, shown
from ..settings import FLAG_NAMES, MAX_TOKENS, TEXT_NAMES, describe_default
from ..settings import HELP as SETTING_HELP
from .config import COMMON, RunConfig, read_config_file, split_settings
from .task import TASKS, Task, load_plugins


class OneLineErrors(TyperGroup):
    """Click's own usage errors (an unknown flag, text for a number) as one line and exit 2, like ours."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra) -> Any:
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as err:  # (click's usage errors, as typer vendors them)
            if not hasattr(err, "format_message"):
                raise
            message = " ".join(err.format_message().split())
            hint = f" (see {err.ctx.command_path} --help)" if getattr(err, "ctx", None) else ""
            typer.echo(f"lminf-eval: error: {message[:300]}{hint}", err=True)
            code = err.exit_code
        except typer.Abort:
            typer.echo("lminf-eval: aborted", err=True)
            code = 130
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="lminf-eval",
    help="LM-Infinite vs the unmodified model: perplexity, passkey retrieval, generation quality and speed.",
    no_args_is_help=False,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=OneLineErrors,
)


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"lminf-eval {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """LM-Infinite vs the unmodified model: perplexity, passkey retrieval, generation quality and speed."""


def run_task(task_type: type[Task], ctx: typer.Context, flags: dict[str, Any]) -> None:
    """Every task command: the flags (and --config) into one RunConfig, then the runner."""
    from .runner import execute

    quiet_libraries()
    try:
        run_config = collect(task_type, ctx, flags)
        answer = task_type.answer(run_config)  # (e.g. lm-eval's `--tasks list`: no model, no run)
        if answer is not None:
            typer.echo(answer)
            return
        execute(task_type, run_config)
    except UserError as err:
        _fail(str(err))
    except ImportError as err:
        _fail(f"missing optional package {err.name or err}: pip install {err.name or ''}".strip())
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def collect(task_type: type[Task], ctx: typer.Context, flags: dict[str, Any]) -> RunConfig:
    """Command-line flags over `--config` values over defaults, split into common flags, settings, options."""
    config = flags.pop("config", None)
    option_names = [f.name for f in fields(task_type.Options)]
    allowed = {*COMMON, *FLAG_NAMES, *option_names} - set(task_type.ignores)
    file_values = read_config_file(str(config), allowed) if config else {}
    values, argv = {}, ["lminf-eval", task_type.name]
    for name, value in flags.items():
        source = ctx.get_parameter_source(name)  # compared by name: typer and click may differ in enum class
        if source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP"):
            argv += _as_argv(name, value)
        elif name in file_values:
            value = file_values[name]
        if value is not None and value != [] and value != ():
            values[name] = str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
    if config:
        argv += ["--config", str(config)]
    declared = {name: (kind, minimum) for name, kind, _, minimum in _flags(task_type)}
    for name, value in list(values.items()):
        values[name] = _checked(name, value, *declared[name])
    settings, values = split_settings(values)
    options = task_type.Options(**{k: values.pop(k) for k in option_names if k in values})
    values.setdefault("lengths", task_type.default_lengths)
    values.setdefault("method", list(task_type.default_methods))
    values.update({name: None for name in task_type.ignores if name in COMMON})  # (not recorded as if read)
    return RunConfig(command=task_type.name, settings=settings, options=options, argv=argv, **values)


def _checked(name: str, value, kind, minimum: int | None):
    """`value` as the flag's type (YAML may give a number where text is expected), or a one-line UserError."""
    kind, flag = _strip_none(kind), "--" + name.replace("_", "-")
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if kind == list[str] and isinstance(value, str):
        value = [value]
    ok = {
        int: isinstance(value, int) and not isinstance(value, bool),
        bool: isinstance(value, bool),
        str: isinstance(value, str),
        list[str]: isinstance(value, list) and all(isinstance(v, str) for v in value),
    }.get(kind, True)
    if not ok:
        expected = {int: "a whole number", bool: "true or false", str: "text", list[str]: "a list of names"}[kind]
        raise UserError(f"{flag} must be {expected}, got {shown(value)}")
    if minimum is not None and value < minimum:
        raise UserError(f"{flag} must be at least {minimum}, got {value}")
    if kind is int and value > MAX_TOKENS:  # (a typo, and past what int64 tensor maths holds)
        raise UserError(f"{flag} must be at most 2^40, got {value:.3g}")
    return value


def _as_argv(name: str, value) -> list[str]:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return [flag] if value else []
    if isinstance(value, list):
        return [x for v in value for x in (flag, str(v))]
    return [flag, str(value)]


def _fail(message: str, code: int = 2):
    typer.echo(f"lminf-eval: error: {message}", err=True)
    raise typer.Exit(code)


# --- commands from the registry --------------------------------------------------------------------


def _flags(task_type: type[Task]) -> list[tuple[str, Any, str, int | None]]:
    """(name, type, help, least value) of every flag of a task's command, help ending in the default that
    applies (LM-Infinite settings are range-checked by `Settings.resolve`)."""
    out = []
    hints = get_type_hints(RunConfig)
    task_defaults = {"lengths": task_type.default_lengths, "method": list(task_type.default_methods)}
    for f in fields(RunConfig):
        if f.name in COMMON and f.name not in task_type.ignores:
            default = task_defaults.get(f.name, _default(f))
            out.append((f.name, hints[f.name], _with_default(f.metadata["help"], default), f.metadata.get("min")))
    for name in (n for n in FLAG_NAMES if n not in task_type.ignores):
        default = describe_default(name, task_type.settings_defaults)
        out.append((name, str if name in TEXT_NAMES else int, _with_default(SETTING_HELP[name], default), None))
    hints = get_type_hints(task_type.Options)
    for f in fields(task_type.Options):
        out.append((f.name, hints[f.name], _with_default(f.metadata["help"], _default(f)), f.metadata.get("min")))
    out.append(("config", Path, "YAML file of flag: value pairs (configs/*.yaml hold the paper's runs).", None))
    return out


def _default(f) -> Any:
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else None


def _with_default(help: str, default) -> str:
    if default is None or default is False or default == "":
        return help
    shown = ",".join(map(str, default)) if isinstance(default, list) else default
    return f"{help} (default: {shown})"  # (square brackets would be read as rich markup)


def _command(task_type: type[Task]):
    """A typer command whose parameters are the task's flags (typer reads them from the signature)."""
    import inspect

    def command(ctx: typer.Context, **flags):
        run_task(task_type, ctx, flags)

    params = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)]
    for name, kind, help, _ in _flags(task_type):
        is_bool, kind = kind is bool, _strip_none(kind)
        metavar = {str: "TEXT", int: "INT", Path: "PATH", list[str]: "METHOD"}.get(kind)
        option = typer.Option(
            False if is_bool else None,
            "--" + name.replace("_", "-"),
            help=help,
            show_default=False,
            metavar=metavar,
        )
        annotation = bool if is_bool else (kind | None)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation))
    command.__signature__ = inspect.Signature(params)
    command.__name__ = task_type.name
    command.__doc__ = task_type.help
    return command


def _strip_none(kind):
    args = getattr(kind, "__args__", None)
    if args and type(None) in args:
        return next(a for a in args if a is not type(None))
    return kind


def register_commands() -> None:
    """A command for every registered task (built-in and from entry points) that has none yet."""
    load_plugins()
    have = {c.name for c in app.registered_commands}
    for task_type in TASKS.values():
        if task_type.name not in have:
            app.command(task_type.name, help=task_type.help)(_command(task_type))


@app.command("report")
def report(
    runs: list[Path] = typer.Argument(..., help="Results folders (each holding results.json)."),
    output: Path = typer.Option(None, "--output", help="Also write the tables to this Markdown file."),
):
    """Paper-style tables from one or more results folders: methods as rows, lengths as columns."""
    from .report import build_report

    try:
        text = build_report(runs)
    except UserError as err:
        _fail(str(err))
    typer.echo(text)
    if output:
        try:
            output.write_text(text + "\n")
        except OSError as err:
            _fail(f"cannot write {output} ({err.strerror}): pass a file path to --output")


@app.command("view")
def view(
    runs: list[Path] = typer.Argument(
        ..., help="Results folders (each holding results.json), or a profile folder.", metavar="RUN_DIR"
    ),
    output: Path = typer.Option(
        None, "--output", help="The HTML file (default: view.html in the folder given, or in the folders' parent)."
    ),
):
    """One self-contained HTML page (opens offline): provenance, sortable tables, plots and samples of the runs."""
    from .view import write_page

    try:
        path = write_page(runs, output)
    except UserError as err:
        _fail(str(err))
    typer.echo(f"view: {path} ({path.stat().st_size / 1e6:.1f} MB)")


@app.command("methods")
def methods():
    """Every method --method accepts: what it does, its options (name:key=value) and their defaults, its source."""
    from ..methods import PRESETS, describe

    for name, preset in PRESETS.items():
        typer.echo(f"{name}\n  {preset.summary}" + (f"\n  source: {preset.source}" if preset.source else ""))
        for option, default in describe(name):
            per_task = "" if option in (preset.fixes or {}) else _per_task(option, default)
            typer.echo(f"  {option:<18} default {default:<14} {SETTING_HELP[option]}{per_task}")
    typer.echo(
        "Any method takes any setting (e.g. lm-infinite:rope_type=yarn); lengths read L_pre (the pretraining "
        "length), L_pre/N, L_pre-N or L_pre*M/N, and 'inf' switches a window or ceiling off."
    )


def _per_task(option: str, default: str) -> str:
    """The tasks whose paper runs use another default for `option` (n_global: 100 in ppl, generate, timing)."""
    by_value: dict[str, list[str]] = {}
    for task_type in TASKS.values():
        value = str(task_type.settings_defaults.get(option, default))
        if value != default and option not in task_type.ignores:
            by_value.setdefault(value, []).append(task_type.name)
    return "".join(f" Default {value} in {', '.join(names)}." for value, names in by_value.items())


def quiet_libraries() -> None:
    """Our progress bar and tables are the output; silence the libraries' own bars and notices."""
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


register_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
