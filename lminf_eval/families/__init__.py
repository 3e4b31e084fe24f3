"""Model-family adapters: everything the library needs of one architecture, found through one registry
(`FAMILIES`, `family_of`, `register_family`). Built in: the RoPE families (rope.py: one line each), GPT-J
(gptj.py), MPT (mpt.py) and Bloom (bloom.py); alibi.py holds what ALiBi families share."""

from . import bloom, gptj, mpt, rope  # noqa: F401  (each registers its families)
from .base import FAMILIES, Family, family_of, register_family

__all__ = ["FAMILIES", "Family", "family_of", "register_family"]
