"""One run's configuration: CLI flags, optionally filled from a YAML file, validated once."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from .errors import UserError


@dataclass
class RunConfig:
    command: str = "ppl"
    model: str = "tiny-rope"
    method: list[str] = field(default_factory=lambda: ["vanilla", "lm-infinite"])
    dataset: str = "arxiv-sample"
    text_field: str | None = None
    split: str | None = None
    lengths: str = "0.5x,1x,2x,4x,8x,16x,32x"
    num_docs: int = 4
    min_tokens: int | None = None
    pretraining_length: int | None = None
    n_global: int | None = None  # None: the task's paper default (100 for ppl/generate, 10 for passkey)
    n_local: int | None = None
    limit_distance: int | None = None
    top_k: int | None = None
    top_k_from_layer: int = 4
    top_k_distance: int | None = None
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | None = None
    seed: int = 0
    output_dir: str | None = None
    resume: bool = False
    # ppl
    bucket_size: int | None = None
    stream_tokens: int | None = None
    chunk_size: int | None = None
    log_x: bool = False
    # passkey
    depths: str | None = None
    num_samples: int = 4
    distractors: int = 0
    # generate / passkey / timing
    new_tokens: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


FIELD_NAMES = {f.name for f in fields(RunConfig)}


def read_config_file(path: str) -> dict:
    """YAML mapping of option names (dashes or underscores) to values; unknown keys are errors."""
    file = Path(path)
    if not file.exists():
        raise UserError(f"config file {path} does not exist (shipped configs are in configs/)")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must be a mapping of option: value")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name == "methods":
            name = "method"
        if name not in FIELD_NAMES:
            raise UserError(f"unknown config key {key!r} in {path}: see `lminf-eval COMMAND --help` for option names")
        if name == "method" and isinstance(value, str):
            value = [value]
        out[name] = value
    return out


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
        except ValueError:
            raise UserError(
                f"cannot parse length {item!r}: use token counts (4096,8192), 8k, or multiples (0.5x,2x)"
            ) from None
    if not out or min(out) < 2:
        raise UserError(f"lengths {spec!r} must name at least one length of 2 tokens or more")
    return sorted(set(out))
