"""The methods compared side by side: vanilla, LM-Infinite, and the paper's ablation/baseline presets.

A method spec is `name[:key=value...]`, e.g. `lm-infinite:top_k=5:top_k_from_layer=4` or
`lm-infinite:n_global=0`, so a sweep is just several methods in one run. A method's settings are resolved by
`Settings.resolve` from, later winning: the task's paper defaults, the run's flags, the preset, the spec.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

from .errors import UserError
from .patch import apply_lm_infinite, remove_lm_infinite
from .settings import NAMES, Settings

# name -> LM-Infinite settings it fixes (None: the unmodified model)
PRESETS: dict[str, dict | None] = {
    "vanilla": None,
    "lm-infinite": {},
    "window": {"n_global": 0, "limit_distance": math.inf},  # sliding window, no starting tokens, no ceiling
    "lambda-only": {"limit_distance": math.inf},  # Λ-shaped mask without the distance ceiling
    "ceiling-only": {"n_local": math.inf},  # distance ceiling without the mask
    "truncate": None,  # vanilla on the last L_pre tokens only, re-encoded (paper Table 2 baseline)
}


@dataclass(frozen=True)
class Method:
    label: str  # as written by the user, used in tables
    name: str
    options: dict = field(default_factory=dict)

    @property
    def patched(self) -> bool:
        return PRESETS[self.name] is not None

    def settings(self, pretraining_length: int, *layers: dict) -> Settings | None:
        """The resolved settings (None for an unpatched method): `layers` (task defaults, then the run's
        flags), then the preset, then the spec's own options; `None` values are skipped."""
        if not self.patched:
            return None
        merged: dict = {}
        for layer in (*layers, PRESETS[self.name], self.options):
            merged.update({k: v for k, v in layer.items() if v is not None})
        return Settings.resolve(pretraining_length, **merged)


def _value(key: str, text: str):
    if key == "backend":
        return text
    if text.lower() in ("inf", "infinity", "none"):
        return math.inf if text.lower() != "none" else None
    try:
        return int(text)
    except ValueError:
        raise UserError(f"method option value {text!r} is not an integer or 'inf'") from None


def parse_method(spec: str) -> Method:
    name, *parts = spec.strip().split(":")
    if name not in PRESETS:
        raise UserError(f"unknown method {name!r}: choose from {', '.join(PRESETS)} (options as name:key=value)")
    options = {}
    for part in parts:
        key, eq, val = part.partition("=")
        if not eq or key not in NAMES:
            raise UserError(f"bad method option {part!r} in {spec!r}: use key=value with key in {', '.join(NAMES)}")
        options[key] = _value(key, val)
    if options and PRESETS[name] is None:
        raise UserError(f"method {name!r} takes no options")
    return Method(spec.strip(), name, options)


def parse_methods(specs: list[str]) -> list[Method]:
    """Repeated flags and/or comma-separated lists: `vanilla,lm-infinite:top_k=5:top_k_from_layer=4`."""
    methods = [parse_method(s) for spec in specs for s in spec.replace(",", " ").split()]
    if not methods:
        raise UserError("no method given: use --method vanilla,lm-infinite")
    return methods


@contextmanager
def applied(model, settings: Settings | None, pretraining_length: int):
    """The model with LM-Infinite at `settings` (None: vanilla, allowed past its tables) for the block, then
    exactly as it was."""
    if settings is not None:
        apply_lm_infinite(model, **asdict(settings), pretraining_length_override=pretraining_length)
        undo = remove_lm_infinite
    else:
        undo = allow_long_vanilla(model)
    try:
        yield model
    finally:
        undo(model)


def allow_long_vanilla(model) -> Callable:
    """Some families cannot even run vanilla past their table size (MPT's ALiBi tensor, GPT-J's sin/cos
    table); extend those tables with the same formula so vanilla extrapolates the way the paper ran it.
    Returns the function that puts them back."""
    config = model.config
    if config.model_type == "mpt" and config.max_seq_len < 1 << 20:
        saved = config.max_seq_len
        config.max_seq_len = 1 << 20
        return lambda model: setattr(model.config, "max_seq_len", saved)
    if config.model_type == "gptj":
        from transformers.models.gptj.modeling_gptj import create_sinusoidal_positions

        rotary = model.base_model.rotary_emb
        saved = rotary.embed_positions
        if saved.shape[0] < 1 << 17:
            rotary.embed_positions = create_sinusoidal_positions(1 << 17, rotary.pos_embd_dim).to(saved.device)
        return lambda model: setattr(model.base_model.rotary_emb, "embed_positions", saved)
    return lambda model: None
