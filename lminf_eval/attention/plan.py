"""Where each token sits in its own sequence, and LM-Infinite's two rules, written once for every backend.

A `Plan` is built once per forward (from the padding mask, or by the bounded cache) and shared by every layer:
for each query and key slot, the index of its token among its row's real tokens, and which slots are real.
Distances are counted in real tokens, so a padded row gets the logits it would get alone.

The rules (../shared/docs/method.md): `visible` is the Λ-shaped mask; `is_far` says which visible pairs are
scored at the ceiling (RoPE: the query re-rotated to L, the key to 0); `alibi_bias` is ALiBi's bias at the
capped distance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# Bytes of per-forward layout (masks, rotations) a plan keeps for reuse by later layers.
MEMO_BUDGET = 1 << 28


def visible(dist, k_idx, k_valid, n_global, n_local):
    """The Λ-mask: a real key at or before the query, inside the window or among the first `n_global` tokens.
    Arguments broadcast against each other (tensors in the kernels, scalars inside a FlexAttention mask)."""
    return k_valid & (dist >= 0) & ((dist < n_local) | (k_idx < n_global))


def is_far(dist, limit_distance):
    """Pairs at or past the ceiling: RoPE scores them as if they sat at distance `limit_distance`."""
    return dist >= limit_distance


def alibi_bias(slopes, dist, limit_distance):
    """ALiBi's additive bias at the capped distance min(dist, L)."""
    if math.isfinite(limit_distance):
        dist = torch.clamp(dist, max=int(limit_distance))
    return -slopes * dist


@dataclass
class Plan:
    """Token indices of one forward's queries and keys; shared by all layers of that forward."""

    q_idx: torch.Tensor  # [b, Q] real-token index of each query (queries are the last Q key slots)
    k_idx: torch.Tensor  # [b, K] real-token index of each key slot
    k_valid: torch.Tensor  # [b, K] False for padding and empty slots
    global_slots: int  # leading key slots scanned by every query: they hold every row's first n_global tokens
    memo: dict = field(default_factory=dict)  # per-forward layout that does not depend on the layer
    memo_bytes: int = 0

    def remember(self, key, value, nbytes: int):
        """Keep `value` for the later layers of this forward, while within MEMO_BUDGET; returns it."""
        if self.memo_bytes + nbytes <= MEMO_BUDGET:
            self.memo[key] = value
            self.memo_bytes += nbytes
        return value

    @classmethod
    def build(cls, k_idx: torch.Tensor, k_valid: torch.Tensor, n_q: int, n_global: int, head: int = 0) -> Plan:
        """Global slots = `head` (a cache's kept slots), extended to cover every slot holding a first-g token."""
        is_global = (k_valid & (k_idx < n_global)).any(0).nonzero()
        global_slots = max(head, int(is_global.max()) + 1 if is_global.numel() else 0)
        return cls(q_idx=k_idx[:, -n_q:], k_idx=k_idx, k_valid=k_valid, global_slots=global_slots)

    @classmethod
    def from_mask(cls, attention_mask, batch: int, n_q: int, n_past: int, n_global: int, device) -> Plan:
        """Keys are every slot so far (no cache, or transformers' own full cache)."""
        total = n_past + n_q
        if attention_mask is None:
            valid = torch.ones(batch, total, dtype=torch.bool, device=device)
        else:
            valid = attention_mask[:, -total:].to(device=device, dtype=torch.bool)
        return cls.build(valid.long().cumsum(1) - 1, valid, n_q, n_global)

    @classmethod
    def contiguous(cls, n: int, n_global: int, device="cpu") -> Plan:
        """One unpadded sequence of n tokens, read in one forward (benchmarks, kernel tests)."""
        return cls.from_mask(None, 1, n, 0, n_global, device)
