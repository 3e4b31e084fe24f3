"""The methods compared side by side: vanilla, LM-Infinite, its ablations, and the training-free peers.

Every method is a preset of `Settings` (docs/methods.md has the definitions and sources), so one
kernel, one reference test and one harness serve all of them. A method spec is `name[:key=value...]`, e.g.
`lm-infinite:top_k=5:top_k_from_layer=4` or `self-extend:group_size=16`, so a sweep is just several methods
in one run. A method's settings are resolved by `Settings.resolve` from, later winning: the task's paper
defaults, the run's flags, the preset, the spec.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

from .errors import UserError
from .families import FAMILIES
from .families.base import unchanged
from .patch import apply_lm_infinite, remove_lm_infinite
from .settings import DEFAULTS, NAMES, TEXT_NAMES, Settings

FULL = {"n_local": math.inf, "limit_distance": math.inf}  # every key kept at its own distance


@dataclass(frozen=True)
class Preset:
    """One method: what it fixes (None: the unmodified model), the settings a user may change, its source;
    `truncate`: the unmodified model reads only the last L_pre tokens of every input (each task cuts them)."""

    summary: str
    fixes: dict | None
    options: tuple[str, ...] = ()
    source: str = ""
    truncate: bool = False


PRESETS: dict[str, Preset] = {
    "vanilla": Preset("The unmodified model.", None),
    "truncate": Preset(
        "Vanilla on the last L_pre tokens only, re-encoded (paper Table 2 baseline).", None, truncate=True
    ),
    "lm-infinite": Preset(
        "Λ-shaped mask (first n_global + last n_local tokens) and distances capped at limit_distance.",
        {},
        ("n_global", "n_local", "limit_distance", "top_k", "top_k_from_layer", "top_k_distance", "backend"),
        "Han et al., arXiv 2308.16137",
    ),
    "window": Preset("Sliding window: no starting tokens, no ceiling.", {"n_global": 0, "limit_distance": math.inf}),
    "lambda-only": Preset("Λ-shaped mask without the distance ceiling.", {"limit_distance": math.inf}),
    "ceiling-only": Preset("Distance ceiling without the mask: every key kept.", {"n_local": math.inf}),
    "streaming-llm": Preset(
        "Attention sinks: first n_global (sinks) + last n_local (recent) tokens, positions re-indexed inside "
        "the cache; bounded cache.",
        {"n_global": 4, "n_local": "L_pre-4", "far_distance": "cache"},
        ("n_global", "n_local"),
        "Xiao et al., arXiv 2309.17453",
    ),
    "self-extend": Preset(
        "Every key kept; distance d inside the neighbour window limit_distance (W), else grouped positions "
        "floor(i/G) - floor(j/G) + W - floor(W/G), G = group_size.",
        {**FULL, "limit_distance": "L_pre/4", "far_distance": "grouped", "group_size": 8},
        ("limit_distance", "group_size", "log_scale_base"),
        "Jin et al., arXiv 2401.01325",
    ),
    "rerope": Preset(
        "Every key kept; distance min(d, limit_distance) (= ceiling-only with L = w), log-n query scaling.",
        {**FULL, "limit_distance": "L_pre/8", "log_scale_base": "L_pre"},
        ("limit_distance", "log_scale_base"),
        "Su 2023, github.com/bojone/rerope",
    ),
    "leaky-rerope": Preset(
        "Every key kept; distance d below limit_distance (w), else w + (d - w)/group_size; log-n query scaling.",
        {**FULL, "limit_distance": "L_pre/8", "far_distance": "leaky", "group_size": 16, "log_scale_base": "L_pre"},
        ("limit_distance", "group_size", "log_scale_base"),
        "Su 2023, github.com/bojone/rerope",
    ),
    "string": Preset(
        "STRING: every key kept; distance d below the shift limit_distance (S), else d - S + shift_local (W): "
        "the well-trained small distances re-used for the far pairs.",
        {**FULL, "limit_distance": "L_pre/3", "far_distance": "shifted", "shift_local": 128},
        ("limit_distance", "shift_local", "log_scale_base"),
        "An et al., arXiv 2410.18745",
    ),
    "dca": Preset(
        "Dual Chunk Attention: every key kept, the text cut in chunks of c = chunk_size - local_window tokens; "
        "key j at j mod c, the query at i mod c (same chunk), min(i mod c + c, chunk_size) (previous chunk) or "
        "min(2c - 1, chunk_size) (earlier chunks): no distance past chunk_size. RoPE families.",
        {**FULL, "chunk_size": "L_pre*3/4", "local_window": "L_pre/8"},
        ("chunk_size", "local_window"),
        "An et al., arXiv 2402.17463",
    ),
    "pi": Preset(
        "Position interpolation, frozen: transformers' rope_type linear, every distance divided by rope_factor "
        "(RoPE families, like dynamic-ntk and yarn).",
        {**FULL, "rope_type": "linear"},
        ("rope_factor",),
        "Chen et al., arXiv 2306.15595",
    ),
    "dynamic-ntk": Preset(
        "Dynamic NTK: transformers' rope_type dynamic, the base grown with the input length past L_pre (a cache "
        "keeps keys rotated with the base in force when they were written: generation mixes bases).",
        {**FULL, "rope_type": "dynamic"},
        ("rope_factor",),
        "bloc97/emozilla 2023",
    ),
    "yarn": Preset(
        "YaRN, frozen: transformers' rope_type yarn (per-frequency interpolation and attention temperature).",
        {**FULL, "rope_type": "yarn"},
        ("rope_factor",),
        "Peng et al., arXiv 2309.00071",
    ),
}


@dataclass(frozen=True)
class Method:
    label: str  # as written by the user, used in tables
    name: str
    options: dict = field(default_factory=dict)

    @property
    def patched(self) -> bool:
        return PRESETS[self.name].fixes is not None

    @property
    def truncate(self) -> bool:
        """Whether the method reads only the last L_pre tokens of every input (the `truncate` baseline)."""
        return PRESETS[self.name].truncate

    def settings(self, pretraining_length: int, target_length: int | None, *layers: dict) -> Settings | None:
        """The resolved settings (None for an unpatched method): `layers` (task defaults, then the run's
        flags), then the preset, then the spec's own options; `None` values are skipped."""
        if not self.patched:
            return None
        merged: dict = {}
        for layer in (*layers, PRESETS[self.name].fixes, self.options):
            merged.update({k: v for k, v in layer.items() if v is not None})
        return Settings.resolve(pretraining_length, target_length, **merged)


