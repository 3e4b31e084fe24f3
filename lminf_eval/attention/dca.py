"""Dual Chunk Attention (DCA; An et al., arXiv 2402.17463, ICML 2024; HKUNLP/ChunkLlama) as a branch of the
blocks backend (dispatch.py hands it the forward in `blocked_attention`'s place when `settings.dual_chunk`).

DCA keeps every key and cuts the text into chunks of c = chunk_size - local_window tokens. Key j sits at
position j mod c; query i at a position that depends on the key's chunk k relative to its own q = floor(i/c):
- intra-chunk (k = q): i mod c, so the pair keeps its own distance;
- successive chunk (k = q - 1): min(i mod c + c, chunk_size);
- inter-chunk (k <= q - 2): min(2c - 1, chunk_size), the successive position of a chunk's last query, as the
  authors' code computes it (= chunk_size whenever local_window < c, as with the defaults).
No distance exceeds chunk_size. A query's position depends on the key's chunk, so plan.py's `far_positions`
contract (a query's position depends on the query alone) does not hold; per case it does. So keys are turned
once per layer to j mod c, and each query block is scored against up to three key ranges, each with the block's
queries turned to that case's position (one rotation per case), merged by log-sum-exp. An intra-chunk pair keeps
its own distance: it is scored with q and k as the model turned them. Past local_window in a chunk the previous
chunk's query position is the earlier chunks' (chunk_size), so those two ranges are one call.

Query blocks are cut at chunk boundaries and where i mod c reaches local_window. Where the key slots up to a
block hold one unpadded sequence (slot t is token t in every row: the usual case, and every decode step of an
unpadded prompt) the ranges are slices and every call is unmasked: the block's own chunk (its earlier keys, then
the block's causal square), the previous chunk, and all chunks before that. A batch whose rows are each one text
after (or before) its padding runs row by row that way (`_rows`). Otherwise (a gap inside a row's mask) each
case is one unmasked call over the key slots every query of the block sees in that case and one masked call over
those only some see. Which slot goes where depends only on the plan: worked out once per forward and shared by
all layers (`Plan.remember`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LMInfiniteError
from ..settings import Settings
from .blocks import BLOCK, _as_slice, _flash, _masked
from .merge import merge
from .plan import Plan
from .positions import Rope

INTRA, SUCCESSIVE, INTER = 0, 1, 2  # the three cases, by the key's chunk relative to the query's


def chunk_length(settings: Settings) -> int:
    """c = chunk_size - local_window: the length of every chunk."""
    return int(settings.chunk_size) - settings.local_window


def chunk_of(idx: torch.Tensor, settings: Settings) -> torch.Tensor:
    """floor(i / c): a pair is INTRA when its chunks are equal, SUCCESSIVE one apart, INTER two or more."""
    return torch.div(idx, chunk_length(settings), rounding_mode="floor")


def query_position(q_idx: torch.Tensor, case: int, settings: Settings) -> torch.Tensor:
    """Where query i sits when paired with a key of `case`; a function of the query alone for a given case."""
    c, top = chunk_length(settings), int(settings.chunk_size)
    if case == INTRA:
        return q_idx % c
    if case == SUCCESSIVE:
        return torch.clamp(q_idx % c + c, max=top)
    return torch.full_like(q_idx, min(2 * c - 1, top))


def key_position(k_idx: torch.Tensor, settings: Settings) -> torch.Tensor:
    """Where key j sits: j mod c, whichever query it is paired with."""
    return k_idx % chunk_length(settings)


@dataclass
class Part:
    """One fused call of a query block: key slots scored with the queries turned for `case`."""

    case: int
    keys: slice | torch.Tensor
    mask: torch.Tensor | None = None  # [b, 1, n, len(keys)] bool; None: every query sees every key
    causal: bool = False  # the block's own square: query r sees keys 0..r


@dataclass
class ChunkLayout:
    """One query block [s, e) of a forward: its parts and its queries' rotation per case."""

    s: int
    e: int
    parts: list[Part]
    q_turns: dict[int, tuple[torch.Tensor, torch.Tensor]]

    def nbytes(self) -> int:
        tensors = [t for p in self.parts for t in (p.mask, p.keys) if isinstance(t, torch.Tensor)]
        tensors += [t for turn in self.q_turns.values() for t in turn]
        return sum(t.numel() * t.element_size() for t in tensors)


