"""`lminf-eval`: the command line. Each evaluation command shares the common flags below; any flag can also
come from `--config FILE.yaml` (flags given on the command line win)."""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from .config import RunConfig, read_config_file
from .errors import UserError

app = typer.Typer(
    name="lminf-eval",
    help="LM-Infinite vs the unmodified model: perplexity, passkey retrieval, generation quality and speed.",
    no_args_is_help=False,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@dataclass
class Flag:
    name: str
    type: Any
    help: str
    default: Any = None


COMMON = [
    Flag(
        "model",
        str,
        "Registry name (smollm2-135m, tiny-rope, tiny-alibi, llama-2-7b, ...), hub id, local "
        "directory, or .gguf file. (default: tiny-rope)",
    ),
    Flag(
        "method",
        list[str],
        "Methods side by side: vanilla, lm-infinite, window, lambda-only, ceiling-only, "
        "truncate; options as name:key=value (lm-infinite:top_k=5). Repeat or comma-separate. "
        "[default: vanilla,lm-infinite]",
    ),
    Flag(
        "dataset",
        str,
        "Registry name (arxiv-sample, web-sample, arxiv, openwebtext2, pg19), hub dataset id, "
        "or local .jsonl/.txt/directory. (default: arxiv-sample)",
    ),
    Flag("text_field", str, "Text field of jsonl/hub records. (default: text)"),
    Flag("split", str, "Hub dataset split."),
    Flag(
        "lengths",
        str,
        "Token counts (4096,8192), 8k, or multiples of the pretraining length (0.5x,1x,32x). "
        "[default: depends on the command]",
    ),
    Flag("num_docs", int, "Documents to evaluate. (default: 4)"),
    Flag("min_tokens", int, "Skip documents shorter than this. (default: the longest length)"),
    Flag("pretraining_length", int, "Override L_pre (configs lie: MPT-7B says 2048). (default: from the config)"),
    Flag("n_global", int, "Starting tokens every query sees. (default: 100 (ppl, generate, timing), 10 (passkey))"),
    Flag("n_local", int, "Local window. (default: L_pre)"),
    Flag("limit_distance", int, "Distance ceiling. (default: L_pre)"),
    Flag("top_k", int, "Top-k middle tokens for the last query row (paper: 5 for passkey). (default: off)"),
    Flag("top_k_from_layer", int, "First layer using top-k middle tokens. (default: 4)"),
    Flag("top_k_distance", int, "Distance the top-k tokens are scored at. (default: L_pre/2)"),
    Flag("dtype", str, "auto (float32 on CPU, bfloat16 on GPU), float32, float16, bfloat16. (default: auto)"),
    Flag("device", str, "auto (cuda if present, else cpu), cpu, cuda, cuda:1. (default: auto)"),
    Flag("device_map", str, "Shard a model too big for one GPU (accelerate), e.g. auto."),
    Flag("seed", int, "Seed for prompts, keys and sampling. (default: 0)"),
    Flag("output_dir", Path, "Where results go. (default: results/COMMAND/MODEL/TIMESTAMP)"),
    Flag("resume", bool, "Skip cells already in --output-dir (or the latest run of this command and model).", False),
    Flag("config", Path, "YAML file of flag: value pairs (configs/*.yaml hold the paper's runs)."),
]
EXTRA = {
    "ppl": [
        Flag("bucket_size", int, "Positions averaged for each milestone. (default: L_pre/8)"),
        Flag(
            "stream_tokens",
            int,
            "Extreme-length mode: one stream of N tokens read chunk by chunk through the bounded cache.",
        ),
        Flag("chunk_size", int, "Stream mode: tokens per forward. (default: L_pre)"),
        Flag("log_x", bool, "Log-scale position axis in the NLL plot.", False),
    ],
    "passkey": [
        Flag("depths", str, "Needle depths to sweep, e.g. 0,0.25,0.5,0.75,1. (default: uniform random)"),
        Flag("num_samples", int, "Prompts per length (and depth). (default: 4)"),
        Flag("distractors", int, "Decoy needles with other names and numbers. (default: 0)"),
        Flag("new_tokens", int, "Tokens generated for the answer. (default: 10)"),
    ],
    "generate": [Flag("new_tokens", int, "Tokens generated and scored after each position. (default: 100)")],
    "timing": [Flag("new_tokens", int, "Decoding steps timed. (default: 16)")],
    "diagnose": [],
}
HELP = {
    "ppl": "Per-position perplexity at milestone lengths (paper Table 1, Fig. 3), or on one long stream.",
    "passkey": "Passkey retrieval with optional distractors, over lengths and needle depths (paper Table 2).",
    "generate": "BLEU and ROUGE of greedy continuations after long prefixes (paper Table 3).",
    "timing": "Encoding/decoding speed and peak memory against vanilla (paper App. G).",
    "diagnose": "Why vanilla fails past L_pre: max logit vs distance, entropy, hidden-state PCA (paper Fig. 1).",
}


def _fail(message: str, code: int = 2):
    typer.echo(f"lminf-eval: error: {message}", err=True)
    raise typer.Exit(code)


def _collect(command: str, ctx: typer.Context, kwargs: dict) -> RunConfig:
    from .tasks import TASKS

    file_values = read_config_file(str(kwargs["config"])) if kwargs.get("config") else {}
    allowed = {f.name for f in COMMON + EXTRA[command]}
    for key in file_values:
        if key not in allowed:
            raise UserError(f"config key {key!r} does not apply to `{command}`")
    values = {}
    for name, value in kwargs.items():
        if name == "config":
            continue
        source = ctx.get_parameter_source(name)  # compared by name: typer and click may differ in enum class
        from_cli = source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")
        if not from_cli and name in file_values:
            value = file_values[name]
        if value is not None and value != []:
            values[name] = str(value) if isinstance(value, Path) else value
    values.setdefault("lengths", TASKS[command].default_lengths)
    return RunConfig(command=command, **values)


def _make_command(command: str):
    def run(ctx: typer.Context, **kwargs):
        from .runner import execute
        from .tasks import TASKS

        quiet_libraries()
        try:
            execute(TASKS[command], _collect(command, ctx, kwargs))
        except UserError as err:
            _fail(str(err))
        except ImportError as err:
            _fail(f"missing optional package {err.name or err}: pip install {err.name or ''}".strip())
        except KeyboardInterrupt:
            raise typer.Exit(130) from None

    params = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)]
    for flag in COMMON + EXTRA[command]:
        metavar = {str: "TEXT", int: "INT", Path: "PATH", list[str]: "METHOD"}.get(flag.type)
        option = typer.Option(
            flag.default, "--" + flag.name.replace("_", "-"), help=flag.help, show_default=False, metavar=metavar
        )
        params.append(
            inspect.Parameter(
                flag.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=option,
                annotation=flag.type if flag.type is bool else (flag.type | None),
            )
        )
    run.__signature__ = inspect.Signature(params)
    run.__name__ = command
    app.command(command, help=HELP[command])(run)


for _command in HELP:
    _make_command(_command)


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
        output.write_text(text + "\n")


def quiet_libraries() -> None:
    """Our progress bar and tables are the output; silence the libraries' own bars and notices."""
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
