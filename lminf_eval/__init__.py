"""LM-Infinite for HuggingFace transformers: zero-shot length generalisation through a Λ-shaped attention
mask and a distance ceiling (Han et al., NAACL 2024), plus the harness that evaluates it."""

from .cache import LMInfiniteCache
from .errors import LMInfiniteError
from .patch import FAMILIES, apply_lm_infinite, configure, register_attention, remove_lm_infinite, use_implementation
from .settings import Settings

__version__ = "0.1.0"
__all__ = [
    "FAMILIES",
    "LMInfiniteCache",
    "LMInfiniteError",
    "Settings",
    "apply_lm_infinite",
    "configure",
    "register_attention",
    "remove_lm_infinite",
    "use_implementation",
    "__version__",
]
