"""GPT-J: rotary through transformers' attention registry, but it rotates interleaved pairs and keeps only a
sin/cos table of max_position_embeddings rows (no `inv_freq`), which a patched model grows on demand and
vanilla grows up front to run past it."""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
from torch import nn

from ..attention.positions import Rope
from .base import register_family
from .rope import RopeFamily

LONG_VANILLA_ROWS = 1 << 17  # rows of the sin/cos table vanilla gets, to run far past its pretraining length


def gptj_inv_freq(dim: int) -> torch.Tensor:
    """GPT-J keeps only a sin/cos table; this is the frequency vector that table was built from."""
    return 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.int64) / dim))


def _growing_rotary_forward(self, x: torch.Tensor, position_ids: torch.LongTensor):
    """GPT-J reads sin/cos from a table of max_position_embeddings rows; grow it (same values) on demand."""
    from transformers.models.gptj.modeling_gptj import create_sinusoidal_positions

    if torch.compiler.is_compiling():  # (no host read in a compiled step: the same table rows, computed)
        inv_freq = gptj_inv_freq(self.pos_embd_dim).to(position_ids.device)
        angles = position_ids.float()[..., None] * inv_freq
        return angles.sin().to(x.dtype), angles.cos().to(x.dtype)
    needed = int(position_ids.max()) + 1
    if needed > self.embed_positions.shape[0]:
        table = create_sinusoidal_positions(max(needed, 2 * self.embed_positions.shape[0]), self.pos_embd_dim)
        self.embed_positions = table.to(self.embed_positions.device)
    return type(self).forward(self, x, position_ids)


class GptJ(RopeFamily):
    def position(self, model: nn.Module) -> Rope:
        rotary = model.base_model.rotary_emb
        return Rope(source=None, fixed_inv_freq=gptj_inv_freq(rotary.pos_embd_dim), interleaved=True)

    def install(self, model: nn.Module, patch, config) -> None:
        rotary = model.base_model.rotary_emb
        patch.restore_later(rotary, "embed_positions")  # the grown table goes back to its original size
        patch.set(rotary, "forward", types.MethodType(_growing_rotary_forward, rotary))

    def allow_long_vanilla(self, model: nn.Module) -> Callable[[nn.Module], None]:
        from transformers.models.gptj.modeling_gptj import create_sinusoidal_positions

        rotary = model.base_model.rotary_emb
        saved = rotary.embed_positions
        if saved.shape[0] < LONG_VANILLA_ROWS:
            table = create_sinusoidal_positions(LONG_VANILLA_ROWS, rotary.pos_embd_dim)
            rotary.embed_positions = table.to(saved.device)
        return lambda model: setattr(model.base_model.rotary_emb, "embed_positions", saved)


register_family(GptJ("gptj"))
