"""What a method computes, in one place: names, defaults, help, validation, and the backend that computes it.

Every caller (the library's `apply_lm_infinite`, `configure`, the method presets, the CLI help) goes through
`Settings.resolve`, so a default or a check is written once. A length given as `None` means its default, a
string "L_pre" or "L_pre/4" is read against the pretraining length, and `math.inf` switches the window or the
ceiling off (the paper's ablations). The peer methods are settings too (docs/methods.md): how far
pairs are placed (`far_distance`), a log-n query scale, and transformers' own RoPE scaling (`rope_type`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from .errors import LMInfiniteError

BACKENDS = ("auto", "blocks", "blocks-masked", "plain", "flex", "flash-window")
# where a visible pair at or past the ceiling L is scored (rules in attention/plan.py `far_positions`)
FAR_DISTANCES = ("ceiling", "cache", "grouped", "leaky", "shifted")
# transformers' rope_parameters types we set (none: the model's own)
ROPE_TYPES = ("none", "linear", "dynamic", "yarn")


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
    far_distance: str  # where far pairs are scored (FAR_DISTANCES)
    group_size: int  # grouped/leaky: far distances grow 1/group_size as fast
    log_scale_base: float  # queries scaled by max(1, ln(i+1)/ln(base)); 0: off
    rope_type: str  # transformers RoPE scaling set on the model (ROPE_TYPES)
    rope_factor: float  # its factor s (1.0 with rope_type none)
    shift_local: int = 128  # shifted (STRING): far distances start again at this W
    chunk_size: float = math.inf  # dual chunk attention (DCA): every distance capped here (inf: off)
    local_window: int = 0  # DCA: chunks are chunk_size - local_window tokens long (0 when DCA is off)

    @classmethod
    def resolve(cls, pretraining_length: int | None, target_length: int | None = None, **overrides) -> Settings:
        """Defaults filled in and every value checked; `None` values mean the default. `target_length`: the
        longest input the run reads, which the RoPE scaling factor defaults to (over L_pre). Raises
        LMInfiniteError."""
        unknown = set(overrides) - set(DEFAULTS)
        if unknown:
            raise LMInfiniteError(f"unknown setting {sorted(unknown)[0]!r}: use {', '.join(DEFAULTS)}")
        value = {name: overrides.get(name) for name in DEFAULTS}
        asked_limit = value["limit_distance"]
        if value["far_distance"] == "cache":  # StreamingLLM: everything past the window is re-indexed
            value["limit_distance"] = value["n_local"]
        l_pre = pretraining_length
        rope_type = _choice(value["rope_type"], "rope_type", ROPE_TYPES)
        chunk_size = _length(value["chunk_size"], DEFAULTS["chunk_size"], l_pre, "chunk_size")
        local_window = 0  # (DCA off)
        if math.isfinite(chunk_size):
            local_window = _length(value["local_window"], DEFAULTS["local_window"], l_pre, "local_window", zero=True)
        elif value["local_window"] not in (None, 0):
            raise LMInfiniteError("local_window applies to dual chunk attention only: set chunk_size (dca) or drop it")
        settings = cls(
            n_global=_count(value["n_global"], DEFAULTS["n_global"], "n_global"),
            n_local=_length(value["n_local"], "L_pre", l_pre, "n_local"),
            limit_distance=_length(value["limit_distance"], "L_pre", l_pre, "limit_distance"),
            top_k=_count(value["top_k"], DEFAULTS["top_k"], "top_k"),
            top_k_from_layer=_count(value["top_k_from_layer"], DEFAULTS["top_k_from_layer"], "top_k_from_layer"),
            top_k_distance=_length(value["top_k_distance"], "L_pre/2", l_pre or 2, "top_k_distance"),
            backend=_choice(value["backend"], "backend", BACKENDS),
            far_distance=_choice(value["far_distance"], "far_distance", FAR_DISTANCES),
            group_size=_count(value["group_size"], DEFAULTS["group_size"], "group_size"),
            log_scale_base=_length(value["log_scale_base"], 0, l_pre, "log_scale_base", zero=True),
            rope_type=rope_type,
            rope_factor=_factor(value["rope_factor"], rope_type, l_pre, target_length),
            shift_local=_count(value["shift_local"], DEFAULTS["shift_local"], "shift_local"),
            chunk_size=chunk_size,
            local_window=local_window,
        )
        if settings.dual_chunk:
            _check_dual_chunk(settings)
        if settings.n_global > settings.n_local:
            raise LMInfiniteError(
                f"n_global ({settings.n_global}) > n_local ({settings.n_local}): lower --n-global or raise --n-local"
            )
        if settings.group_size < 1:
            raise LMInfiniteError("group_size must be >= 1")
        if settings.far_distance == "cache" and not math.isfinite(settings.n_local):
            raise LMInfiniteError("far_distance=cache (StreamingLLM) needs a finite n_local")
        if settings.far_distance == "cache" and asked_limit is not None:
            if _length(asked_limit, "L_pre", l_pre, "limit_distance") != settings.n_local:
                raise LMInfiniteError(
                    "limit_distance does not apply with far_distance=cache (StreamingLLM re-indexes far keys "
                    "inside its cache): drop it"
                )
        if settings.far_distance == "shifted" and not settings.shift_local < settings.limit_distance:
            raise LMInfiniteError(
                f"shift_local ({settings.shift_local}) must be below limit_distance ({settings.limit_distance}): "
                "STRING re-uses distances W..d-S+W, lower shift_local or raise limit_distance"
            )
        if settings.log_scale_base == 1:
            raise LMInfiniteError("log_scale_base must be 0 (off) or >= 2")
        return settings

    def replace(self, pretraining_length: int | None, **changes) -> Settings:
        """These settings with some changed, checked again."""
        merged = {**asdict(self), **changes}
        if merged["far_distance"] == "cache" and "limit_distance" not in changes:
            merged["limit_distance"] = None  # (follows n_local)
        return Settings.resolve(pretraining_length, **merged)

    @property
    def bounded(self) -> bool:
        """Whether a cache may drop keys: a finite window and no top-k (which needs the middle keys)."""
        return math.isfinite(self.n_local) and not self.top_k

    @property
    def dual_chunk(self) -> bool:
        """Whether positions follow Dual Chunk Attention (a finite chunk_size): its own branch of the blocks kernel."""
        return math.isfinite(self.chunk_size)

    @property
    def changes_attention(self) -> bool:
        """Whether attention differs from the model's own (else only the RoPE scaling, if any, is applied)."""
        finite = math.isfinite(self.n_local) or math.isfinite(self.limit_distance) or self.dual_chunk
        return finite or bool(self.top_k) or bool(self.log_scale_base)


