"""`lm-eval-lminf`: lm-eval's own command line with the `lminf` model type registered, as an lm-eval user types it:

    lm-eval-lminf run --model lminf --model_args pretrained=tiny-rope,method=lm-infinite --tasks niah_single_1

What it adds to lm-eval's `run`: `--device` defaults to what is there (cuda if visible, else cpu, where lm-eval
assumes cuda:0); a registry name or .gguf file as `pretrained` gets a local tokenizer directory for the tasks
that size their inputs with it (RULER), passed as `--metadata tokenizer=DIR` unless one is named; `--help` ends
with the `lminf` model args. Without the lm-eval extra: one line naming it, exit 2.
"""

from __future__ import annotations

import sys

from ..errors import INSTALL_LM_EVAL, UserError

MODEL_ARGS_HELP = """\
The lminf model type (--model lminf --model_args KEY=VALUE,...):
  pretrained=NAME         registry name (tiny-rope, tiny-alibi, smollm2-135m, llama-2-7b, ...), local directory,
                          .gguf file or hub id, loaded as `lminf-eval --model` loads it
  method=SPEC             any method spec: lm-infinite (default), vanilla, truncate, streaming-llm, self-extend,
                          rerope, pi, dynamic-ntk, yarn, ... with options as method:key=value (`lminf-eval methods`)
  n_global=N, n_local=N, limit_distance=N, top_k=N, ...
                          any LM-Infinite setting as its own model arg (lengths take L_pre, L_pre/N, inf)
  pretraining_length=N    L_pre when the registry and the config do not say it
  target_length=N         the longest input the settings are resolved for (default: max_length)
  max_length=N            lm-eval's left truncation (default: none; truncate: L_pre)
  dtype=auto|float32|bfloat16|float16   (auto: float32 on CPU, bfloat16 on GPU)
  --device defaults to cuda when one is visible, else cpu.
"""


def _values(argv: list[str], flag: str) -> list[str]:
    """The words after `flag` up to the next option (lm-eval's model args: `a=1,b=2` or `a=1 b=2`)."""
    if flag not in argv:
        return []
    rest = argv[argv.index(flag) + 1 :]
    return [w for w in rest[: next((i for i, w in enumerate(rest) if w.startswith("-")), len(rest))]]


def model_args(argv: list[str]) -> dict[str, str]:
    words = _values(argv, "--model_args") or _values(argv, "-a")
    pairs = [p.partition("=") for w in words for p in w.split(",") if "=" in p]
    return {k.strip(): v.strip() for k, _, v in pairs}


def with_local_defaults(argv: list[str]) -> list[str]:
    """lm-eval's `run` arguments with what a user of the lminf model type means by leaving them out."""
    if not argv or argv[0] != "run" or any(h in argv for h in ("-h", "--help")):
        return argv
    argv = list(argv)
    if "--device" not in argv and "--config" not in argv and "-C" not in argv:
        import torch

        argv += ["--device", "cuda" if torch.cuda.is_available() else "cpu"]
    model = (_values(argv, "--model") or _values(argv, "-M") or [""])[0]
    pretrained = model_args(argv).get("pretrained")
    named = any("tokenizer" in w for w in argv if not w.startswith("-"))
    if model == "lminf" and pretrained and not named:
        from .models import tokenizer_dir

        argv += ["--metadata", f"tokenizer={tokenizer_dir(pretrained)}"]
    return argv


def main() -> None:
    """The `lm-eval-lminf` command."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        print(f"lm-eval-lminf: error: {INSTALL_LM_EVAL}", file=sys.stderr)
        sys.exit(2)
    argv = sys.argv[1:]
    helping = not argv or any(h in argv for h in ("-h", "--help"))
    try:
        sys.argv = [sys.argv[0], *with_local_defaults(argv)]
        from lm_eval.__main__ import cli_evaluate

        from . import lmeval_model  # noqa: F401  (registers the lminf model type)

        cli_evaluate()
    except UserError as err:
        print(f"lm-eval-lminf: error: {err}", file=sys.stderr)
        sys.exit(2)
    except SystemExit:
        if helping:
            print("\n" + MODEL_ARGS_HELP)
        raise
    if helping:
        print("\n" + MODEL_ARGS_HELP)