def dual_chunk_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    plan: Plan,
    settings: Settings,
    position: Rope,
    scaling: float,
    fused: bool = True,
    use_slices: bool = True,
) -> torch.Tensor:
    """query [b, hq, Q, d], key/value [b, hk, K, d] -> [b, hq, Q, dv] in query's dtype. `fused`: PyTorch's fused
    attention kernels (else plain fp32 math); `use_slices`: unpadded blocks as unmasked slices (else masked)."""
    if not isinstance(position, Rope):
        raise LMInfiniteError("dual chunk attention re-rotates queries and keys: it needs a RoPE model")
    b, hq, n_q = query.shape[:3]
    rows = _rows(plan, n_q) if use_slices and b > 1 and _plain_prefix(plan) < key.shape[2] else None
    if rows is not None:  # each row one plain text after (or before) its padding: row by row, as slices
        out = query.new_zeros(b, n_q, hq, value.shape[-1]).transpose(1, 2)  # (padding queries read zeros)
        for r, (q_lo, q_hi, k_lo, k_hi, alone) in enumerate(rows):
            if q_hi > q_lo:
                sub = (x[r : r + 1, :, k_lo:k_hi] for x in (key, value))
                out[r : r + 1, :, q_lo:q_hi] = dual_chunk_attention(
                    query[r : r + 1, :, q_lo:q_hi], *sub, alone, settings, position, scaling, fused
                )
        return out
    out = query.new_empty(b, n_q, hq, value.shape[-1]).transpose(1, 2)  # (as blocks: the caller's transpose is free)
    memo_key = ("dca", n_q, key.shape[2], use_slices, query.dtype, query.device)
    layouts = plan.memo.get(memo_key)
    if layouts is None:
        first = key.shape[2] - n_q
        spans = _spans(plan, n_q, settings)
        layouts = [_layout(plan, first, s, e, settings, position, query.dtype, use_slices) for s, e in spans]
        plan.remember(memo_key, layouts, sum(lay.nbytes() for lay in layouts))
    far = any(p.case != INTRA for lay in layouts for p in lay.parts)
    turned = position.apply(key, _key_turn(plan, key, settings, position)) if far else None
    for lay in layouts:
        q = query[:, :, lay.s : lay.e]
        q_case = {INTRA: q, **{case: position.apply(q, turn) for case, turn in lay.q_turns.items()}}
        parts = []
        for p in lay.parts:
            k, v = (key if p.case == INTRA else turned)[:, :, p.keys], value[:, :, p.keys]
            if p.mask is None:
                parts.append(_flash(q_case[p.case], k, v, None, scaling, fused, causal=p.causal))
            else:
                parts.append(_masked(q_case[p.case], k, v, p.mask, scaling, fused))
        merge(parts, into=out[:, :, lay.s : lay.e])
    return out


def _key_turn(plan: Plan, key: torch.Tensor, settings: Settings, position: Rope) -> tuple:
    """The rotation taking every key slot from j to j mod c, once per forward."""
    memo_key = ("dca-keys", key.shape[2], key.dtype, key.device)
    turn = plan.memo.get(memo_key)
    if turn is None:
        k_idx = plan.k_idx[:, : key.shape[2]]
        turn = position.rotation(key_position(k_idx, settings) - k_idx, key.dtype)
        plan.remember(memo_key, turn, sum(t.numel() * t.element_size() for t in turn))
    return turn


def _spans(plan: Plan, n_q: int, settings: Settings) -> list[tuple[int, int]]:
    """Query slot ranges: cut where the first row's token index starts a chunk or reaches local_window in it (past
    which the previous chunk is scored like the earlier ones), at most BLOCK rows each."""
    idx, c = plan.q_idx[0], chunk_length(settings)
    starts = (((idx % c == 0) | (idx % c == settings.local_window)) & (idx >= 0)).nonzero().squeeze(1).tolist()
    cuts = sorted({0, n_q, *starts})
    return [(s, min(hi, s + BLOCK)) for lo, hi in zip(cuts[:-1], cuts[1:], strict=True) for s in range(lo, hi, BLOCK)]


