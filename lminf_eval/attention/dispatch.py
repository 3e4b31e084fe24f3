"""LM-Infinite's attention: the backend named by the settings, then the optional top-k last row.

Every backend computes the same function (docs/method.md) and reads the rules from `plan.py`:
`blocks` (fused attention calls per query block; `blocks-masked` without the band calls, `plain` in plain fp32
math) and `flex` (FlexAttention, compiled on CUDA). `auto` takes flex on CUDA and blocks elsewhere.
"""

from __future__ import annotations

import math

import torch

from ..settings import Settings
from . import blocks, flex
from .blocks import _attend, _raw_scores
from .plan import Plan, alibi_bias, far_positions, is_far, log_scale, visible
from .positions import Alibi, Rope


def backend_for(settings: Settings, device: torch.device) -> str:
    """The backend that runs: `auto` resolved for the device."""
    if settings.backend == "auto":
        return "flex" if device.type == "cuda" else "blocks"
    return settings.backend


def lambda_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    plan: Plan,
    settings: Settings,
    position: Rope | Alibi,
    scaling: float,
    layer_idx: int = 0,
) -> torch.Tensor:
    """query [b, hq, Q, d], key/value [b, hk, K, d] -> output [b, hq, Q, dv] in query's dtype."""
    backend = backend_for(settings, query.device)
    if settings.log_scale_base:
        query = query * log_scale(plan.q_idx, settings.log_scale_base).to(query.dtype)[:, None, :, None]
    if backend == "flex":
        out = flex.flex_attention_lambda(query, key, value, plan, settings, position, scaling)
    else:
        fused, use_band = backend != "plain", backend != "blocks-masked"
        out = blocks.blocked_attention(query, key, value, plan, settings, position, scaling, fused, use_band)
    if settings.top_k and layer_idx >= settings.top_k_from_layer:
        out[:, :, -1:] = _last_row_with_top_k(query[:, :, -1:], key, value, plan, settings, position, scaling)
    return out


def _scores(q, k, qi, ki, kvalid, settings: Settings, position) -> torch.Tensor:
    """Dense masked LM-Infinite logits for a few query rows: [b, hk, G, n, K] fp32, -inf where not visible."""
    dist = (qi[:, :, None] - ki[:, None, :])[:, None, None]
    limit_distance = settings.limit_distance
    s = _raw_scores(q, k, 1.0)
    if isinstance(position, Alibi):
        slopes = position.slopes.to(s.device).view(1, k.shape[1], -1, 1, 1)
        s = s + alibi_bias(slopes, qi[:, None, None, :, None], ki[:, None, None, None, :], settings)
    elif math.isfinite(limit_distance):
        far = is_far(dist, limit_distance)
        if bool(far.any()):
            q_pos, k_pos = far_positions(qi, ki, settings)
            s = torch.where(far, _raw_scores(position.rotate(q, q_pos - qi), position.rotate(k, k_pos - ki), 1.0), s)
    ki, kvalid = ki[:, None, None, None, :], kvalid[:, None, None, None, :]
    seen = visible(dist, ki, kvalid, settings.n_global, settings.n_local)
    return s.masked_fill_(~seen, -math.inf)


def _last_row_with_top_k(q, key, value, plan: Plan, settings: Settings, position, scaling) -> torch.Tensor:
    """The last query row re-attended over all keys: its Λ-visible keys plus the top-k middle keys, these
    scored as if they sat at distance D (method.md, optional top-k). O(K) for one row."""
    q = q * scaling  # ALiBi biases are not scaled; RoPE scores are q·k * scaling
    qi = plan.q_idx[:, -1:]
    s = _scores(q, key, qi, plan.k_idx, plan.k_valid, settings, position)
    dist = (qi - plan.k_idx)[:, None, None, None, :]
    middle = plan.k_valid[:, None, None, None, :] & (plan.k_idx >= settings.n_global)[:, None, None, None, :]
    middle = middle & (dist >= settings.n_local) & (dist >= 0)
    if not bool(middle.any()):
        return _attend(s, value).to(q.dtype)
    d = settings.top_k_distance
    if isinstance(position, Alibi):
        mid = _raw_scores(q, key, 1.0) - position.slopes.to(s.device).view(1, key.shape[1], -1, 1, 1) * d
    else:
        mid = _raw_scores(position.rotate(q, d - qi), position.rotate(key, -plan.k_idx), 1.0)
    mid = mid.masked_fill_(~middle, -math.inf)
    top, where = mid.topk(min(settings.top_k, mid.shape[-1]), dim=-1)
    s.scatter_(-1, where, top)  # middle keys are never Λ-visible, so nothing is overwritten
    return _attend(s, value).to(q.dtype)
