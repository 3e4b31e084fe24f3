"""The Λ-attention as FlexAttention calls: the fused backend on CUDA for plans flash-window does not take.

Two calls over the key slots, merged by log-sum-exp: the near pairs (visible, distance below the ceiling)
with the model's own q·k, and the far pairs (visible, at or past the ceiling) with the query re-rotated to its
far position and the key to its own (RoPE; with w <= L only the global slots can be far, so that call is
small, and for one unpadded sequence it reads only the queries at or past the ceiling). ALiBi, and a plan with
no far pair, need one call, and ask for no log-sum-exp. Block masks depend only on the plan: built once per
forward for all layers (`Plan.memo`); for one unpadded sequence (the plan a benchmark or a long prompt gives)
the mask functions are arithmetic on q and k, and the masks are kept across forwards of the same shape. On CUDA
flex_attention and create_block_mask are compiled (fused, block-sparse, never n x n); elsewhere they run
eagerly, which materialises the scores, so tests use this path on CPU at small sizes only.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from functools import cache

import torch
from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

from ..settings import Settings
from .plan import Plan, alibi_bias, far_positions, is_far, visible
from .positions import Alibi, Rope

NO_LIMIT = 1 << 40  # stands in for an infinite window or ceiling in integer comparisons
KEPT_MASKS = 8  # block masks of unpadded plans kept across forwards (one per shape and setting)
RECOMPILE_LIMIT = 64  # one model compiles ~6 variants of each op (near/far mask, prefill/decode, static then
# dynamic lengths); past dynamo's default (8) flex would fall back to eager, which builds every n x n score.
_MASKS: OrderedDict = OrderedDict()


@cache
def _compiled():
    return torch.compile(flex_attention), torch.compile(create_block_mask)


def _ops(device: torch.device):
    return _compiled() if device.type == "cuda" else (flex_attention, create_block_mask)


def _masks(plan: Plan, settings: Settings, n_q: int, n_k: int, n_far: int, rope_far: bool, device) -> tuple:
    """(near-or-all mask, far mask or None, first query row of the far call), built once per forward; for a
    contiguous plan from arithmetic on (q, k) and kept across forwards."""
    contiguous = plan.is_contiguous()
    key = (n_q, n_k, n_far, rope_far, settings.n_global, settings.n_local, settings.limit_distance, str(device))
    found = _MASKS.get(key) if contiguous else plan.memo.get(("flex", key))
    if found is not None:
        if contiguous:
            _MASKS.move_to_end(key)
        return found
    n_local = int(settings.n_local) if math.isfinite(settings.n_local) else NO_LIMIT
    limit = int(settings.limit_distance) if math.isfinite(settings.limit_distance) else NO_LIMIT
    n_global, off = settings.n_global, n_k - n_q
    first = min(n_q, max(0, limit - off)) if contiguous and rope_far else 0  # earlier rows have no far pair
    if contiguous:  # token j in slot j, query row q is token q + off

        def dist(b, q, k, row0=0):
            return q + row0 + off - k

        def seen(b, h, q, k, row0=0):
            return visible(dist(b, q, k, row0), k, True, n_global, n_local)
    else:
        q_idx, k_idx, k_valid = plan.q_idx, plan.k_idx, plan.k_valid

        def dist(b, q, k, row0=0):
            return q_idx[b, q + row0] - k_idx[b, k]

        def seen(b, h, q, k, row0=0):
            return visible(dist(b, q, k, row0), k_idx[b, k], k_valid[b, k], n_global, n_local)

    def near(b, h, q, k):
        return seen(b, h, q, k) & ~is_far(dist(b, q, k), limit)

    def far(b, h, q, k):
        return seen(b, h, q, k, first) & is_far(dist(b, q, k, first), limit)

    block_mask = _ops(device)[1]
    batch = 1 if contiguous else plan.k_idx.shape[0]
    found = (
        block_mask(near if rope_far else seen, batch, None, n_q, n_k, device=device),
        block_mask(far, batch, None, n_q - first, n_far, device=device) if rope_far and n_far and first < n_q else None,
        first,
    )
    if contiguous:
        _MASKS[key] = found
        while len(_MASKS) > KEPT_MASKS:
            _MASKS.popitem(last=False)
        return found
    return plan.remember(("flex", key), found, 0)  # (block masks are O(n^2 / 128^2): not counted)


def flex_attention_lambda(query, key, value, plan: Plan, settings: Settings, position, scaling) -> torch.Tensor:
    """query [b, hq, Q, d], key/value [b, hk, K, d] -> [b, hq, Q, dv]; same semantics as `lambda_attention`."""
    with torch._dynamo.config.patch(recompile_limit=max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)):
        return _flex_lambda(query, key, value, plan, settings, position, scaling)


def _flex_lambda(query, key, value, plan: Plan, settings: Settings, position, scaling) -> torch.Tensor:
    attend = _ops(query.device)[0]
    n_q = query.shape[2]
    if key.shape[1] == 1:  # one K/V head (MQA) viewed in the cache: inductor found no flex kernel for its
        key, value = key.contiguous(), value.contiguous()  # stride (torch 2.11, H200); a compact copy
    n_k = key.shape[2]
    rope_far = isinstance(position, Rope) and math.isfinite(settings.limit_distance)
    # far keys live in the global slots when w <= L
    n_far = plan.global_slots if settings.n_local <= settings.limit_distance else n_k
    near_mask, far_mask, first = _masks(plan, settings, n_q, n_k, n_far, rope_far, query.device)
    score_mod = None
    if isinstance(position, Alibi):
        slopes, q_idx, k_idx = position.slopes.to(query.device, torch.float32), plan.q_idx, plan.k_idx

        def score_mod(score, bi, h, q, k):
            return score + alibi_bias(slopes[h], q_idx[bi, q], k_idx[bi, k], settings)

    lse = AuxRequest(lse=True) if far_mask is not None else None
    out = attend(query, key, value, score_mod, near_mask, scale=scaling, enable_gqa=True, return_aux=lse)
    if far_mask is None:
        return out
    out, aux = out
    q_idx, k_idx = plan.q_idx[:, first:], plan.k_idx[:, :n_far]
    q_pos, k_pos = far_positions(q_idx, k_idx, settings)
    q_far = position.rotate(query[:, :, first:], q_pos - q_idx)
    k_far = position.rotate(key[:, :, :n_far], k_pos - k_idx)
    out2, aux2 = attend(
        q_far, k_far, value[:, :, :n_far], None, far_mask, scale=scaling, enable_gqa=True,
        return_aux=AuxRequest(lse=True),
    )  # fmt: skip
    merge = _compiled_merge() if query.is_cuda else merge_into
    merge(out[:, :, first:], aux.lse[:, :, first:], out2, aux2.lse)
    return out


def merge_into(out: torch.Tensor, lse: torch.Tensor, out2: torch.Tensor, lse2: torch.Tensor) -> None:
    """out <- the softmax over both key sets, from each part's output and log-sum-exp, in place in out's dtype
    (weights and sum in fp32; compiled on CUDA into one kernel, so no fp32 copy of the output is written).
    A row that saw no key in a part has weight 0 there."""
    m = torch.maximum(lse, lse2).float()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    a, b = torch.exp(lse.float() - m)[..., None], torch.exp(lse2.float() - m)[..., None]
    out.copy_((a * out.float() + b * out2.float()) / (a + b).clamp_min(1e-30))


@cache
def _compiled_merge():
    return torch.compile(merge_into, fullgraph=True)
