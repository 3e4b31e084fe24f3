"""Bloom (ALiBi): a replacement attention forward (Bloom fuses q, k, v per head) and its standard slopes."""

from __future__ import annotations

import torch
from torch import nn

from ..attention.positions import Alibi
from .alibi import AlibiFamily, InlineAttention
from .base import register_family


def bloom_slopes(n_heads: int) -> torch.Tensor:
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

    return _get_alibi_slopes(n_heads, torch.device("cpu")).float()


class BloomAttention(InlineAttention):
    def __call__(self, hidden_states, residual, alibi=None, attention_mask=None, layer_past=None, **kwargs):
        from transformers.models.bloom.modeling_bloom import dropout_add

        m = self.module
        b, n = hidden_states.shape[:2]
        # Bloom fuses q, k, v per head: [b, n, heads * 3 * head_dim]
        fused = m.query_key_value(hidden_states).view(b, n, m.num_heads, 3, m.head_dim)
        q, k, v = (fused[..., i, :].transpose(1, 2) for i in range(3))
        if layer_past is not None:
            k, v = layer_past.update(k, v, m.layer_idx)
        out = m.dense(self.attend(q, k, v, m.inv_norm_factor).reshape(b, n, -1))
        return dropout_add(out, residual, m.hidden_dropout, m.training), None


class Bloom(AlibiFamily):
    Attention = BloomAttention

    def position(self, model: nn.Module) -> Alibi:
        return Alibi(bloom_slopes(model.config.n_head))


register_family(Bloom("bloom"))
