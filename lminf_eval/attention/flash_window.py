"""The Λ-attention as a sliding-window flash call plus a small dense far branch: the CUDA prefill backend.

With the window no wider than the ceiling (w <= L, the default w = L), a contiguous plan splits in two:
- the window branch: every pair at distance 0 .. w-1, each with the model's own score. On CUDA in half
  precision that is one call of PyTorch's bundled FlashAttention-2 with `window_size_left = w - 1`, causal,
  returning the log-sum-exp (`window_attention`); elsewhere a reference in query blocks (fused CPU attention
  under a band mask) that tests and the CPU use;
- the far branch: the g global keys for the queries they are outside the window of, scored at the distance
  `far_positions` gives them (RoPE: turned; ALiBi: the bias at that distance). That is a [n, g] score block,
  computed in fp32 and merged with the window's output by log-sum-exp, in place, in one function
  (`far_merge`) that `torch.compile(fullgraph=True)` compiles on CUDA.
Rotations: a far key's turn depends on the key alone and a far query's on the query alone (plan.py's contract).
The g keys are turned once per layer; the query turn differs per query, so it cannot move onto the keys, and is
applied inside the score reduction (R(a)q·k = Σ_f cos(a θ_f)(q1 k1 + q2 k2) + sin(a θ_f)(q1 k2 − q2 k1)): no
turned copy of the queries is written. Its cos/sin table comes from float64 angles, once per forward.

Padded or gapped plans (padding, a bounded cache's gaps) and a ceiling inside the window take another backend
(`unsupported` says why; dispatch.py records which path ran).
"""

from __future__ import annotations

import math
from functools import cache

import torch

from ..settings import Settings
from .blocks import _flash
from .plan import Plan, alibi_bias, far_positions, is_far, visible
from .positions import Alibi, Rope

NAME = "flash-window"
HALF = (torch.float16, torch.bfloat16)
WINDOW_BLOCK = 512  # query rows per call of the reference window branch (memory O(block x (block + w)))
EAGER_ROWS = 1024  # query rows per eager far-branch call (its fp32 temporaries are rows x g x d/2)


@cache
def kernel_available() -> bool:
    """Whether this torch has the flash op with a sliding window (torch >= 2.5 built with CUDA)."""
    try:
        schema = torch.ops.aten._flash_attention_forward.default._schema
    except (AttributeError, RuntimeError):
        return False
    names = {a.name for a in schema.arguments}
    return torch.cuda.is_available() and {"window_size_left", "window_size_right", "scale"} <= names


def uses_flash(query: torch.Tensor) -> bool:
    """Whether the window branch runs as the CUDA flash call (else the reference implementation)."""
    return query.is_cuda and query.dtype in HALF and kernel_available()


def unsupported(plan: Plan, settings: Settings, position) -> str | None:
    """None when this backend computes the forward exactly, else why not (the caller takes another backend)."""
    if settings.n_local > settings.limit_distance:
        return "ceiling inside the window"
    if not plan.is_contiguous():
        return "padded or gapped plan"
    return None


