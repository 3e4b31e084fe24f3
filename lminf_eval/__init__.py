"""LM-Infinite for HuggingFace transformers: zero-shot length generalisation through a Λ-shaped attention
mask and a distance ceiling (Han et al., NAACL 2024), plus the harness that evaluates it."""

from .cache import LMInfiniteCache
from .patch import FAMILIES, LMInfiniteError, apply_lm_infinite, configure, remove_lm_infinite

__version__ = "0.1.0"
__all__ = [
    "FAMILIES",
    "LMInfiniteCache",
    "LMInfiniteError",
    "apply_lm_infinite",
    "configure",
    "remove_lm_infinite",
    "__version__",
]
