"""The Λ-shaped attention of LM-Infinite in O(n·(g+w)) time and memory, for any batch layout.

Keys arrive in slot order: `n_head_slots` leading slots that are always scanned (they hold every row's first
g real tokens), then a contiguous run in which slot distance equals token distance (true for left or right
padding). Queries are processed in blocks of n rows. For each block the keys split into parts, each one
fused attention call, merged by log-sum-exp:
- the band: when the block's local window is all real, contiguous tokens (the usual case), it is three
  unmasked calls: the bulk seen by every query, the block's own n x n causal square (`is_causal`), and the
  window's ragged left edge, an n x n anti-causal triangle run as a causal one on row-reversed inputs;
- otherwise (padding or cache gaps inside the window) the bulk as one unmasked call and the rest masked;
- the head slots (global tokens) before the window, masked;
- keys past the distance ceiling (RoPE; the global keys when w <= L): a small second branch whose scores
  use the re-rotated query and the unrotated key.
Which slot goes where depends only on the plan, so it is worked out once per forward and shared by all
layers (`Plan.memo`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .positions import Alibi, Rope

# Query rows per block: the CPU fused kernel runs best at ~1024 rows (measured here); at most w/4 rows leaves
# most of the window visible to the whole block.
BLOCK = 1024
# Bytes of per-forward layout (masks, rotations) kept for reuse by later layers.
MEMO_BUDGET = 1 << 28
# Use PyTorch's fused CPU flash kernel on CPU tensors (tests turn it off to check the plain-math path).
FUSED_CPU = True
# Run plain local windows as unmasked band calls (tests turn it off to check the masked path alone).
BAND = True
# Devices that take the FlexAttention path (flex.py) instead of the blocks below; tests add "cpu".
FLEX_DEVICES = ("cuda",)


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

    band: tuple[int, int, int] | None  # key slots (a, m, q): ragged edge [a, m), bulk [m, q), causal square from q
    mid: slice | None  # keys seen by every query with an ordinary score (no mask), when there is no band
    keys: torch.Tensor  # the other candidate key slots, masked
    bias: torch.Tensor | None  # [b, 1 or h, n, len(keys)]: bool visibility (RoPE; 1 byte a pair while memoised)
    # or the additive ALiBi bias with -inf where not visible; None when no pair is visible
    far: torch.Tensor | None = None  # key slots past the ceiling for some query (RoPE)
    far_visible: torch.Tensor | None = None  # [b, 1, 1, n, len(far)]
    q_turn: tuple | None = None  # rotation of the block's queries to position L
    k_turn: tuple | None = None  # rotation of the far keys back to position 0

    def nbytes(self) -> int:
        tensors = [self.keys, self.bias, self.far_visible, *(self.q_turn or ()), *(self.k_turn or ())]
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
    if query.device.type in FLEX_DEVICES:
        from .flex import flex_lambda_attention

        out = flex_lambda_attention(query, key, value, plan, cfg, position, scaling)
    else:
        out = _blocked(query, key, value, plan, cfg, position, scaling)
    if cfg.top_k and layer_idx >= cfg.top_k_from_layer:
        out[:, :, -1:] = _last_row_with_top_k(query[:, :, -1:], key, value, plan, cfg, position, scaling)
    return out


def _blocked(query, key, value, plan: Plan, cfg: Settings, position, scaling: float) -> torch.Tensor:
    b, hq, n_q = query.shape[:3]
    # [b, Q, hq, dv] in memory, so the caller's transpose back to that layout is free
    out = query.new_empty(b, n_q, hq, value.shape[-1]).transpose(1, 2)
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
        _merge(_block(query[:, :, s:e], key, value, lay, position, scaling), into=out[:, :, s:e])
    return out


def _band(plan: Plan, head: int, q_lo: int, q_hi: int, cfg: Settings, position) -> tuple[int, int, int] | None:
    """Key slots (a, m, q_lo) when the local window of queries [q_lo, q_hi) is a plain band: every slot from a
    on is a real, non-global token, contiguous with the next, never past the ceiling, so visibility depends
    on distance alone. None where that does not hold (padding or gaps in the window, the window reaching
    into the head slots, ALiBi, a ceiling inside the window, single-query decode steps)."""
    n, w = q_hi - q_lo, cfg.n_local
    if not BAND or not isinstance(position, Rope) or n < 2 or cfg.limit_distance < w:
        return None
    if not math.isfinite(w) or q_hi <= w:  # every query sees every earlier slot
        a = m = 0
    else:
        a = q_lo - int(w) + 1  # the first query's oldest key; the last query's is a + n - 1
        m = a + n
        if a < head or m > q_lo:
            return None
    idx = plan.k_idx[:, a:q_hi]
    if not bool(plan.k_valid[:, a:q_hi].all()) or not bool((idx[:, 1:] - idx[:, :-1] == 1).all()):
        return None
    if a > 0 and not bool((idx[:, 0] >= cfg.n_global).all()):
        return None
    return a, m, q_lo


def _layout(plan: Plan, first: int, s: int, e: int, cfg: Settings, position, dtype) -> Layout:
    """Split the keys of query block [s, e) (key slots first+s .. first+e-1) and build its masks."""
    head = min(plan.n_head_slots, first + e)
    q_lo, q_hi = first + s, first + e
    w, limit = cfg.n_local, cfg.limit_distance
    band, mid = _band(plan, head, q_lo, q_hi, cfg, position), None
    if band is not None:
        keys = torch.arange(min(head, band[0]))
    else:
        near = min(w, limit)  # distances below both: visible with the ordinary score
        lo = max(head, q_lo - int(w) + 1) if math.isfinite(w) else head  # oldest key any query may see locally
        m0 = max(q_hi - int(near), 0) if math.isfinite(near) else 0  # oldest key near to the block's last query
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
        return Layout(None, None, keys, bias.to(dtype))
    lay = Layout(band, mid, keys, bias=None)
    if math.isfinite(limit):
        far_pairs = visible & (dist >= limit)
        cols = far_pairs.any(1).any(0).nonzero().squeeze(1)
        if cols.numel():
            lay.far, lay.far_visible = keys[cols], far_pairs[:, None, None, :, cols]
            visible[:, :, cols] &= ~far_pairs[:, :, cols]
            lay.q_turn = position.rotation(limit - qi, dtype)
            lay.k_turn = position.rotation(-ki[:, cols], dtype)
    if bool(visible.any()) or (band is None and mid is None and lay.far is None):  # (a part for padding rows)
        lay.bias = visible[:, None]
    return lay


def _block(q, key, value, lay: Layout, position, scaling) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(output, log-sum-exp) of each key part of one query block, for `_merge`."""
    parts = []
    if lay.band is not None:
        a, m, q_lo = lay.band
        square = slice(q_lo, q_lo + q.shape[2])
        parts.append(_flash(q, key[:, :, square], value[:, :, square], None, scaling, causal=True))
        if q_lo > m:
            parts.append(_flash(q, key[:, :, m:q_lo], value[:, :, m:q_lo], None, scaling))
        if m > a:  # query r sees edge key t iff t >= r: causal once both are reversed
            out, lse = _flash(q.flip(2), key[:, :, a:m].flip(2), value[:, :, a:m].flip(2), None, scaling, True)
            parts.append((out.flip(2), lse.flip(-1)))
    if lay.mid is not None:
        parts.append(_flash(q, key[:, :, lay.mid], value[:, :, lay.mid], None, scaling))
    if lay.bias is not None:
        bias = lay.bias if lay.bias.dtype != torch.bool else torch.where(lay.bias, 0.0, -math.inf).to(q.dtype)
        parts.append(_flash(q, key[:, :, lay.keys], value[:, :, lay.keys], bias, scaling))
    if lay.far is not None:
        k = position.apply(key[:, :, lay.far], lay.k_turn)
        s2 = _raw_scores(position.apply(q, lay.q_turn), k, scaling).masked_fill_(~lay.far_visible, -math.inf)
        b, hq, n = q.shape[:3]
        parts.append((_attend(s2, value[:, :, lay.far]), torch.logsumexp(s2, dim=-1).view(b, hq, n)))
    return parts