def _value(key: str, text: str):
    if key in TEXT_NAMES or text.startswith("L_pre"):
        return text
    if text.lower() in ("inf", "infinity", "none"):
        return math.inf if text.lower() != "none" else None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    raise UserError(f"method option value {text!r} is not a number, 'inf' or L_pre[/N]")


def parse_method(spec: str) -> Method:
    name, *parts = spec.strip().split(":")
    if name not in PRESETS:
        raise UserError(f"unknown method {name!r}: choose from {', '.join(PRESETS)} (see lminf-eval methods)")
    options = {}
    for part in parts:
        key, eq, val = part.partition("=")
        if not eq or key not in NAMES:
            raise UserError(f"bad method option {part!r} in {spec!r}: use key=value with key in {', '.join(NAMES)}")
        if key in options:
            raise UserError(f"method option {key} given twice in {spec!r}: keep one")
        options[key] = _value(key, val)
    if options and PRESETS[name].fixes is None:
        raise UserError(f"method {name!r} takes no options")
    return Method(spec.strip(), name, options)


def parse_methods(specs: list[str]) -> list[Method]:
    """Repeated flags and/or comma-separated lists: `vanilla,lm-infinite:top_k=5:top_k_from_layer=4`."""
    methods = [parse_method(s) for spec in specs for s in spec.replace(",", " ").split()]
    if not methods:
        raise UserError("no method given: use --method vanilla,lm-infinite")
    labels = [m.label for m in methods]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise UserError(f"method {twice[0]} given twice in --method: list each method once")
    return methods


def describe(name: str) -> list[tuple[str, str]]:
    """(option, default as this method sets it) for `lminf-eval methods`."""
    fixes = PRESETS[name].fixes or {}
    return [(option, str(fixes.get(option, DEFAULTS[option]))) for option in PRESETS[name].options]


def apply_method(model, settings: Settings | None, pretraining_length: int) -> Callable:
    """Put the method at `settings` on the model (None: vanilla, allowed past its tables); returns the
    function that puts the model back exactly as it was."""
    if settings is None:
        return allow_long_vanilla(model)
    apply_lm_infinite(model, pretraining_length_override=pretraining_length, **asdict(settings))
    return remove_lm_infinite


@contextmanager
def applied(model, settings: Settings | None, pretraining_length: int):
    """The model with the method at `settings` for the block, then exactly as it was."""
    undo = apply_method(model, settings, pretraining_length)
    try:
        yield model
    finally:
        undo(model)


def allow_long_vanilla(model) -> Callable:
    """Some families cannot even run vanilla past their table size (MPT's ALiBi tensor, GPT-J's sin/cos
    table); their adapter extends those tables with the same formula, so vanilla extrapolates the way the
    paper ran it. Returns the function that puts them back."""
    family = FAMILIES.get(getattr(model.config, "model_type", None))
    return family.allow_long_vanilla(model) if family is not None else unchanged
