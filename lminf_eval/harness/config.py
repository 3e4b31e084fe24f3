"""One run's configuration (`RunConfig`): the flags every task shares, LM-Infinite settings given on the
command line, and the task's own options; optionally filled from a YAML file, validated once."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError, shown
from ..settings import FLAG_NAMES
from .flags import option


@dataclass
class RunConfig:
    command: str = "ppl"
    model: str = option(
        "tiny-rope",
        "Registry name (smollm2-135m, tiny-rope, tiny-alibi, llama-2-7b, ...), hub id, local directory, or .gguf file.",
    )
    method: list[str] = option(
        ["vanilla", "lm-infinite"],
        "Methods side by side (lminf-eval methods lists them: vanilla, lm-infinite, its ablations, "
        "streaming-llm, self-extend, rerope, pi, dynamic-ntk, yarn...); options as name:key=value "
        "(lm-infinite:top_k=5). Repeat or comma-separate.",
    )
    dataset: str = option(
        "arxiv-sample",
        "Registry name (arxiv-sample, web-sample, pg19, arxiv, openwebtext2, proof-pile), hub dataset id, or local "
        ".jsonl/.txt/directory.",
    )
    text_field: str | None = option(None, "Text field of jsonl/hub records (default: the dataset's, else text).")
    split: str | None = option(None, "Hub dataset split.")
    lengths: str | None = option(None, "Token counts (4096,8192), 8k, or multiples of the pretraining length (1x,32x).")
    num_docs: int = option(4, "Documents to evaluate.", min=1)
    min_tokens: int | None = option(None, "Skip documents shorter than this (default: the longest length).", min=1)
    pretraining_length: int | None = option(
        None, "Override L_pre (configs lie: MPT-7B says 2048; default: config).", min=2
    )
    dtype: str = option("auto", "auto (float32 on CPU, bfloat16 on GPU), float32, float16, bfloat16.")
    device: str = option("auto", "auto (cuda if present, else cpu), cpu, cuda, cuda:1.")
    device_map: str | None = option(None, "Shard a model too big for one GPU (accelerate), e.g. auto.")
    seed: int = option(0, "Seed for prompts, keys and sampling.", min=0)
    output_dir: str | None = option(None, "Where results go (default: results/COMMAND/MODEL/TIMESTAMP).")
    resume: bool = option(False, "Skip cells already in --output-dir (or the latest run of this command and model).")
    keep_oom: bool = option(False, "With --resume, keep cells recorded as out-of-memory instead of retrying them.")
    settings: dict[str, Any] = field(default_factory=dict)  # LM-Infinite settings given by flags (lminf_eval.settings)
    options: Any = None  # the task's own Options dataclass
    argv: list[str] = field(default_factory=list)  # the command line that made this run

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "options"}
        out["options"] = asdict(self.options) if is_dataclass(self.options) else {}
        return out


# flags that are common to every task (the rest of RunConfig is filled in by the CLI)
COMMON = tuple(f.name for f in fields(RunConfig) if f.metadata.get("help"))


def read_config_file(path: str, allowed: set[str]) -> dict:
    """YAML mapping of option names (dashes or underscores) to values; keys outside `allowed` are errors."""
    file = Path(path)
    if not file.exists() and Path(path).parts[:1] == ("configs",):  # a shipped config, from any directory
        from .models import shipped

        file = shipped(path)
    if not file.is_file():
        raise UserError(f"config file {path} does not exist or is not a file (shipped configs are in configs/)")
    try:
        text = file.read_text()
        if any(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text)):  # (a few bytes can expand to GBs)
            raise UserError(f"config file {path} uses YAML aliases (*name): write the values out")
        data = yaml.safe_load(text) or {}
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not text: pass a YAML file") from None
    except yaml.YAMLError as err:
        raise UserError(f"config file {path} is not valid YAML: {str(err).splitlines()[0][:200]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must be a mapping of option: value")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name == "methods":
            name = "method"
        if name not in allowed:
            raise UserError(
                f"unknown config key {shown(key)} in {path}: see `lminf-eval COMMAND --help` for option names"
            )
        if name == "method" and isinstance(value, str):
            value = [value]
        if name == "method" and not value:
            raise UserError(f"{key} in {path} is empty: list at least one method (lminf-eval methods)")
        out[name] = value
    return out


def split_settings(values: dict) -> tuple[dict, dict]:
    """(LM-Infinite settings, everything else) from one flat mapping of option names."""
    settings = {k: v for k, v in values.items() if k in FLAG_NAMES}
    return settings, {k: v for k, v in values.items() if k not in FLAG_NAMES}


def parse_lengths(spec: str | list, pretraining_length: int) -> list[int]:
    """`4096,8192` (tokens) or `0.5x,1x,32x` (multiples of the pretraining length) -> sorted token counts."""
    items = spec if isinstance(spec, list) else re.split(r"[,\s]+", str(spec).strip())
    out = []
    for item in filter(None, map(str, items)):
        try:
            if item.endswith("x"):
                out.append(int(round(float(item[:-1]) * pretraining_length)))
            elif item.lower().endswith("k"):
                out.append(int(float(item[:-1]) * 1024))
            else:
                out.append(int(item))
        except (ValueError, OverflowError):
            raise UserError(
                f"cannot parse length {item!r}: use token counts (4096,8192), 8k, or multiples (0.5x,2x)"
            ) from None
    if not out or min(out) < 2:
        raise UserError(f"lengths {spec!r} must name at least one length of 2 tokens or more")
    return sorted(set(out))
