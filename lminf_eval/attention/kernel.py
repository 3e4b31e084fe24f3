"""The Λ-shaped attention of LM-Infinite in O(n·(g+w)) time and memory, for any batch layout.

Keys arrive in slot order: `n_head_slots` leading slots that are always scanned (they hold every row's first
g real tokens), then a contiguous run in which slot distance equals token distance (true for left or right
padding). Queries are processed in blocks. For each block the keys split three ways:
- the bulk of the window, seen by every query of the block with its ordinary score: one unmasked fused call;
- the edges (head slots, the window's ragged left edge, the block's own causal square): a masked fused call;
- keys past the distance ceiling (RoPE; the global keys when w <= L): a small second branch whose scores
  use the re-rotated query and the unrotated key.
The three are merged by log-sum-exp. Which slot goes where depends only on the plan, so it is worked out
once per forward and shared by all layers (`Plan.memo`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .positions import Alibi, Rope

# Query rows per block: the CPU fused kernel runs best at ~1024 rows (measured here); at most w/4 rows leaves
# most of the window visible to the whole block, so most keys need no mask.
BLOCK = 1024
# Bytes of per-forward layout (masks, rotations) kept for reuse by later layers.
MEMO_BUDGET = 1 << 28
# Use PyTorch's fused CPU flash kernel on CPU tensors (tests turn it off to check the plain-math path).
FUSED_CPU = True


@dataclass
class Plan:
    """Where every query and key sits in its own sequence; shared by all layers of one forward."""

    q_idx: torch.Tensor  # [b, Q] real-token index of each query (queries are the last Q key slots)
    k_idx: torch.Tensor  # [b, K] real-token index of each key slot
    k_valid: torch.Tensor  # [b, K] False for padding and empty slots
    n_head_slots: int  # leading key slots scanned by every query
    memo: dict = field(default_factory=dict)
    memo_bytes: int = 0


@dataclass(frozen=True)
class Settings:
    n_global: int
    n_local: float  # math.inf allowed
    limit_distance: float  # math.inf allowed
    top_k: int = 0
    top_k_from_layer: int = 4
    top_k_distance: float = 0


@dataclass
class Layout:
    """One query block's key split, independent of the layer."""

    mid: slice | None  # keys seen by every query with an ordinary score (no mask)
    keys: torch.Tensor | slice  # the other candidate keys
    bias: torch.Tensor  # [b, 1 or h, n, len(keys)]: bool visibility (RoPE; 1 byte a pair while memoised)
    # or the additive ALiBi bias with -inf where not visible
    far: torch.Tensor | None = None  # positions in `keys` past the ceiling for some query (RoPE)
    far_visible: torch.Tensor | None = None  # [b, 1, 1, n, len(far)]
    q_turn: tuple | None = None  # rotation of the block's queries to position L
    k_turn: tuple | None = None  # rotation of the far keys back to position 0

    def nbytes(self) -> int:
        tensors = [self.bias, self.far_visible, *(self.q_turn or ()), *(self.k_turn or ())]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


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
    n_q = query.shape[2]
    out = query.new_empty(*query.shape[:3], value.shape[-1])
    w = cfg.n_local
    block = min(BLOCK, int(w) // 4) if math.isfinite(w) else BLOCK
    if isinstance(position, Rope) and cfg.limit_distance < w:  # ceiling inside the window (an ablation):
        block = min(block, 256)  # far keys are many and take the dense fp32 branch
    block = min(n_q, max(1, block))
    for s in range(0, n_q, block):
        e = min(n_q, s + block)
        memo_key = (s, e, query.dtype, query.device)
        lay = plan.memo.get(memo_key)
        if lay is None:
            lay = _layout(plan, key.shape[2] - n_q, s, e, cfg, position, query.dtype)
            if plan.memo_bytes + lay.nbytes() <= MEMO_BUDGET:
                plan.memo[memo_key] = lay
                plan.memo_bytes += lay.nbytes()
        out[:, :, s:e] = _block(query[:, :, s:e], key, value, lay, position, scaling).to(out.dtype)
    if cfg.top_k and layer_idx >= cfg.top_k_from_layer:
        out[:, :, -1:] = _last_row_with_top_k(query[:, :, -1:], key, value, plan, cfg, position, scaling)
    return out


def _layout(plan: Plan, first: int, s: int, e: int, cfg: Settings, position, dtype) -> Layout:
    """Split the keys of query block [s, e) (key slots first+s .. first+e-1) and build its masks."""
    head = min(plan.n_head_slots, first + e)
    q_lo, q_hi = first + s, first + e
    w, limit = cfg.n_local, cfg.limit_distance
    near = min(w, limit)  # distances below both: visible with the ordinary score
    lo = max(head, q_lo - int(w) + 1) if math.isfinite(w) else head  # oldest key any query may see locally
    m0 = max(q_hi - int(near), 0) if math.isfinite(near) else 0  # oldest key near to the block's last query
    mid = None
    if isinstance(position, Rope) and (m0 >= head or m0 == 0) and q_lo - m0 >= max(1, (e - s) // 2):
        if bool(plan.k_valid[:, m0:q_lo].all()):
            mid = slice(m0, q_lo)
    if mid is None:
        keys = torch.cat((torch.arange(head), torch.arange(lo, q_hi))) if lo > head else torch.arange(q_hi)
    elif m0 == 0:
        keys = torch.arange(q_lo, q_hi)
    else:
        keys = torch.cat((torch.arange(head), torch.arange(lo, m0), torch.arange(q_lo, q_hi)))
    keys = keys.to(plan.k_idx.device)
    qi, ki, kv = plan.q_idx[:, s:e], plan.k_idx[:, keys], plan.k_valid[:, keys]
    dist = qi[:, :, None] - ki[:, None, :]  # [b, n, K']
    visible = kv[:, None, :] & (dist >= 0) & ((dist < w) | (ki < cfg.n_global)[:, None, :])
    if isinstance(position, Alibi):
        d = dist.clamp(max=int(limit)) if math.isfinite(limit) else dist
        bias = (-position.slopes.to(dist.device).view(1, -1, 1, 1) * d[:, None]).masked_fill_(
            ~visible[:, None], -math.inf
        )
        return Layout(None, keys, bias.to(dtype))
    lay = Layout(mid, keys, bias=None)
    if math.isfinite(limit):
        far_pairs = visible & (dist >= limit)
        cols = far_pairs.any(1).any(0).nonzero().squeeze(1)
        if cols.numel():
            lay.far, lay.far_visible = cols, far_pairs[:, None, None, :, cols]
            visible[:, :, cols] &= ~far_pairs[:, :, cols]
            lay.q_turn = position.rotation(limit - qi, dtype)
            lay.k_turn = position.rotation(-ki[:, cols], dtype)
    lay.bias = visible[:, None]
    return lay


def _block(q, key, value, lay: Layout, position, scaling) -> torch.Tensor:
    k, v = key[:, :, lay.keys], value[:, :, lay.keys]
    bias = lay.bias if lay.bias.dtype != torch.bool else torch.where(lay.bias, 0.0, -math.inf).to(q.dtype)
    out, lse = _flash(q, k, v, bias, scaling)
    if lay.mid is not None:
        out, lse = _merge(out, lse, *_flash(q, key[:, :, lay.mid], value[:, :, lay.mid], None, scaling))
    if lay.far is not None:
        s2 = _raw_scores(position.apply(q, lay.q_turn), position.apply(k[:, :, lay.far], lay.k_turn), scaling)
        s2 = s2.masked_fill_(~lay.far_visible, -math.inf)
        b, hq, n = q.shape[:3]
        out, lse = _merge(out, lse, _attend(s2, v[:, :, lay.far]), torch.logsumexp(s2, dim=-1).view(b, hq, n))
    return out


def _flash(q, k, v, bias, scaling):
    """Attention with its log-sum-exp. On CPU PyTorch's fused flash kernel (fp32 accumulation, native GQA);
    elsewhere the same in plain fp32 math, blockwise so memory stays O(block x keys)."""
    if FUSED_CPU and q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=bias, scale=scaling
        )
    b, hk = q.shape[0], k.shape[1]
    s = _raw_scores(q, k, scaling)
    if bias is not None:
        heads = (1, 1) if bias.shape[1] == 1 else (hk, bias.shape[1] // hk)
        s = s + bias.float().view(b, *heads, *bias.shape[2:])
    return _attend(s, v), torch.logsumexp(s, dim=-1).view(b, q.shape[1], q.shape[2])


def _merge(o1, l1, o2, l2):
    """Combine two softmax-attention results over disjoint key sets from their log-sum-exps. A row that saw
    no key in one part has out 0 there and weighs by its other part alone."""
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


def _attend(scores: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax over keys (rows with no visible key, i.e. padding queries, read zeros), then values."""
    b, hk, g, n, k = scores.shape
    p = torch.softmax(scores, dim=-1).nan_to_num_(0.0)
    o = torch.matmul(p.view(b, hk, g * n, k), v.float())
    return o.view(b, hk * g, n, v.shape[-1])


def _scores(q, k, qi, ki, kvalid, cfg: Settings, position) -> torch.Tensor:
    """Dense masked LM-Infinite logits for a few query rows: [b, hk, G, n, K] fp32, -inf where not visible."""
    dist = (qi[:, :, None] - ki[:, None, :])[:, None, None]
    limit = cfg.limit_distance
    s = _raw_scores(q, k, 1.0)
    if isinstance(position, Alibi):
        d = dist.clamp(max=int(limit)) if math.isfinite(limit) else dist
        s = s - position.slopes.to(s.device).view(1, k.shape[1], -1, 1, 1) * d
    elif math.isfinite(limit):
        far = dist >= limit
        if bool(far.any()):
            s = torch.where(far, _raw_scores(position.rotate(q, limit - qi), position.rotate(k, -ki), 1.0), s)
    visible = kvalid[:, None, None, None, :] & (dist >= 0)
    visible = visible & ((ki < cfg.n_global)[:, None, None, None, :] | (dist < cfg.n_local))
    return s.masked_fill_(~visible, -math.inf)


def _last_row_with_top_k(q, key, value, plan: Plan, cfg: Settings, position, scaling) -> torch.Tensor:
    """The last query row re-attended over all keys: its Λ-visible keys plus the top-k middle keys, these
    scored as if they sat at distance D (method.md, optional top-k). O(K) for one row."""
    q = q * scaling  # ALiBi biases are not scaled; RoPE scores are q·k * scaling
    qi = plan.q_idx[:, -1:]
    s = _scores(q, key, qi, plan.k_idx, plan.k_valid, cfg, position)
    dist = (qi - plan.k_idx)[:, None, None, None, :]
    middle = plan.k_valid[:, None, None, None, :] & (plan.k_idx >= cfg.n_global)[:, None, None, None, :]
    middle = middle & (dist >= cfg.n_local) & (dist >= 0)
    if not bool(middle.any()):
        return _attend(s, value).to(q.dtype)
    d = cfg.top_k_distance
    if isinstance(position, Alibi):
        mid = _raw_scores(q, key, 1.0) - position.slopes.to(s.device).view(1, key.shape[1], -1, 1, 1) * d
    else:
        mid = _raw_scores(position.rotate(q, d - qi), position.rotate(key, -plan.k_idx), 1.0)
    mid = mid.masked_fill_(~middle, -math.inf)
    top, where = mid.topk(min(cfg.top_k, mid.shape[-1]), dim=-1)
    s.scatter_(-1, where, top)  # middle keys are never Λ-visible, so nothing is overwritten
    return _attend(s, value).to(q.dtype)
