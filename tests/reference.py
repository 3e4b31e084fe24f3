"""An O(n^2) restatement of docs/method.md, written apart from the kernel: dense float64 scores
for every (query, key) pair, its own rotation code, the rules applied literally pair by pair.

It has the kernel's signature and is registered with transformers' attention registry as
"lm_infinite_reference", so `reference(model)` runs a patched model through it in the kernel's place.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from lminf_eval import register_attention, use_implementation
from lminf_eval.attention.positions import Alibi
from lminf_eval.patch import IMPLEMENTATION

REFERENCE = "lm_infinite_reference"


@contextmanager
def reference(model):
    """The patched `model` with the reference attention in place of the kernel, for the block."""
    register_attention(REFERENCE, reference_attention)
    use_implementation(model, REFERENCE)
    try:
        yield model
    finally:
        use_implementation(model, IMPLEMENTATION)


def _halves(x: torch.Tensor, f: int, interleaved: bool):
    if interleaved:
        return x[..., 0 : 2 * f : 2], x[..., 1 : 2 * f : 2]
    return x[..., :f], x[..., f : 2 * f]


def _scores_at(q_raw, k_raw, d, inv, interleaved: bool) -> torch.Tensor:
    """<R(d_ij) q_i, k_j> for every pair: sum over pairs f of cos(d theta_f)(qa ka + qb kb) +
    sin(d theta_f)(qa kb - qb ka), plus the unrotated dims' plain product. In query chunks (memory)."""
    f = inv.shape[0]
    ka, kb = _halves(k_raw, f, interleaved)
    rest = torch.einsum("bhid,bhjd->bhij", q_raw[..., 2 * f :], k_raw[..., 2 * f :])
    step = max(1, (1 << 24) // (k_raw.shape[1] * k_raw.shape[2] * f))
    d = d.expand(q_raw.shape[0], 1, q_raw.shape[2], k_raw.shape[2])
    rows = []
    for s in range(0, q_raw.shape[2], step):
        qa, qb = _halves(q_raw[:, :, s : s + step], f, interleaved)
        angle = d[:, :, s : s + step, :, None] * inv  # [b, 1, n, K, F]
        same = torch.einsum("bhif,bhjf->bhijf", qa, ka) + torch.einsum("bhif,bhjf->bhijf", qb, kb)
        cross = torch.einsum("bhif,bhjf->bhijf", qa, kb) - torch.einsum("bhif,bhjf->bhijf", qb, ka)
        rows.append((angle.cos() * same + angle.sin() * cross).sum(-1))
    return torch.cat(rows, 2) + rest


def _rotate_pairs(x: torch.Tensor, angle: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate the first 2*F dims of x by angle[..., F] (x and angle broadcast), the rest untouched."""
    f = angle.shape[-1]
    cos, sin = angle.cos(), angle.sin()
    if interleaved:
        a, b = x[..., 0 : 2 * f : 2], x[..., 1 : 2 * f : 2]
    else:
        a, b = x[..., :f], x[..., f : 2 * f]
    ra, rb = a * cos - b * sin, b * cos + a * sin
    if interleaved:
        rot = torch.stack((ra, rb), dim=-1).flatten(-2)
    else:
        rot = torch.cat((ra, rb), dim=-1)
    return torch.cat((rot, x[..., 2 * f :]), dim=-1)


def distance(i: torch.Tensor, j: torch.Tensor, settings) -> torch.Tensor:
    """d(i, j) for every pair as methods.md section 1 states it, read literally from the method's definition."""
    delta = i - j
    L, G, rule = settings.limit_distance, settings.group_size, settings.far_distance
    if math.isfinite(settings.chunk_size):
        return dual_chunk_distance(i, j, settings)
    if not math.isfinite(L):
        return delta
    if rule == "ceiling":  # LM-Infinite, ReRoPE: min(delta, L)
        far = torch.full_like(delta, float(L))
    elif rule == "cache":  # StreamingLLM: the distance between slots of the cache the query sees
        s, r = settings.n_global, int(settings.n_local)
        t = torch.arange(int(max(i.max(), j.max())) + 1, dtype=i.dtype)
        kept = (t < s) | ((t > i[..., None] - r) & (t <= i[..., None]))  # after token i: sinks + last r
        slot = kept.cumsum(-1) - 1  # [b, 1, n, 1, T]: a kept token's slot = kept tokens before it
        shape = (*delta.shape, t.shape[0])
        slot_i = slot.gather(-1, i.clamp(min=0)[..., None].long()).squeeze(-1)  # (padding queries: -1)
        slot_j = slot.expand(shape).gather(-1, j.clamp(min=0).long()[..., None].expand(*delta.shape, 1)).squeeze(-1)
        far = slot_i - slot_j
    elif rule == "grouped":  # Self-Extend: floor(i/G) - floor(j/G) + W - floor(W/G)
        far = torch.floor(i / G) - torch.floor(j / G) + L - L // G
    elif rule == "leaky":  # Leaky ReRoPE: L + (delta - L)/k
        far = L + (delta - L) / G
    else:  # STRING: delta - S + W (shift S = L, local value W = shift_local)
        far = delta - L + settings.shift_local
    return torch.where(delta >= L, far, delta)


def dual_chunk_distance(i: torch.Tensor, j: torch.Tensor, settings) -> torch.Tensor:
    """DCA (ChunkLlama's chunkllama_attn_replace.py): chunks of c = chunk_size - local_window tokens; the key at
    j mod c, the query at a position chosen by how many chunks back the key is."""
    size = settings.chunk_size
    c = size - settings.local_window
    key_at = j - torch.floor(j / c) * c  # j mod c
    q_in_chunk = i - torch.floor(i / c) * c  # i mod c
    back = torch.floor(i / c) - torch.floor(j / c)  # 0: same chunk, 1: the chunk before, 2+: earlier
    intra = q_in_chunk  # its own chunk: the query at i mod c (the pair's own distance)
    successive = torch.clamp(q_in_chunk + c, max=size)  # the chunk before: min(i mod c + c, chunk_size)
    inter = torch.full_like(i, min(2 * c - 1, size))  # earlier chunks: the last query's successive position
    query_at = torch.where(back == 0, intra, torch.where(back == 1, successive, inter))
    return query_at - key_at


def reference_attention(query, key, value, plan, settings, position, scaling, layer_idx=0):
    """query [b, hq, n, d], key/value [b, hk, K, d] -> [b, hq, n, d]."""
    q, k, v = query.double(), key.double(), value.double()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    i = plan.q_idx[:, None, :, None].double()  # [b, 1, n, 1]
    j = plan.k_idx[:, None, None, :].double()  # [b, 1, 1, K]
    valid = plan.k_valid[:, None, None, :]
    dist = i - j
    d_eff = distance(i, j, settings).clamp(min=0)
    g, w = settings.n_global, settings.n_local
    visible = valid & (dist >= 0) & ((j < g) | (dist < w))
    if settings.log_scale_base:  # ReRoPE's log-n scaling of the query
        q = q * torch.clamp(torch.log(i + 1) / math.log(settings.log_scale_base), min=1.0)

    plain = torch.einsum("bhid,bhjd->bhij", q, k) * scaling
    if isinstance(position, Alibi):
        slopes = position.slopes.to(q.device).double().view(1, -1, 1, 1)
        scores = plain - slopes * d_eff
    else:
        # method.md step 3, for every pair: <R(d) q_raw, k_raw>, rotating pair f by d * theta_f
        inv = position.inv_freq.to(q.device).double()
        il = position.interleaved
        q_raw = _rotate_pairs(q, -i * inv, il)  # undo each token's own rotation
        k_raw = _rotate_pairs(k, -plan.k_idx[:, None, :, None].double() * inv, il)
        dual_chunk = math.isfinite(settings.chunk_size)
        if settings.far_distance == "ceiling" and not dual_chunk:  # one distance for every far pair: two products
            q_at_limit = _rotate_pairs(q_raw, torch.full_like(i, float(min(settings.limit_distance, 1e12))) * inv, il)
            far = torch.einsum("bhid,bhjd->bhij", q_at_limit, k_raw) * scaling
            scores = torch.where(dist >= settings.limit_distance, far, plain)
        else:  # a distance per pair (O(n^2 x dims): small inputs only)
            scores = _scores_at(q_raw, k_raw, d_eff, inv, il) * scaling

    scores = scores.masked_fill(~visible, -math.inf)
    if settings.top_k and layer_idx >= settings.top_k_from_layer:
        last = scores[:, :, -1]  # [b, h, K]
        middle = (valid & (j >= g) & (dist >= w) & (dist >= 0))[:, :, -1]
        dd = settings.top_k_distance
        if isinstance(position, Alibi):
            mid = plain[:, :, -1] - slopes[..., 0] * dd
        else:
            q_d = _rotate_pairs(q_raw[:, :, -1:], torch.full_like(i[:, :, -1:], float(dd)) * inv, il)
            mid = (q_d * k_raw).sum(-1) * scaling  # [b, h, K]
        mid = mid.masked_fill(~middle.expand_as(mid), -math.inf)
        top = mid.topk(min(settings.top_k, mid.shape[-1]), dim=-1)
        last = last.scatter(-1, top.indices, top.values)
        scores = torch.cat((scores[:, :, :-1], last[:, :, None]), dim=2)

    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (probs @ v).to(query.dtype)
