"""Where each token sits in its own sequence, and LM-Infinite's two rules, written once for every backend.

A `Plan` is built once per forward (from the padding mask, or by the bounded cache) and shared by every layer:
for each query and key slot, the index of its token among its row's real tokens, and which slots are real.
Distances are counted in real tokens, so a padded row gets the logits it would get alone.

The rules (docs/method.md, methods.md): `visible` is the Λ-shaped mask; `is_far` says which visible
pairs are past the ceiling; `far_positions` says where such a pair is scored (RoPE: the query re-rotated to
one position, the key to another; LM-Infinite puts them at L and 0); `alibi_bias` is ALiBi's bias at the
distance so chosen; `log_scale` is the optional log-n query scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import LMInfiniteError
from ..settings import FAR_DISTANCES

# Bytes of per-forward layout (masks, rotations) a plan keeps for reuse by later layers.
MEMO_BUDGET = 1 << 28


def visible(dist, k_idx, k_valid, n_global, n_local):
    """The Λ-mask: a real key at or before the query, inside the window or among the first `n_global` tokens.
    Arguments broadcast against each other (tensors in the kernels, scalars inside a FlexAttention mask)."""
    return k_valid & (dist >= 0) & ((dist < n_local) | (k_idx < n_global))


def is_far(dist, limit_distance):
    """Pairs at or past the ceiling: RoPE scores them as if they sat at distance `limit_distance`."""
    return dist >= limit_distance


def far_positions(q_idx, k_idx, settings):
    """The positions a far pair (query at token q_idx, key at k_idx) is scored at; its distance is their
    difference. Per `settings.far_distance` (L = limit_distance, G = group_size, methods.md section 2):
    - ceiling: L and 0 (LM-Infinite, ReRoPE: every far pair at distance L);
    - cache: the query's slot in the kept cache, min(i, g + w - 1), and the key's own j (StreamingLLM);
    - grouped: floor(i/G) + L - floor(L/G) and floor(j/G) (Self-Extend, its window W = L);
    - leaky: i/G + L - L/G and j/G, i.e. distance L + (d - L)/G (Leaky ReRoPE).
    - shifted: i - L + W and j, i.e. distance d - L + W, W = shift_local (STRING: the well-trained small
      distances W.. re-used for the far pairs, its shift S = L).
    Contract, which every rule must keep: a key's far position depends on the key alone, a query's on the
    query alone, so the backends turn keys once per layer and queries once per block, never per pair.
    Works elementwise on tensors and inside a FlexAttention score_mod; a rule it does not know is an error."""
    rule, limit, group = settings.far_distance, settings.limit_distance, settings.group_size
    if rule == "ceiling":
        return q_idx * 0 + int(limit), k_idx * 0
    if rule == "cache":
        return torch.clamp(q_idx, max=settings.n_global + int(settings.n_local) - 1), k_idx
    if rule == "grouped":
        return q_idx // group + int(limit) - int(limit) // group, k_idx // group
    if rule == "leaky":
        return q_idx / group + limit - limit / group, k_idx / group
    if rule == "shifted":
        return q_idx - int(limit) + settings.shift_local, k_idx
    raise LMInfiniteError(f"unknown far_distance {rule!r}: use one of {', '.join(FAR_DISTANCES)}")


def alibi_bias(slopes, q_idx, k_idx, settings):
    """ALiBi's additive bias, -slope * distance, far pairs at the distance `far_positions` gives them."""
    dist = q_idx - k_idx
    if math.isfinite(settings.limit_distance):
        q_pos, k_pos = far_positions(q_idx, k_idx, settings)
        dist = torch.where(is_far(dist, settings.limit_distance), q_pos - k_pos, dist)
    return -slopes * dist


def log_scale(q_idx: torch.Tensor, base: float) -> torch.Tensor:
    """ReRoPE's / Self-Extend's log-n query scale max(1, ln(i + 1) / ln(base)) per query token."""
    return torch.clamp(torch.log(q_idx.double() + 1) / math.log(base), min=1.0)


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

    def is_contiguous(self) -> bool:
        """Every key slot real and slot j holding token j in every row (no padding, no cache gaps): the plan of
        an unpadded prompt, whose masks are arithmetic on positions. Worked out once per forward (one host sync)."""
        if "contiguous" not in self.memo:
            n_k = self.k_idx.shape[1]
            slots = torch.arange(n_k, device=self.k_idx.device)
            self.memo["contiguous"] = bool(self.k_valid.all()) and bool((self.k_idx == slots).all())
        return self.memo["contiguous"]

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