def _flash(q, k, v, bias, scaling, causal=False):
    """Attention with its log-sum-exp (`causal`: query r sees keys 0..r). On CPU PyTorch's fused flash kernel
    (fp32 accumulation, native GQA); on CUDA FlashAttention-2 for unmasked half-precision calls (when flex.py
    is switched off); elsewhere the same in plain fp32 math, O(block x keys) memory."""
    if FUSED_CPU and q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=bias, scale=scaling
        )
    if q.device.type == "cuda" and bias is None and q.dtype in (torch.float16, torch.bfloat16):
        groups = q.shape[1] // k.shape[1]  # FlashAttention-2 wants as many K/V heads as query heads
        if groups > 1:
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, scale=scaling)[:2]
        return out, lse[..., : q.shape[2]]
    b, hk = q.shape[0], k.shape[1]
    s = _raw_scores(q, k, scaling)
    if bias is not None:
        heads = (1, 1) if bias.shape[1] == 1 else (hk, bias.shape[1] // hk)
        s = s + bias.float().view(b, *heads, *bias.shape[2:])
    if causal:
        s = s.masked_fill_(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu_(1), -math.inf)
    return _attend(s, v), torch.logsumexp(s, dim=-1).view(b, q.shape[1], q.shape[2])


def _merge(parts, into: torch.Tensor) -> torch.Tensor:
    """Combine softmax-attention results over disjoint key sets from their log-sum-exps, written into `into`
    (accumulated in fp32, in place: at 32k tokens this runs over every query of every layer). A row that
    saw no key in a part has weight 0 there and weighs by the other parts alone."""
    if len(parts) == 1:
        return into.copy_(parts[0][0])
    lse = torch.stack([p[1] for p in parts])
    weights = (lse - lse.max(0).values).exp_().nan_to_num_(0.0)
    weights /= weights.sum(0).clamp_min(1e-30)
    weights = weights.unsqueeze(-1)
    acc = into if into.dtype in (torch.float32, torch.float64) else torch.empty(into.shape, device=into.device)
    torch.mul(parts[0][0], weights[0], out=acc)
    for (o, _), wt in zip(parts[1:], weights[1:], strict=True):
        acc.addcmul_(o, wt)
    return acc if acc is into else into.copy_(acc)


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
