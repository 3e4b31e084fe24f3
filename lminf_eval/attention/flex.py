"""The Λ-attention as FlexAttention calls: the fused backend on CUDA.

Two calls over all key slots, merged by log-sum-exp: the near pairs (visible, distance below the ceiling)
with the model's own q·k, and the far pairs (visible, at or past the ceiling) with the query re-rotated to L
and the key rotated back to 0 (RoPE; with w <= L only the global slots can be far, so that call is small).
ALiBi needs one call, the clamped distance going in as a score_mod. The block masks depend only on the plan:
they are built once per forward and shared by all layers (`Plan.memo`). On CUDA both flex_attention and
create_block_mask are compiled (fused, block-sparse, never n x n); elsewhere they run eagerly, which
materialises the scores, so tests use this path on CPU at small sizes only.
"""

from __future__ import annotations

import math
from functools import cache

import torch
from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

from ..settings import Settings
from .merge import merge
from .plan import Plan, alibi_bias, far_positions, is_far, visible
from .positions import Alibi, Rope

NO_LIMIT = 1 << 40  # stands in for an infinite window or ceiling in integer comparisons


@cache
def _compiled():
    # One model compiles ~6 variants of each (near/far mask, prefill/decode, static then dynamic lengths);
    # past dynamo's default limit of 8 it would fall back to eager flex, which builds every n x n score.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(flex_attention), torch.compile(create_block_mask)


def _ops(device: torch.device):
    return _compiled() if device.type == "cuda" else (flex_attention, create_block_mask)


def flex_attention_lambda(query, key, value, plan: Plan, settings: Settings, position, scaling) -> torch.Tensor:
    """query [b, hq, Q, d], key/value [b, hk, K, d] -> [b, hq, Q, dv]; same semantics as `lambda_attention`."""
    attend, block_mask = _ops(query.device)
    b, _, n_q, _ = query.shape
    if key.shape[1] == 1:  # one K/V head (MQA) viewed in the cache: inductor found no flex kernel for its
        key, value = key.contiguous(), value.contiguous()  # stride (torch 2.11, H200); a compact copy
    n_k = key.shape[2]
    n_local = int(settings.n_local) if math.isfinite(settings.n_local) else NO_LIMIT
    limit_distance = int(settings.limit_distance) if math.isfinite(settings.limit_distance) else NO_LIMIT
    q_idx, k_idx, k_valid, n_global = plan.q_idx, plan.k_idx, plan.k_valid, settings.n_global
    rope_far = isinstance(position, Rope) and limit_distance < NO_LIMIT

    def seen(bi, h, q, k):
        return visible(q_idx[bi, q] - k_idx[bi, k], k_idx[bi, k], k_valid[bi, k], n_global, n_local)

    def near(bi, h, q, k):
        return seen(bi, h, q, k) & ~is_far(q_idx[bi, q] - k_idx[bi, k], limit_distance)

    def far(bi, h, q, k):
        return seen(bi, h, q, k) & is_far(q_idx[bi, q] - k_idx[bi, k], limit_distance)

    n_far = plan.global_slots if n_local <= limit_distance else n_k  # far keys live in the global slots when w <= L
    memo_key = ("flex", n_q, n_k, query.device)
    masks = plan.memo.get(memo_key)
    if masks is None:
        masks = (
            block_mask(near if rope_far else seen, b, None, n_q, n_k, device=query.device),
            block_mask(far, b, None, n_q, n_far, device=query.device) if rope_far and n_far else None,
        )
        plan.remember(memo_key, masks, 0)  # (block masks are O(n^2 / 128^2): not counted)
    score_mod = None
    if isinstance(position, Alibi):
        slopes = position.slopes.to(query.device, torch.float32)

        def score_mod(score, bi, h, q, k):
            return score + alibi_bias(slopes[h], q_idx[bi, q], k_idx[bi, k], settings)

    out, aux = attend(
        query, key, value, score_mod, masks[0], scale=scaling, enable_gqa=True, return_aux=AuxRequest(lse=True)
    )
    if masks[1] is None:
        return out
    q_pos, k_pos = far_positions(q_idx, k_idx[:, :n_far], settings)
    q_far = position.rotate(query, q_pos - q_idx)
    k_far = position.rotate(key[:, :, :n_far], k_pos - k_idx[:, :n_far])
    out2, aux2 = attend(
        q_far, k_far, value[:, :, :n_far], None, masks[1], scale=scaling, enable_gqa=True,
        return_aux=AuxRequest(lse=True),
    )  # fmt: skip
    return merge([(out, aux.lse.float()), (out2, aux2.lse.float())], into=torch.empty_like(out))
