"""LM-Infinite's settings in one place: names, defaults, help, validation, and the backend that computes them.

Every caller (the library's `apply_lm_infinite`, `configure`, the method presets, the CLI help) goes through
`Settings.resolve`, so a default or a check is written once. A length given as `None` means "from the
pretraining length L_pre"; `math.inf` switches the window or the ceiling off (the paper's ablations).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from .errors import UserError

BACKENDS = ("auto", "blocks", "blocks-masked", "plain", "flex")


class LMInfiniteError(UserError):
    """A bad argument or an unsupported model; the message is one line and names the fix."""


@dataclass(frozen=True)
class Settings:
    """Resolved settings: every length a number (`math.inf` = off). Build with `Settings.resolve`."""

    n_global: int  # starting tokens every query sees
    n_local: float  # the local window
    limit_distance: float  # the distance ceiling
    top_k: int  # middle tokens the last query row may add (0: off)
    top_k_from_layer: int  # first layer (0-based) using them
    top_k_distance: float  # the distance they are scored at
    backend: str  # which kernel computes the attention (see BACKEND_HELP)

    @classmethod
    def resolve(cls, pretraining_length: int | None, **overrides) -> Settings:
        """Defaults filled in and every value checked; `None` values mean the default. Raises LMInfiniteError."""
        unknown = set(overrides) - set(DEFAULTS)
        if unknown:
            raise LMInfiniteError(f"unknown setting {sorted(unknown)[0]!r}: use {', '.join(DEFAULTS)}")
        value = {name: overrides.get(name) for name in DEFAULTS}
        l_pre = pretraining_length
        settings = cls(
            n_global=_count(value["n_global"], DEFAULTS["n_global"], "n_global"),
            n_local=_length(value["n_local"], l_pre, "n_local"),
            limit_distance=_length(value["limit_distance"], l_pre, "limit_distance"),
            top_k=_count(value["top_k"], DEFAULTS["top_k"], "top_k"),
            top_k_from_layer=_count(value["top_k_from_layer"], DEFAULTS["top_k_from_layer"], "top_k_from_layer"),
            top_k_distance=_length(value["top_k_distance"], (l_pre or 2) // 2, "top_k_distance"),
            backend=value["backend"] or DEFAULTS["backend"],
        )
        if settings.backend not in BACKENDS:
            raise LMInfiniteError(f"unknown backend {settings.backend!r}: use {', '.join(BACKENDS)}")
        if settings.n_global > settings.n_local:
            raise LMInfiniteError(
                f"n_global ({settings.n_global}) > n_local ({settings.n_local}): lower --n-global or raise --n-local"
            )
        return settings

    def replace(self, pretraining_length: int | None, **changes) -> Settings:
        """These settings with some changed, checked again."""
        return Settings.resolve(pretraining_length, **{**asdict(self), **changes})

    @property
    def bounded(self) -> bool:
        """Whether a cache may drop keys: a finite window and no top-k (which needs the middle keys)."""
        return math.isfinite(self.n_local) and not self.top_k


# name -> default as the user reads it; "L_pre" and "L_pre/2" are resolved against the model
DEFAULTS: dict[str, object] = {
    "n_global": 10,
    "n_local": "L_pre",
    "limit_distance": "L_pre",
    "top_k": 0,
    "top_k_from_layer": 4,
    "top_k_distance": "L_pre/2",
    "backend": "auto",
}
HELP = {
    "n_global": "Starting tokens every query sees.",
    "n_local": "Local window.",
    "limit_distance": "Distance ceiling.",
    "top_k": "Top-k middle tokens for the last query row (paper: 5 for passkey; 0: off).",
    "top_k_from_layer": "First layer (0-based) using top-k middle tokens.",
    "top_k_distance": "Distance the top-k middle tokens are scored at.",
    "backend": "Attention kernel: auto (flex on CUDA, blocks elsewhere), blocks (fused per query block), "
    "blocks-masked (the same without band calls), plain (blocks in plain fp32 math), flex (FlexAttention).",
}
NAMES = tuple(f.name for f in fields(Settings))


def describe_default(name: str, overrides: dict | None = None) -> str:
    """The default of `name` as help text shows it, with a task's own defaults (`overrides`) applied."""
    return str((overrides or {}).get(name, DEFAULTS[name]))


def _number(value, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise LMInfiniteError(f"{name} must be a number, got {value!r}") from None
    if math.isnan(number) or isinstance(value, bool):
        raise LMInfiniteError(f"{name} must be a number, got {value!r}")
    return number


def _count(value, default, name: str) -> int:
    value = default if value is None else value
    if not _number(value, name).is_integer():
        raise LMInfiniteError(f"{name} must be a whole number, got {value}")
    if int(value) < 0:
        raise LMInfiniteError(f"{name} must be >= 0, got {value}")
    return int(value)


def _length(value, default, name: str) -> float:
    if value is None:
        value = default
    if value is None:
        raise LMInfiniteError(f"{name} is required for a model whose config has no pretraining length")
    number = _number(value, name)
    if math.isinf(number) and number > 0:
        return math.inf
    if not number.is_integer() or number < 1:
        raise LMInfiniteError(f"{name} must be >= 1 (or inf), got {value}")
    return int(value)
