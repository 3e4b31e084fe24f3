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
# Query rows per block on the fused CPU path: measured here, 1024 balances kernel efficiency (bigger is
# better) against the w + block keys each block scans for w useful ones.
FUSED_BLOCK = 1024


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
    fused = query.device.type == "cpu" and _ceiling_only_in_head(cfg, position)
    if fused:  # the mask is per block, not per head; up to 1024 rows keep the fused kernel efficient, and
        # at most w/4 rows leave most of the window visible to the whole block (it then needs no mask)
        block = min(FUSED_BLOCK, int(w) // 4) if math.isfinite(w) else FUSED_BLOCK
        block = min(n_q, max(1, block), max(16, SCORE_BUDGET // max(1, b * (span + FUSED_BLOCK))))
    else:  # the dense path materialises fp32 scores for every head
        block = min(n_q, max(16, SCORE_BUDGET // max(1, b * hq * (span + 64))))
    for s in range(0, n_q, block):
        e = min(n_q, s + block)
        qb, qi = query[:, :, s:e], plan.q_idx[:, s:e]
        edge = _split_unmasked(plan, head, first + s, first + e, w) if fused and isinstance(position, Rope) else None
        if edge is not None:  # most of the window is seen by every query of the block: no mask there
            mid, edge = edge
            o1, l1 = _flash(qb, key[:, :, mid], value[:, :, mid], None, scaling)
            o2, l2 = _fused_block(
                qb,
                key[:, :, edge],
                value[:, :, edge],
                qi,
                plan.k_idx[:, edge],
                plan.k_valid[:, edge],
                cfg,
                position,
                scaling,
            )
            out[:, :, s:e] = _merge(o1, l1, o2, l2)[0].to(out.dtype)
            continue
        lo = max(head, first + s - int(w) + 1) if math.isfinite(w) else head
        keys = torch.cat((torch.arange(head), torch.arange(lo, first + e))) if lo > head else slice(0, first + e)
        kb, vb, ki, kv = key[:, :, keys], value[:, :, keys], plan.k_idx[:, keys], plan.k_valid[:, keys]
        if fused:
            out[:, :, s:e] = _fused_block(qb, kb, vb, qi, ki, kv, cfg, position, scaling)[0].to(out.dtype)
        else:
            out[:, :, s:e] = _attend(_scores(qb, kb, qi, ki, kv, cfg, position, scaling), vb).to(out.dtype)
    if cfg.top_k and layer_idx >= cfg.top_k_from_layer:
        out[:, :, -1:] = _last_row_with_top_k(query[:, :, -1:], key, value, plan, cfg, position, scaling)
    return out


def _split_unmasked(plan: Plan, head: int, q_lo: int, q_hi: int, w: float):
    """For queries in key slots [q_lo, q_hi): (slots every one of them sees with an ordinary score, the other
    slots that may be visible), or None when that split does not apply (padding, or too small to pay)."""
    m0 = max(q_hi - int(w), 0) if math.isfinite(w) else 0  # the oldest key still inside the last query's window
    if m0 >= head:  # steady state: head slots and the window's left edge stay masked
        lo = max(head, q_lo - int(w) + 1)
        edge = torch.cat((torch.arange(head), torch.arange(lo, m0), torch.arange(q_lo, q_hi)))
    elif m0 == 0:  # window not yet full: every earlier key is near every query
        edge = torch.arange(q_lo, q_hi)
    else:
        return None
    if q_lo - m0 < max(1, (q_hi - q_lo) // 2) or not bool(plan.k_valid[:, m0:q_lo].all()):
        return None
    return slice(m0, q_lo), edge.to(plan.k_idx.device)


def _ceiling_only_in_head(cfg: Settings, position) -> bool:
    """With w <= L (or no ceiling) a key past the ceiling is a global key: the window needs no second score."""
    return isinstance(position, Alibi) or not math.isfinite(cfg.limit_distance) or cfg.n_local <= cfg.limit_distance


def _flash(q, k, v, mask, scaling):
    """PyTorch's fused CPU attention (flash-style, fp32 accumulation, native GQA) with its log-sum-exp."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=mask, scale=scaling
    )


def _fused_block(q, k, v, qi, ki, kvalid, cfg: Settings, position, scaling) -> torch.Tensor:
    """One query block through the fused kernel -> (out, lse). The mask is built once per block, not per
    head; RoPE keys past the ceiling (global keys only, see `_ceiling_only_in_head`) form a second, small
    branch merged by log-sum-exp."""
    dist = qi.int()[:, :, None] - ki.int()[:, None, :]  # [b, n, K]; int32 halves the mask-building traffic
    visible = (dist >= 0) & ((dist < cfg.n_local) | (ki < cfg.n_global)[:, None, :])
    if not bool(kvalid.all()):
        visible &= kvalid[:, None, :]
    limit = cfg.limit_distance
    if isinstance(position, Alibi):
        d = dist.clamp(max=int(limit)) if math.isfinite(limit) else dist
        bias = -position.slopes.to(q.device).view(1, -1, 1, 1) * d[:, None]
        return _flash(q, k, v, bias.masked_fill_(~visible[:, None], -math.inf).to(q.dtype), scaling)
    cols = torch.empty(0, dtype=torch.long)
    if math.isfinite(limit):  # keys past the ceiling for some query: global keys only (w <= L), found in O(K)
        cols = (
            ((ki < cfg.n_global) & kvalid & (qi.max(1, keepdim=True).values - ki >= limit)).any(0).nonzero().squeeze(1)
        )
    if cols.numel():
        far = visible[..., cols] & (dist[..., cols] >= limit)
        visible[..., cols] &= ~far
    mask = torch.where(visible, 0.0, -math.inf).to(q.dtype)[:, None]
    out, lse = _flash(q, k, v, mask, scaling)
    if not cols.numel():
        return out, lse
    b, hq, n, _ = q.shape
    s2 = _raw_scores(position.rotate(q, limit - qi), position.rotate(k[:, :, cols], -ki[:, cols]), scaling)
    s2 = s2.masked_fill_(~far[:, None, None], -math.inf)
    # a row with no near key is a padding query (a real one always sees itself), so its far branch is empty too
    return _merge(out, lse, _attend(s2, v[:, :, cols]), torch.logsumexp(s2, dim=-1).view(b, hq, n))


def _merge(o1, l1, o2, l2):
    """Combine two softmax-attention results over disjoint key sets from their log-sum-exps."""
    top = torch.maximum(l1, l2)
    w1, w2 = (l1 - top).exp().nan_to_num_(0.0), (l2 - top).exp().nan_to_num_(0.0)
    total = w1 + w2
    out = (o1.float() * w1[..., None] + o2.float() * w2[..., None]) / total.clamp_min(1e-30)[..., None]
    return out, top + total.log()


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