def _rows(plan: Plan, n_q: int) -> list[tuple[int, int, int, int, Plan]] | None:
    """Per row (query slots q_lo..q_hi, key slots k_lo..k_hi, an unpadded plan of those) when every row's real
    key slots are one run holding tokens 0, 1, ... (left or right padding); else None. Once per forward."""
    memo_key = ("dca-rows", n_q)
    if memo_key not in plan.memo:
        n_k, rows = plan.k_idx.shape[1], []
        first = n_k - n_q
        for valid, idx in zip(plan.k_valid, plan.k_idx, strict=True):
            k_lo, n = int(valid.int().argmax()), int(valid.sum())
            k_hi = k_lo + n
            tokens = torch.arange(n, device=idx.device)
            if not (bool(valid[k_lo:k_hi].all()) and bool((idx[k_lo:k_hi] == tokens).all())):
                rows = None
                break
            q_lo, q_hi = max(k_lo, first) - first, max(k_hi, first) - first
            alone = Plan.from_mask(None, 1, q_hi - q_lo, n - (q_hi - q_lo), 0, idx.device) if q_hi > q_lo else None
            rows.append((q_lo, q_hi, k_lo, k_hi, alone))
        plan.memo[memo_key] = rows  # (the row plans keep their own layouts across layers)
    return plan.memo[memo_key]


def _plain_prefix(plan: Plan) -> int:
    """p such that key slots [0, p) are real and slot t holds token t in every row (one host sync a forward)."""
    memo_key = ("dca-plain-prefix",)
    if memo_key not in plan.memo:
        n_k = plan.k_idx.shape[1]
        plain = (plan.k_valid & (plan.k_idx == torch.arange(n_k, device=plan.k_idx.device))).all(0)
        bad = (~plain).nonzero()
        plan.memo[memo_key] = int(bad[0]) if bad.numel() else n_k
    return plan.memo[memo_key]


def _layout(plan: Plan, first: int, s: int, e: int, settings: Settings, position: Rope, dtype, slices) -> ChunkLayout:
    """The parts of query block [s, e) (key slots first+s .. first+e-1) and its query rotations."""
    c = chunk_length(settings)
    q_lo, q_hi = first + s, first + e
    qi = plan.q_idx[:, s:e]
    parts: list[Part] = []
    if slices and q_hi <= _plain_prefix(plan) and q_lo // c == (q_hi - 1) // c:
        a = q_lo // c * c  # the block's chunk starts here
        if q_lo > a:
            parts.append(Part(INTRA, slice(a, q_lo)))
        parts.append(Part(INTRA, slice(q_lo, q_hi), causal=True))
        if a >= c and q_lo - a >= settings.local_window and settings.local_window < c:
            parts.append(Part(INTER, slice(0, a)))  # (the previous chunk's query position is the earlier ones')
        else:
            if a >= c:
                parts.append(Part(SUCCESSIVE, slice(a - c, a)))
            if a >= 2 * c:
                parts.append(Part(INTER, slice(0, a - c)))
    else:
        ki, kv = plan.k_idx[:, :q_hi], plan.k_valid[:, :q_hi]
        seen = kv[:, None, :] & (qi[:, :, None] >= ki[:, None, :])  # [b, n, K'] bool
        q_chunk, k_chunk = chunk_of(qi, settings)[:, :, None], chunk_of(ki, settings)[:, None, :]
        in_case = {INTRA: q_chunk == k_chunk, SUCCESSIVE: q_chunk == k_chunk + 1, INTER: q_chunk >= k_chunk + 2}
        for which in (INTRA, SUCCESSIVE, INTER):
            pairs = seen & in_case[which]
            cols = pairs.any(1).any(0).nonzero().squeeze(1)
            if not cols.numel():
                continue
            every = pairs[:, :, cols].all(1).all(0)
            if bool(every.any()):
                parts.append(Part(which, _as_slice(cols[every])))
            some = cols[~every]
            if some.numel():
                parts.append(Part(which, some, pairs[:, None, :, some]))
        if not parts:  # (padding queries only: one part that sees nothing, so the block reads zeros)
            parts.append(Part(INTRA, slice(0, 1), torch.zeros_like(seen[:, None, :, :1])))
    # (an intra-chunk pair keeps its own distance: scored with q and k as the model turned them, no rotation)
    turns = {
        p.case: position.rotation(query_position(qi, p.case, settings) - qi, dtype) for p in parts if p.case != INTRA
    }
    return ChunkLayout(s, e, parts, turns)
