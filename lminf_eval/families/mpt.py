"""MPT (ALiBi): a replacement attention forward, slopes recovered from the model's own ALiBi builder, and a
longer ALiBi table (`max_seq_len`) for vanilla past its pretraining length."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..attention.positions import Alibi
from .alibi import AlibiFamily, InlineAttention
from .base import register_family, unchanged

LONG_VANILLA_LENGTH = 1 << 20  # max_seq_len vanilla gets, to run far past its pretraining length


def mpt_slopes(base: nn.Module, n_heads: int) -> torch.Tensor:
    """MPT's slopes, recovered from the base model's own ALiBi builder (the bias of the key one step back), so
    they are what its forward uses (transformers builds them with alibi_bias_max 8, whatever the config says)."""
    return -base.build_mpt_alibi_tensor(n_heads, 2, device="cpu")[:, 0, 0].float()


class MptAttention(InlineAttention):
    def __call__(self, hidden_states, position_bias=None, cache=None, attention_mask=None, **kwargs):
        m = self.module
        b, n = hidden_states.shape[:2]
        qkv = m.Wqkv(hidden_states)
        if m.clip_qkv:
            qkv = qkv.clamp(min=-m.clip_qkv, max=m.clip_qkv)
        q, k, v = (t.reshape(b, n, m.n_heads, m.head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=2))
        if cache is not None:
            k, v = cache.update(k, v, m.layer_idx)
        out = self.attend(q, k, v, m.softmax_scale)  # [b, n, h, d]
        return m.out_proj(out.reshape(b, n, -1)), None


class Mpt(AlibiFamily):
    Attention = MptAttention

    def position(self, model: nn.Module) -> Alibi:
        return Alibi(mpt_slopes(model.base_model, model.config.n_heads))

    def allow_long_vanilla(self, model: nn.Module) -> Callable[[nn.Module], None]:
        config = model.config
        if config.max_seq_len >= LONG_VANILLA_LENGTH:
            return unchanged
        saved = config.max_seq_len
        config.max_seq_len = LONG_VANILLA_LENGTH
        return lambda model: setattr(model.config, "max_seq_len", saved)


register_family(Mpt("mpt"))
