"""Softmax attention over disjoint key sets, combined exactly from each part's log-sum-exp."""

from __future__ import annotations

import torch


def merge(parts: list[tuple[torch.Tensor, torch.Tensor]], into: torch.Tensor) -> torch.Tensor:
    """Combine (output [b, h, n, d], log-sum-exp [b, h, n]) parts into `into`, accumulated in fp32 and in
    place (at 32k tokens this runs over every query of every layer). A row that saw no key in a part has
    weight 0 there and weighs by the other parts alone."""
    if len(parts) == 1:
        return into.copy_(parts[0][0])
    lse = torch.stack([p[1] for p in parts])
    weights = (lse - lse.max(0).values).exp_().nan_to_num_(0.0)
    weights /= weights.sum(0).clamp_min(1e-30)
    weights = weights.unsqueeze(-1)
    if torch.is_grad_enabled() and any(o.requires_grad for o, _ in parts):  # (autograd refuses `out=`)
        return into.copy_(sum(o * wt for (o, _), wt in zip(parts, weights, strict=True)))
    acc = into if into.dtype in (torch.float32, torch.float64) else torch.empty(into.shape, device=into.device)
    torch.mul(parts[0][0], weights[0], out=acc)
    for (o, _), wt in zip(parts[1:], weights[1:], strict=True):
        acc.addcmul_(o, wt)
    return acc if acc is into else into.copy_(acc)
