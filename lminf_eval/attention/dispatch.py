"""LM-Infinite's attention: the backend named by the settings, then the optional top-k last row.

Every backend computes the same function (docs/method.md) and reads the rules from `plan.py`:
`blocks` (fused attention calls per query block; `blocks-masked` without the band calls, `plain` in plain fp32
math), `flex` (FlexAttention, compiled on CUDA) and `flash-window` (PyTorch's sliding-window flash kernel plus a
small far branch, for contiguous plans with w <= L; a reference window branch off CUDA). `auto` takes
flash-window on CUDA for RoPE in fp16/bf16 where the plan allows, else flex there, and blocks elsewhere. Which
path ran, and why a backend fell back, is counted (`paths_run`), for results.json and the benchmarks.
"""

from __future__ import annotations

import math
from collections import Counter

import torch

from ..settings import Settings
from . import blocks, dca, flash_window, flex
from .blocks import _attend, _raw_scores
from .plan import Plan, alibi_bias, far_positions, is_far, log_scale, visible
from .positions import Alibi, Rope


def backend_for(settings: Settings, device: torch.device, dtype: torch.dtype | None = None, position=None) -> str:
    """The backend asked for: `auto` resolved for the device (and, when given, the dtype and position encoding).
    A backend may still fall back for a given plan (`lambda_attention` records which path ran)."""
    if settings.backend != "auto":
        return settings.backend
    if device.type != "cuda" or settings.dual_chunk:  # (dual chunk attention: the blocks kernel's own branch)
        return "blocks"
    flash = dtype in flash_window.HALF and not isinstance(position, Alibi) and flash_window.kernel_available()
    return flash_window.NAME if flash else "flex"


# how often each attention path ran in this process: backend name, or "fallback (backend: reason)"
PATHS: Counter = Counter()


def paths_run(reset: bool = False) -> dict[str, int]:
    """Calls per attention path since the last reset (one per layer per forward)."""
    found = dict(PATHS)
    if reset:
        PATHS.clear()
    return found


def _ran(path: str) -> None:
    if not torch.compiler.is_compiling():  # (a compiled graph replays no Python side effect)
        PATHS[path] += 1


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
    from ..ring_cache import RingStep, ring_attention

    if isinstance(plan, RingStep):  # a one-token step over a ring cache's g + w slots
        _ran("ring")
        return ring_attention(query, key, value, plan, settings, position, scaling)
    backend = backend_for(settings, query.device, query.dtype, position)
    if settings.log_scale_base:
        query = query * log_scale(plan.q_idx, settings.log_scale_base).to(query.dtype)[:, None, :, None]
    path = backend
    if backend == flash_window.NAME:
        why = flash_window.unsupported(plan, settings, position)
        if why is None:
            where = "CUDA flash" if flash_window.uses_flash(query) else "reference window"
            path = f"{backend} ({where})"
        else:
            backend = "flex" if query.device.type == "cuda" else "blocks"
            path = f"{backend} (flash-window: {why})"
    _ran(path)
    if backend == flash_window.NAME:
        out = flash_window.flash_window_attention(query, key, value, plan, settings, position, scaling)
    elif backend == "flex":
        out = flex.flex_attention_lambda(query, key, value, plan, settings, position, scaling)
    else:
        fused, use_band = backend != "plain", backend != "blocks-masked"
        kernel = dca.dual_chunk_attention if settings.dual_chunk else blocks.blocked_attention  # (DCA: own branch)
        out = kernel(query, key, value, plan, settings, position, scaling, fused, use_band)
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
