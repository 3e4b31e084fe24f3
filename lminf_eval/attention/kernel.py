"""The Λ-shaped attention of LM-Infinite in O(n·(g+w)) time and memory, for any batch layout.

Keys arrive in slot order: `n_head_slots` leading slots that are always scanned (they hold every row's first
g real tokens), then a contiguous run in which slot distance equals token distance (true for left or right
padding). Each block of queries therefore needs only the head plus the last w slots before it; the exact
visibility, distance ceiling and padding are decided per pair from the real-token indices in the plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .positions import Alibi, Rope

# Upper bound on elements of one block's fp32 score tensor (b x heads x block x keys): ~64 MB.
SCORE_BUDGET = 1 << 24


@dataclass
class Plan:
    """Where every query and key sits in its own sequence; shared by all layers of one forward."""

    q_idx: torch.Tensor  # [b, Q] real-token index of each query (queries are the last Q key slots)
    k_idx: torch.Tensor  # [b, K] real-token index of each key slot
    k_valid: torch.Tensor  # [b, K] False for padding and empty slots
    n_head_slots: int  # leading key slots scanned by every query


@dataclass(frozen=True)
class Settings:
    n_global: int
    n_local: float  # math.inf allowed
    limit_distance: float  # math.inf allowed
    top_k: int = 0
    top_k_from_layer: int = 4
    top_k_distance: float = 0


def lambda_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    plan: Plan,
    cfg: Settings,
    position: Rope | Alibi,
    scaling: float,
    layer_idx: int = 0,
) -> torch.Tensor:
    """query [b, hq, Q, d], key/value [b, hk, K, d] -> output [b, hq, Q, dv] in query's dtype."""
    b, hq, n_q, _ = query.shape
    n_k = key.shape[2]
    head = min(plan.n_head_slots, n_k)
    first = n_k - n_q  # key slot of the first query
    w = cfg.n_local
    out = query.new_empty(b, hq, n_q, value.shape[-1])
    span = head + (min(w, n_k) if math.isfinite(w) else n_k)
    block = max(16, min(n_q, SCORE_BUDGET // max(1, b * hq * (span + 64))))
    for s in range(0, n_q, block):
        e = min(n_q, s + block)
        hi = first + e
        lo = max(head, first + s - int(w) + 1) if math.isfinite(w) else head
        if lo <= head:
            sel = slice(0, hi)
            kb, vb, ki, kv = key[:, :, sel], value[:, :, sel], plan.k_idx[:, sel], plan.k_valid[:, sel]
        else:
            kb = torch.cat((key[:, :, :head], key[:, :, lo:hi]), 2)
            vb = torch.cat((value[:, :, :head], value[:, :, lo:hi]), 2)
            ki = torch.cat((plan.k_idx[:, :head], plan.k_idx[:, lo:hi]), 1)
            kv = torch.cat((plan.k_valid[:, :head], plan.k_valid[:, lo:hi]), 1)
        scores = _scores(query[:, :, s:e], kb, plan.q_idx[:, s:e], ki, kv, cfg, position, scaling)
        out[:, :, s:e] = _attend(scores, vb).to(out.dtype)
    if cfg.top_k and layer_idx >= cfg.top_k_from_layer:
        out[:, :, -1:] = _last_row_with_top_k(query[:, :, -1:], key, value, plan, cfg, position, scaling)
    return out


def _grouped(q: torch.Tensor, n_kv: int) -> torch.Tensor:
    """[b, hq, n, d] -> [b, hk, G*n, d]: GQA as a batched matmul, without repeating K/V."""
    b, hq, n, d = q.shape
    return q.reshape(b, n_kv, (hq // n_kv) * n, d)


def _raw_scores(q: torch.Tensor, k: torch.Tensor, scaling: float) -> torch.Tensor:
    """fp32 q·k for every pair: [b, hk, G, n, K]."""
    b, hq, n, _ = q.shape
    hk = k.shape[1]
    s = torch.matmul(_grouped(q.float(), hk), k.float().transpose(-1, -2)) * scaling
    return s.view(b, hk, hq // hk, n, k.shape[2])


def _scores(q, k, qi, ki, kvalid, cfg: Settings, position, scaling) -> torch.Tensor:
    """Masked LM-Infinite logits for one block: [b, hk, G, n, K] fp32, -inf where not visible."""
    dist = (qi[:, :, None] - ki[:, None, :])[:, None, None]  # [b, 1, 1, n, K]
    limit = cfg.limit_distance
    s = _raw_scores(q, k, scaling)
    if isinstance(position, Alibi):
        d = dist.clamp(max=int(limit)) if math.isfinite(limit) else dist
        s = s - position.slopes.to(s.device).view(1, k.shape[1], -1, 1, 1) * d
    elif math.isfinite(limit):
        far = dist >= limit
        cols = far.flatten(0, 3).any(0).nonzero().squeeze(1)  # keys past the ceiling for some query
        if cols.numel():  # only those need the second, re-rotated product (usually just the g global keys)
            q_far = position.rotate(q, limit - qi)
            k_raw = position.rotate(k[:, :, cols], -ki[:, cols])
            s[..., cols] = torch.where(far[..., cols], _raw_scores(q_far, k_raw, scaling), s[..., cols])
    visible = (
        kvalid[:, None, None, None, :]
        & (dist >= 0)
        & ((ki < cfg.n_global)[:, None, None, None, :] | (dist < cfg.n_local))
    )
    return s.masked_fill_(~visible, -math.inf)


def _attend(scores: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax over keys (rows with no visible key, i.e. padding queries, read zeros), then values."""
    b, hk, g, n, k = scores.shape
    p = torch.softmax(scores, dim=-1).nan_to_num_(0.0)
    o = torch.matmul(p.view(b, hk, g * n, k), v.float())
    return o.view(b, hk * g, n, v.shape[-1])


def _last_row_with_top_k(q, key, value, plan: Plan, cfg: Settings, position, scaling) -> torch.Tensor:
    """The last query row re-attended over all keys: its Λ-visible keys plus the top-k middle keys, these
    scored as if they sat at distance D (method.md, optional top-k)."""
    qi = plan.q_idx[:, -1:]
    s = _scores(q, key, qi, plan.k_idx, plan.k_valid, cfg, position, scaling)
    dist = (qi - plan.k_idx)[:, None, None, None, :]
    middle = plan.k_valid[:, None, None, None, :] & (plan.k_idx >= cfg.n_global)[:, None, None, None, :]
    middle = middle & (dist >= cfg.n_local) & (dist >= 0)
    if not bool(middle.any()):
        return _attend(s, value).to(q.dtype)
    d = cfg.top_k_distance
    if isinstance(position, Alibi):
        mid = _raw_scores(q, key, scaling) - position.slopes.to(s.device).view(1, key.shape[1], -1, 1, 1) * d
    else:
        mid = _raw_scores(position.rotate(q, d - qi), position.rotate(key, -plan.k_idx), scaling)
    mid = mid.masked_fill_(~middle, -math.inf)
    top, where = mid.topk(min(cfg.top_k, mid.shape[-1]), dim=-1)
    s.scatter_(-1, where, top)  # middle keys are never Λ-visible, so nothing is overwritten
    return _attend(s, value).to(q.dtype)
