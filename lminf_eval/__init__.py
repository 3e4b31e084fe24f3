"""LM-Infinite for HuggingFace transformers: zero-shot length generalisation through a Λ-shaped attention
mask and a distance ceiling (Han et al., NAACL 2024), plus the harness that evaluates it.

The public names load on first use (PEP 562), so `lminf-eval --help` answers without importing torch."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_LAZY = {
    "LMInfiniteCache": "cache",
    "LMInfiniteError": "errors",
    "LMInfiniteRingCache": "ring_cache",
    "decode_step": "ring_cache",
    "FAMILIES": "families",
    "Family": "families",
    "register_family": "families",
    "apply_lm_infinite": "patch",
    "configure": "patch",
    "register_attention": "patch",
    "remove_lm_infinite": "patch",
    "use_implementation": "patch",
    "Settings": "settings",
}

if TYPE_CHECKING:
    from .cache import LMInfiniteCache
    from .errors import LMInfiniteError
    from .families import FAMILIES, Family, register_family
    from .patch import (
        apply_lm_infinite,
        configure,
        register_attention,
        remove_lm_infinite,
        use_implementation,
    )
    from .ring_cache import LMInfiniteRingCache, decode_step
    from .settings import Settings


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "FAMILIES",
    "Family",
    "LMInfiniteCache",
    "LMInfiniteError",
    "LMInfiniteRingCache",
    "Settings",
    "apply_lm_infinite",
    "configure",
    "decode_step",
    "register_attention",
    "register_family",
    "remove_lm_infinite",
    "use_implementation",
    "__version__",
]
