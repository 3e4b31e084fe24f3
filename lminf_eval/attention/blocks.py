"""The Λ-attention in O(n·(g+w)) time and memory as fused attention calls per query block: the CPU backend.

Keys arrive in slot order: `plan.global_slots` leading slots that are always scanned (they hold every row's
first g real tokens), then a contiguous run in which slot distance equals token distance (true for left or
right padding). Queries are processed in blocks of n rows. For each block the keys split into parts, each one
fused attention call, merged by log-sum-exp:
- the band: when the block's local window is all real, contiguous tokens (the usual case), it is three
  unmasked calls: the bulk seen by every query, the block's own n x n causal square (`is_causal`), and the
  window's ragged left edge, an n x n anti-causal triangle run as a causal one on row-reversed inputs;
- otherwise (padding or cache gaps inside the window) the bulk as one unmasked call and the rest masked;
- the global slots before the window, masked;
- keys past the distance ceiling (RoPE): scored with the query and key turned to the positions
  `far_positions` gives them. Keys that are far for every query of the block (all of them for LM-Infinite's
  global keys deep into the text; nearly every key for Self-Extend or ReRoPE) are one unmasked fused call;
  the few far for some queries only (the ragged edge) a small masked call. Each key's far position
  depends on the key alone, so keys are turned once per layer, not once per block. When every earlier key
  is visible (Self-Extend, ReRoPE, the ceiling alone) in an unpadded prompt, a block past the ceiling is five
  unmasked calls (`Layout.ceiling`): far for every query, the far edge (causal), the near edge (anti-causal,
  reversed), near for every query, and the causal square.
Which slot goes where depends only on the plan, so it is worked out once per forward and shared by all
layers (`Plan.remember`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..settings import Settings
from .merge import merge
from .plan import Plan, alibi_bias, far_positions, is_far, visible
from .positions import Alibi, Rope

# Query rows per block: the CPU fused kernel runs best at ~1024 rows (measured here); at most w/4 rows leaves
# most of the window visible to the whole block.
BLOCK = 1024


@dataclass
class Layout:
    """One query block's key split, independent of the layer."""

    band: tuple[int, int, int] | None  # key slots (a, m, q): ragged edge [a, m), bulk [m, q), causal square from q
    mid: slice | None  # keys seen by every query with an ordinary score (no mask), when there is no band
    keys: torch.Tensor  # the other candidate key slots, masked
    # [b, 1 or h, n, len(keys)]: a bool visibility mask (RoPE; 1 byte a pair while memoised) or the additive
    # ALiBi bias with -inf where not visible; None when no pair of `keys` is visible
    mask_or_bias: torch.Tensor | None
    far_all: slice | torch.Tensor | None = None  # key slots past the ceiling for every query (RoPE), unmasked
    far: torch.Tensor | None = None  # key slots past the ceiling for some queries only
    far_visible: torch.Tensor | None = None  # [b, 1, n, len(far)] bool
    q_turn: tuple | None = None  # rotation of the block's queries to their far position (L for LM-Infinite)
    ceiling: tuple[int, int, int] | None = None  # key slots (x, q_lo, q_hi) of a ceiling band (`_ceiling_band`)

    def far_end(self) -> int:
        """One past the last far key slot (0 when none)."""
        ends = [int(self.far.max()) + 1] if self.far is not None else []
        if self.ceiling is not None:
            x, q_lo, q_hi = self.ceiling
            ends.append(x + q_hi - q_lo)
        if isinstance(self.far_all, slice):
            ends.append(self.far_all.stop)
        elif self.far_all is not None:
            ends.append(int(self.far_all.max()) + 1)
        return max(ends, default=0)

    def nbytes(self) -> int:
        far_all = self.far_all if isinstance(self.far_all, torch.Tensor) else None
        tensors = [self.keys, self.mask_or_bias, far_all, self.far, self.far_visible, *(self.q_turn or ())]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def blocked_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    plan: Plan,
    settings: Settings,
    position: Rope | Alibi,
    scaling: float,
    fused: bool = True,
    use_band: bool = True,
) -> torch.Tensor:
    """query [b, hq, Q, d], key/value [b, hk, K, d] -> [b, hq, Q, dv] in query's dtype. `fused`: PyTorch's
    fused attention kernels (else plain fp32 math); `use_band`: plain local windows as unmasked band calls."""
    b, hq, n_q = query.shape[:3]
    # [b, Q, hq, dv] in memory, so the caller's transpose back to that layout is free
    out = query.new_empty(b, n_q, hq, value.shape[-1]).transpose(1, 2)
    w = settings.n_local
    block = min(BLOCK, int(w) // 4) if math.isfinite(w) else BLOCK
    if isinstance(position, Rope) and settings.limit_distance < w:  # ceiling inside the window: at most L/2 rows,
        block = min(block, max(128, int(settings.limit_distance) // 2))  # so most near keys are an unmasked call
        if not math.isfinite(w) and plan.is_contiguous():  # (a ceiling band needs fewer rows than L only)
            block = min(BLOCK, max(128, int(settings.limit_distance) - 1))
    block = min(n_q, max(1, block))
    layouts = []
    for s in range(0, n_q, block):
        e = min(n_q, s + block)
        memo_key = ("blocks", s, e, use_band, query.dtype, query.device)
        lay = plan.memo.get(memo_key)
        if lay is None:
            lay = _layout(plan, key.shape[2] - n_q, s, e, settings, position, query.dtype, use_band)
            plan.remember(memo_key, lay, lay.nbytes())
        layouts.append((s, e, lay))
    far_end = max(lay.far_end() for _, _, lay in layouts)
    far_key = _far_keys(key[:, :, :far_end], plan, settings, position) if far_end else None
    for s, e, lay in layouts:
        merge(_block(query[:, :, s:e], key, far_key, value, lay, position, scaling, fused), into=out[:, :, s:e])
    return out


def _far_keys(key: torch.Tensor, plan: Plan, settings: Settings, position: Rope) -> torch.Tensor:
    """The first slots of `key` turned to their far positions, once per layer (the rotation once per forward)."""
    n = key.shape[2]
    memo_key = ("far-keys", n, key.dtype, key.device)
    turn = plan.memo.get(memo_key)
    if turn is None:
        k_idx = plan.k_idx[:, :n]
        turn = position.rotation(far_positions(k_idx, k_idx, settings)[1] - k_idx, key.dtype)
        plan.remember(memo_key, turn, sum(t.numel() * t.element_size() for t in turn))
    return position.apply(key, turn)


def _band(plan: Plan, head: int, q_lo: int, q_hi: int, settings: Settings, position) -> tuple[int, int, int] | None:
    """Key slots (a, m, q_lo) when the local window of queries [q_lo, q_hi) is a plain band: every slot from a
    on is a real, non-global token, contiguous with the next, never past the ceiling, so visibility depends
    on distance alone. None where that does not hold (padding or gaps in the window, the window reaching
    into the global slots, ALiBi, a ceiling inside the window, single-query decode steps)."""
    n, w = q_hi - q_lo, settings.n_local
    if not isinstance(position, Rope) or n < 2 or settings.limit_distance < w:
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
    if a > 0 and not bool((idx[:, 0] >= settings.n_global).all()):
        return None
    return a, m, q_lo


def _ceiling_band(plan: Plan, q_lo: int, q_hi: int, settings: Settings, position) -> tuple[int, int, int] | None:
    """Key slots (x, q_lo, q_hi), x = q_lo - L, when queries [q_lo, q_hi) see every earlier key (no window), the
    plan is one unpadded sequence, and the block lies past the ceiling and is shorter than it. Then query
    r = i - q_lo is far from keys [0, x) and from edge key x + t iff t <= r, near to edge key x + 1 + t iff
    t >= r, and near to [q_hi - L + 1, q_hi) causally: five unmasked calls. None otherwise."""
    n, limit = q_hi - q_lo, settings.limit_distance
    if not isinstance(position, Rope) or math.isfinite(settings.n_local) or not float(limit).is_integer():
        return None
    x = q_lo - int(limit)
    if n < 2 or x < 0 or n >= limit or not plan.is_contiguous():
        return None
    return x, q_lo, q_hi


def _layout(plan: Plan, first: int, s: int, e: int, settings: Settings, position, dtype, use_band: bool) -> Layout:
    """Split the keys of query block [s, e) (key slots first+s .. first+e-1) and build its masks."""
    head = min(plan.global_slots, first + e)
    q_lo, q_hi = first + s, first + e
    w, limit_distance = settings.n_local, settings.limit_distance
    ceiling = _ceiling_band(plan, q_lo, q_hi, settings, position) if use_band else None
    if ceiling is not None:
        qi = plan.q_idx[:, s:e]
        q_turn = position.rotation(far_positions(qi, qi, settings)[0] - qi, dtype)
        return Layout(None, None, torch.arange(0), None, q_turn=q_turn, ceiling=ceiling)
    band, mid = _band(plan, head, q_lo, q_hi, settings, position) if use_band else None, None
    if band is not None:
        keys = torch.arange(min(head, band[0]))
    else:
        near = min(w, limit_distance)  # distances below both: visible with the ordinary score
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
    seen = visible(dist, ki[:, None, :], kv[:, None, :], settings.n_global, w)
    if isinstance(position, Alibi):
        slopes = position.slopes.to(dist.device).view(1, -1, 1, 1)
        bias = alibi_bias(slopes, qi[:, None, :, None], ki[:, None, None, :], settings)
        bias = bias.masked_fill_(~seen[:, None], -math.inf)
        return Layout(None, None, keys, bias.to(dtype))
    lay = Layout(band, mid, keys, mask_or_bias=None)
    if math.isfinite(limit_distance):
        far_pairs = seen & is_far(dist, limit_distance)
        cols = far_pairs.any(1).any(0).nonzero().squeeze(1)
        if cols.numel():
            seen[:, :, cols] &= ~far_pairs[:, :, cols]
            every = far_pairs[:, :, cols].all(1).all(0)
            if bool(every.any()):
                lay.far_all = _as_slice(keys[cols[every]])
            some = cols[~every]
            if some.numel():
                lay.far, lay.far_visible = keys[some], far_pairs[:, None, :, some]
            lay.q_turn = position.rotation(far_positions(qi, qi, settings)[0] - qi, dtype)
        near = seen.any(1).any(0)  # keys left with an ordinary score for some query; drop the others
        if bool(near.any()) and not bool(near.all()):
            lay.keys, seen = keys[near], seen[:, :, near]
    other = band is not None or mid is not None or lay.far_all is not None or lay.far is not None
    if bool(seen.any()) or not other:  # (a part for padding rows)
        lay.mask_or_bias = seen[:, None]
    return lay


def _as_slice(slots: torch.Tensor) -> slice | torch.Tensor:
    """Consecutive key slots as a slice (a view, not a copy, when keys are taken); others as they are."""
    lo, hi = int(slots[0]), int(slots[-1]) + 1
    return slice(lo, hi) if hi - lo == slots.numel() else slots


def _block(q, key, far_key, value, lay: Layout, position, scaling, fused: bool) -> list[tuple]:
    """(output, log-sum-exp) of each key part of one query block, for `merge`; `far_key`: the keys turned to
    their far positions (`_far_keys`)."""
    parts = []
    if lay.ceiling is not None:
        return _ceiling_parts(q, key, far_key, value, lay, position, scaling, fused)
    if lay.band is not None:
        a, m, q_lo = lay.band
        square = slice(q_lo, q_lo + q.shape[2])
        parts.append(_flash(q, key[:, :, square], value[:, :, square], None, scaling, fused, causal=True))
        if q_lo > m:
            parts.append(_flash(q, key[:, :, m:q_lo], value[:, :, m:q_lo], None, scaling, fused))
        if m > a:  # query r sees edge key t iff t >= r: causal once both are reversed
            edge = (q.flip(2), key[:, :, a:m].flip(2), value[:, :, a:m].flip(2))
            out, lse = _flash(*edge, None, scaling, fused, causal=True)
            parts.append((out.flip(2), lse.flip(-1)))
    if lay.mid is not None:
        parts.append(_flash(q, key[:, :, lay.mid], value[:, :, lay.mid], None, scaling, fused))
    if lay.mask_or_bias is not None:
        k, v = key[:, :, lay.keys], value[:, :, lay.keys]
        if lay.mask_or_bias.dtype == torch.bool:
            parts.append(_masked(q, k, v, lay.mask_or_bias, scaling, fused))
        else:
            parts.append(_flash(q, k, v, lay.mask_or_bias, scaling, fused))
    if lay.q_turn is not None:
        q_far = position.apply(q, lay.q_turn)
        if lay.far_all is not None:
            parts.append(_flash(q_far, far_key[:, :, lay.far_all], value[:, :, lay.far_all], None, scaling, fused))
        if lay.far is not None:
            parts.append(_masked(q_far, far_key[:, :, lay.far], value[:, :, lay.far], lay.far_visible, scaling, fused))
    return parts


def _ceiling_parts(q, key, far_key, value, lay: Layout, position, scaling, fused: bool) -> list[tuple]:
    """The five unmasked calls of a ceiling band (`_ceiling_band`)."""
    x, q_lo, q_hi = lay.ceiling
    n = q_hi - q_lo
    q_far = position.apply(q, lay.q_turn)
    parts = [
        _flash(q, key[:, :, q_lo:q_hi], value[:, :, q_lo:q_hi], None, scaling, fused, causal=True),
        _flash(q_far, far_key[:, :, x : x + n], value[:, :, x : x + n], None, scaling, fused, causal=True),
    ]
    if x > 0:
        parts.append(_flash(q_far, far_key[:, :, :x], value[:, :, :x], None, scaling, fused))
    if q_lo > x + n + 1:
        mid = slice(x + n + 1, q_lo)
        parts.append(_flash(q, key[:, :, mid], value[:, :, mid], None, scaling, fused))
    edge = slice(x + 1, x + n + 1)  # query r sees edge key t iff t >= r: causal once both are reversed
    out, lse = _flash(q.flip(2), key[:, :, edge].flip(2), value[:, :, edge].flip(2), None, scaling, fused, causal=True)
    parts.append((out.flip(2), lse.flip(-1)))
    return parts


def _masked(q, k, v, seen: torch.Tensor, scaling, fused: bool):
    """`_flash` under a bool visibility mask [b, 1, n, K]. A row that sees none of these keys gets log-sum-exp
    -inf, so `merge` gives it no weight (the fused CPU kernel reports 0 there)."""
    out, lse = _flash(q, k, v, torch.where(seen, 0.0, -math.inf).to(q.dtype), scaling, fused)
    return out, lse.masked_fill(~seen.any(-1), -math.inf)


def _flash(q, k, v, bias, scaling, fused: bool, causal=False):
    """Attention with its log-sum-exp (`causal`: query r sees keys 0..r). `fused`: on CPU PyTorch's fused flash
    kernel (fp32 accumulation, native GQA), on CUDA FlashAttention-2 for unmasked half-precision calls;
    otherwise the same in plain fp32 math, O(block x keys) memory."""
    if fused and q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=bias, scale=scaling
        )
    if fused and q.device.type == "cuda" and bias is None and q.dtype in (torch.float16, torch.bfloat16):
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
