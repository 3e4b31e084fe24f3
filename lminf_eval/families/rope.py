"""Rotary (RoPE) families: attention through transformers' attention registry, positions from the model's own
rotary embedding (`base_model.rotary_emb.inv_freq`, any rope scaling already applied). A new RoPE family that
transformers builds this way is one name in `NAMES`."""

from __future__ import annotations

from torch import nn

from ..attention.positions import Rope
from ..errors import LMInfiniteError
from .base import Family, register_family

NAMES = ("llama", "mistral", "qwen2", "qwen3", "gpt_neox", "phi")


class RopeFamily(Family):
    kind = "rope"

    def position(self, model: nn.Module) -> Rope:
        rotary = getattr(model.base_model, "rotary_emb", None)
        if rotary is not None and hasattr(rotary, "inv_freq"):
            return Rope(source=rotary, fixed_inv_freq=None, interleaved=False)
        raise LMInfiniteError(f"cannot find the rotary embedding of {model.config.model_type}")


for name in NAMES:
    register_family(RopeFamily(name))