# the backends that compute dual chunk attention (the blocks kernel's DCA branch)
DUAL_CHUNK_BACKENDS = ("auto", "blocks", "blocks-masked", "plain")


def _check_dual_chunk(settings: Settings) -> None:
    """One-line errors for what dual chunk attention does not combine with."""
    if not settings.local_window < settings.chunk_size:
        raise LMInfiniteError(
            f"local_window ({settings.local_window}) must be below chunk_size ({settings.chunk_size}): DCA's chunks "
            "are chunk_size - local_window tokens long, lower local_window or raise chunk_size"
        )
    for name, why in (("n_local", "keeps every key"), ("limit_distance", "places every pair by its chunk")):
        if math.isfinite(getattr(settings, name)):
            raise LMInfiniteError(f"dual chunk attention {why}: {name} does not apply, drop it (or use inf)")
    if settings.top_k:
        raise LMInfiniteError("dual chunk attention keeps every key, so top_k has no middle tokens: set top_k=0")
    if settings.backend not in DUAL_CHUNK_BACKENDS:
        raise LMInfiniteError(
            f"dual chunk attention runs on the blocks kernel: backend {settings.backend} does not compute it, "
            f"use one of {', '.join(DUAL_CHUNK_BACKENDS)}"
        )


# name -> default as the user reads it; "L_pre" and "L_pre/2" are resolved against the model
DEFAULTS: dict[str, object] = {
    "n_global": 10,
    "n_local": "L_pre",
    "limit_distance": "L_pre",
    "top_k": 0,
    "top_k_from_layer": 4,
    "top_k_distance": "L_pre/2",
    "backend": "auto",
    "far_distance": "ceiling",
    "group_size": 8,
    "log_scale_base": 0,
    "rope_type": "none",
    "rope_factor": "target/L_pre",
    "shift_local": 128,
    "chunk_size": math.inf,
    "local_window": "L_pre/8",
}
HELP = {
    "n_global": "Starting tokens every query sees.",
    "n_local": "Local window.",
    "limit_distance": "Distance ceiling.",
    "top_k": "Top-k middle tokens for the last query row (paper: 5 for passkey; 0: off).",
    "top_k_from_layer": "First layer (0-based) using top-k middle tokens.",
    "top_k_distance": "Distance the top-k middle tokens are scored at.",
    "backend": "Attention kernel: auto (flash-window on CUDA where it applies, else flex there, blocks elsewhere), "
    "blocks (fused per query block), blocks-masked (the same without band calls), plain (blocks in plain fp32 "
    "math), flex (FlexAttention), flash-window (sliding-window flash call + far branch; contiguous inputs, w <= L).",
    "far_distance": "Where a visible pair at or past the ceiling is scored: ceiling (at L: LM-Infinite, ReRoPE), "
    "cache (its index distance inside the kept cache; the ceiling is then the window: StreamingLLM), "
    "grouped (Self-Extend's grouped positions), "
    "leaky (L + (d - L)/group_size: Leaky ReRoPE), "
    "shifted (d - L + shift_local: STRING).",
    "group_size": "grouped/leaky: far distances grow 1/group_size as fast (Self-Extend's G, Leaky ReRoPE's k).",
    "log_scale_base": "Queries scaled by max(1, ln(i+1)/ln(base)) (ReRoPE's log-n scaling; 0: off).",
    "rope_type": "transformers' RoPE scaling set on the model: none, linear (PI), dynamic (dynamic NTK), yarn.",
    "rope_factor": "Its factor s (default: the run's longest length / L_pre, at least 1).",
    "shift_local": "shifted (STRING): far pairs (d >= limit_distance S) scored at d - S + shift_local (W < S).",
    "chunk_size": "Dual chunk attention (DCA) on: no distance exceeds it; inf: off.",
    "local_window": "DCA: chunks are chunk_size - local_window tokens long (ChunkLlama's local_window_size; "
    "not n_local).",
}
NAMES = tuple(f.name for f in fields(Settings))
# set through a method's options (`--method self-extend:group_size=16`), not as flags of every command
METHOD_ONLY = (
    "far_distance", "group_size", "log_scale_base", "rope_type", "rope_factor", "shift_local", "chunk_size",
    "local_window",
)  # fmt: skip
FLAG_NAMES = tuple(name for name in NAMES if name not in METHOD_ONLY)
TEXT_NAMES = ("backend", "far_distance", "rope_type")


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