def window_attention(q, k, v, w: float, scaling: float, slopes=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention over the last w keys of each query (queries are the last Q of the K key slots; w may be
    inf), with the log-sum-exp: (output [b, hq, Q, dv] in q's dtype, lse [b, hq, Q] fp32). `slopes` [hq]: ALiBi,
    -slope x distance added to each score. The flash call on CUDA in half precision, else the reference."""
    if uses_flash(q) and (slopes is None or not _NO_FLASH_ALIBI):
        try:
            return _window_flash(q, k, v, w, scaling, slopes)
        except RuntimeError as err:  # a torch build without ALiBi in its flash kernel: the reference from now on
            if slopes is None or "alibi" not in str(err).lower():
                raise
            _NO_FLASH_ALIBI.append(str(err))
    return window_reference(q, k, v, w, scaling, slopes)


_NO_FLASH_ALIBI: list[str] = []


def _window_flash(q, k, v, w, scaling, slopes):
    """One call of PyTorch's bundled FlashAttention-2 (layout [b, n, h, d]; causal is bottom-right aligned, so
    a chunk read after earlier keys works; fewer K/V heads than query heads are native)."""
    left = int(w) - 1 if math.isfinite(w) else -1
    extra = {"alibi_slopes": slopes.to(q.device, torch.float32)} if slopes is not None else {}
    out, lse = torch.ops.aten._flash_attention_forward(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, None, q.shape[2], k.shape[2], 0.0, True,
        False, scale=scaling, window_size_left=left, window_size_right=0, **extra,
    )[:2]  # fmt: skip
    return out.transpose(1, 2), lse[..., : q.shape[2]]


def window_reference(q, k, v, w: float, scaling: float, slopes=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The window branch without the CUDA kernel: blocks of query rows, each one fused attention call (on CPU
    PyTorch's flash kernel, fp32 accumulation) over its key span under a band mask (and ALiBi bias)."""
    b, hq, n_q, _ = q.shape
    n_k = k.shape[2]
    off = n_k - n_q
    out = q.new_empty(b, n_q, hq, v.shape[-1]).transpose(1, 2)  # flash's layout, so both return alike
    lse = torch.empty(b, hq, n_q, device=q.device, dtype=torch.float32)
    for s in range(0, n_q, WINDOW_BLOCK):
        e = min(n_q, s + WINDOW_BLOCK)
        lo = max(0, off + s - int(w) + 1) if math.isfinite(w) else 0
        hi = off + e
        dist = torch.arange(off + s, hi, device=q.device)[:, None] - torch.arange(lo, hi, device=q.device)
        seen = (dist >= 0) & (dist < w)
        if slopes is None:
            bias = torch.where(seen, 0.0, -math.inf)[None, None]
        else:
            bias = (-slopes.to(q.device, torch.float32)[:, None, None] * dist).masked_fill(~seen, -math.inf)[None]
        o, part_lse = _flash(q[:, :, s:e], k[:, :, lo:hi], v[:, :, lo:hi], bias.to(q.dtype), scaling, fused=True)
        out[:, :, s:e] = o
        lse[:, :, s:e] = part_lse
    return out, lse


def far_merge(out, lse, q, k_near, k_far, v, cos, sin, near_bias, far_bias, scaling: float, interleaved: bool):
    """The far branch and the merge, in place into `out` (no fp32 copy of it). Shapes, grouped by K/V head
    (hq = hk x G): out [b, hk, G, n, dv] (q's dtype), lse [b, hk, G, n] fp32, q [b, hk, G, n, d];
    k_near [b, hk, 1, g, d] (the keys as given) or None; k_far [b, hk, 1, g, d] fp32 (turned to their far
    positions) or None; v [b, hk, 1, g, dv]; cos/sin [b, 1, 1, n, F] fp32, the query's far turn over the F
    rotated frequency pairs; near_bias/far_bias [b, 1|hk, 1|G, n, g] fp32: 0 (RoPE) or the ALiBi bias where
    the pair takes that score, -inf elsewhere. Scores and weights in fp32."""
    qf = q.float()
    s = None
    if k_near is not None:
        s = _dot(qf, k_near.float()) * scaling + near_bias
    if k_far is not None:
        f = cos.shape[-1]
        q1, q2, qp = _split(qf, f, interleaved)
        k1, k2, kp = _split(k_far, f, interleaved)
        c, si = cos[..., None, :], sin[..., None, :]  # [.., n, 1, F] against keys [.., 1, g, F]
        q1, q2, k1, k2 = q1[..., :, None, :], q2[..., :, None, :], k1[..., None, :, :], k2[..., None, :, :]
        turned = (c * (q1 * k1 + q2 * k2) + si * (q1 * k2 - q2 * k1)).sum(-1)
        if qp.shape[-1]:
            turned = turned + _dot(qp, kp)
        far = turned * scaling + far_bias
        s = far if s is None else torch.maximum(s, far)
    m = torch.maximum(lse, s.amax(-1))
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # (a row that saw nothing: all weights 0)
    a = torch.exp(lse - m)
    p = torch.exp(s - m[..., None])
    den = (a + p.sum(-1)).clamp_min(1e-30)
    num = a[..., None] * out.float() + torch.matmul(p, v.float())
    out.copy_(num / den[..., None])


def _dot(q, k):
    """q·k over the last dim for every (query, key): [.., n, d] x [.., g, d] -> [.., n, g], as a reduction."""
    return (q[..., :, None, :] * k[..., None, :, :]).sum(-1)


def _split(x, f: int, interleaved: bool):
    """The rotated pairs' first and second members, and the unrotated rest (partial rotary)."""
    if interleaved:
        return x[..., 0 : 2 * f : 2], x[..., 1 : 2 * f : 2], x[..., 2 * f :]
    return x[..., :f], x[..., f : 2 * f], x[..., 2 * f :]


@cache
def compiled_far_merge():
    """`far_merge` compiled in one graph (the first length static, later lengths one dynamic-shape recompile)."""
    return torch.compile(far_merge, fullgraph=True)


def flash_window_attention(query, key, value, plan: Plan, settings: Settings, position, scaling) -> torch.Tensor:
    """query [b, hq, Q, d], key/value [b, hk, K, d] -> [b, hq, Q, dv]; same semantics as `lambda_attention`,
    for a plan `unsupported` accepts."""
    w = settings.n_local
    slopes = position.slopes if isinstance(position, Alibi) else None
    out, lse = window_attention(query, key, value, w, scaling, slopes)
    b, hq, n_q, _ = query.shape
    hk, n_k = key.shape[1], key.shape[2]
    off = n_k - n_q
    g = min(settings.n_global, n_k)
    first = max(0, int(w) - off) if math.isfinite(w) else n_q  # queries before it see every global key locally
    if g == 0 or first >= n_q:
        return out
    parts = _far_layout(plan, settings, position, first, g, query.device)
    groups = hq // hk

    def grouped(x):  # [b, hq, ...] -> [b, hk, G, ...]
        return x.unflatten(1, (hk, groups))

    keys, vals = key[:, :, None, :g], value[:, :, None, :g]
    k_near = keys if parts["near"] is not None else None
    k_far = None
    if parts["k_turn"] is not None:
        k_far = position.apply(keys[:, :, 0].float(), parts["k_turn"])[:, :, None]
    near_bias, far_bias = (_bias_view(parts[name], hk, groups) for name in ("near", "far"))
    run = compiled_far_merge() if query.is_cuda else far_merge
    step = n_q - first if query.is_cuda else EAGER_ROWS
    interleaved = isinstance(position, Rope) and position.interleaved
    for s in range(first, n_q, step):
        e = min(n_q, s + step)
        r = slice(s - first, e - first)
        cos, sin = (t[..., r, :] if t is not None else None for t in parts["q_turn"])
        run(
            grouped(out[:, :, s:e]), grouped(lse[:, :, s:e]), grouped(query[:, :, s:e]), k_near, k_far, vals,
            cos, sin, _rows(near_bias, r), _rows(far_bias, r), scaling, interleaved,
        )  # fmt: skip
    return out


def _rows(bias, r: slice):
    return bias[..., r, :] if bias is not None else None


def _bias_view(bias, hk: int, groups: int):
    """[b, 1|hq, n, g] -> [b, 1|hk, 1|G, n, g]."""
    if bias is None:
        return None
    return bias[:, :, None] if bias.shape[1] == 1 else bias.unflatten(1, (hk, groups))


def _far_layout(plan: Plan, settings: Settings, position, first: int, g: int, device) -> dict:
    """What the far branch needs that depends on the plan only, once per forward (`Plan.memo`): for query rows
    from `first` and the g global key slots, which pairs it scores and how (biases), the keys' and queries' far
    turns."""
    memo_key = ("flash-window-far", first, g, plan.q_idx.shape[1], str(device))
    found = plan.memo.get(memo_key)
    if found is not None:
        return found
    qi, ki = plan.q_idx[:, first:], plan.k_idx[:, :g]
    dist = qi[:, :, None] - ki[:, None, :]  # [b, n, g]
    w, limit = settings.n_local, settings.limit_distance
    seen = visible(dist, ki[:, None, :], plan.k_valid[:, None, :g], settings.n_global, w) & ~(dist < w)
    parts = {"near": None, "far": None, "k_turn": None, "q_turn": (None, None)}
    if isinstance(position, Alibi):
        slopes = position.slopes.to(device, torch.float32).view(1, -1, 1, 1)
        bias = alibi_bias(slopes, qi[:, None, :, None], ki[:, None, None, :], settings).float()
        parts["near"] = bias.masked_fill(~seen[:, None], -math.inf)
    else:
        far = is_far(dist, limit) if math.isfinite(limit) else torch.zeros_like(seen)
        zero = torch.zeros(seen.shape, device=device)
        if bool((seen & ~far).any()):
            parts["near"] = zero.masked_fill(~(seen & ~far), -math.inf)[:, None]
        if bool((seen & far).any()):
            parts["far"] = zero.masked_fill(~(seen & far), -math.inf)[:, None]
            q_pos, _ = far_positions(qi, qi, settings)
            _, k_pos = far_positions(ki, ki, settings)
            parts["k_turn"] = position.rotation(k_pos - ki, torch.float32)
            inv = position.inv_freq.to(device=device, dtype=torch.float64)
            angles = (q_pos - qi).to(torch.float64)[:, None, None, :, None] * inv  # [b, 1, 1, n, F]
            parts["q_turn"] = (angles.cos().float(), angles.sin().float())
    nbytes = sum(t.numel() * t.element_size() for t in _tensors(parts))
    return plan.remember(memo_key, parts, nbytes)


def _tensors(parts: dict):
    for value in parts.values():
        for t in value if isinstance(value, tuple) else (value,):
            if isinstance(t, torch.Tensor):
                yield t
