"""An O(n^2) restatement of ../shared/docs/method.md, written apart from the kernel: dense float64 scores
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


def reference_attention(query, key, value, plan, settings, position, scaling, layer_idx=0):
    """query [b, hq, n, d], key/value [b, hk, K, d] -> [b, hq, n, d]."""
    q, k, v = query.double(), key.double(), value.double()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    i = plan.q_idx[:, None, :, None].double()  # [b, 1, n, 1]
    j = plan.k_idx[:, None, None, :].double()  # [b, 1, 1, K]
    valid = plan.k_valid[:, None, None, :]
    dist = i - j
    d_eff = torch.clamp(dist, min=0, max=settings.limit_distance)
    g, w = settings.n_global, settings.n_local
    visible = valid & (dist >= 0) & ((j < g) | (dist < w))

    plain = torch.einsum("bhid,bhjd->bhij", q, k) * scaling
    if isinstance(position, Alibi):
        slopes = position.slopes.to(q.device).double().view(1, -1, 1, 1)
        scores = plain - slopes * d_eff
    else:
        # method.md step 3: below the ceiling the ordinary rotated q.k; at or past it <R(L) q_raw, k_raw>
        inv = position.inv_freq.to(q.device).double()
        il = position.interleaved
        q_raw = _rotate_pairs(q, -i * inv, il)  # undo each token's own rotation
        k_raw = _rotate_pairs(k, -plan.k_idx[:, None, :, None].double() * inv, il)
        q_at_limit = _rotate_pairs(
            q_raw,
            torch.full_like(i, settings.limit_distance if math.isfinite(settings.limit_distance) else 0) * inv,
            il,
        )
        far = torch.einsum("bhid,bhjd->bhij", q_at_limit, k_raw) * scaling
        scores = torch.where(dist >= settings.limit_distance, far, plain)

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