MAX_TOKENS = 1 << 40  # a count or length above this is a typo, not a text (and would overflow int64 maths)


def _count(value, default, name: str) -> int:
    value = default if value is None else value
    if not _number(value, name).is_integer():
        raise LMInfiniteError(f"{name} must be a whole number, got {value}")
    if int(value) < 0:
        raise LMInfiniteError(f"{name} must be >= 0, got {value}")
    if int(value) > MAX_TOKENS:
        raise LMInfiniteError(f"{name} must be at most 2^40, got {value:g}")
    return int(value)


def _choice(value, name: str, choices: tuple) -> str:
    value = DEFAULTS[name] if value is None else value
    if value not in choices:
        raise LMInfiniteError(f"unknown {name} {value!r}: use {', '.join(choices)}")
    return value


def _length(value, default, l_pre: int | None, name: str, zero: bool = False) -> float:
    """A token count: a number, inf, or "L_pre", "L_pre/N", "L_pre-N", "L_pre*M/N" read against the pretraining
    length (divisions round down)."""
    value = default if value is None else value
    if isinstance(value, str) and value.startswith("L_pre"):
        if l_pre is None:
            raise LMInfiniteError(f"{name} is required for a model whose config has no pretraining length")
        times, op, number = "1", value[5:6], value[6:]
        if op == "*":  # L_pre*M/N
            times, op, number = value[6:].partition("/")
        bad = op and (op not in "/-" or not number.isdigit() or (op == "/" and int(number) == 0))
        if bad or not times.isdigit() or (value[5:6] == "*" and op != "/"):
            raise LMInfiniteError(f"{name}: cannot read {value!r}; use L_pre, L_pre/N, L_pre-N or L_pre*M/N")
        value = l_pre * int(times) // int(number) if op == "/" else l_pre - int(number or 0)
    number = _number(value, name)
    if math.isinf(number) and number > 0:
        return math.inf
    if not number.is_integer() or number < (0 if zero else 1):
        raise LMInfiniteError(f"{name} must be >= {0 if zero else 1} (or inf), got {value}")
    if number > MAX_TOKENS:
        raise LMInfiniteError(f"{name} must be at most 2^40 (or inf), got {number:g}")
    return int(number)


def _factor(value, rope_type: str, l_pre: int | None, target_length: int | None) -> float:
    if rope_type == "none":
        if value not in (None, 1, 1.0):
            raise LMInfiniteError("rope_factor needs a rope_type (linear, dynamic or yarn)")
        return 1.0
    if value is None:
        if not (l_pre and target_length):
            raise LMInfiniteError("rope_factor is required here: give it, e.g. rope_factor=4")
        value = max(1.0, target_length / l_pre)
    number = _number(value, "rope_factor")
    if not 1 <= number < math.inf:
        raise LMInfiniteError(f"rope_factor must be a number >= 1, got {value}")
    return number
