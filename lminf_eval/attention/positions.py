"""How a family encodes relative position, so the kernel can score a pair at any distance it chooses.

LM-Infinite needs scores at distances the model never produced itself: the ceiling L for far keys and the
fixed distance D for top-k middle tokens. For RoPE that means re-rotating the already-rotated q and k by
an offset; for ALiBi it is just a different bias. Both are derived from the model's own parameters, by each
family's adapter (`lminf_eval.families`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Rope:
    """Rotary embedding read from the model: `inv_freq` (rope scaling already applied), rotated dims, layout."""

    source: nn.Module | None  # module holding the live `inv_freq` buffer (dynamic rope types update it)
    fixed_inv_freq: torch.Tensor | None  # for families that do not keep one (GPT-J builds a sin/cos table)
    interleaved: bool  # GPT-J rotates pairs (0,1),(2,3)...; the others rotate halves

    @property
    def inv_freq(self) -> torch.Tensor:
        return self.source.inv_freq if self.source is not None else self.fixed_inv_freq

    def rotation(self, offset: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [b, 1, n, rot] turning each position by `offset` [b, n]; angles in float64, so offsets
        of a million tokens keep their precision."""
        inv_freq = self.inv_freq.to(device=offset.device, dtype=torch.float64)
        angles = offset.to(torch.float64)[:, None, :, None] * inv_freq  # [b, 1, n, rot/2]
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        if self.interleaved:
            return cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)
        return torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)

    def apply(self, x: torch.Tensor, turn: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Rotate the rotary dims of `x` [b, h, n, d]; the rest (partial rotary) pass through."""
        cos, sin = turn
        rot = cos.shape[-1]
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        if self.interleaved:
            x1, x2 = x_rot[..., ::2], x_rot[..., 1::2]
            turned = torch.stack((-x2, x1), dim=-1).flatten(-2)
        else:
            x1, x2 = x_rot.chunk(2, dim=-1)
            turned = torch.cat((-x2, x1), dim=-1)
        out = x_rot * cos + turned * sin
        return torch.cat((out, x_pass), dim=-1) if x_pass.shape[-1] else out

    def rotate(self, x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """Rotate `x` [b, h, n, d] by `offset` [b, n] positions; a pure rotation (no attention scaling)."""
        return self.apply(x, self.rotation(offset, x.dtype))


@dataclass
class Alibi:
    """ALiBi slopes per query head: the bias of a pair at distance d is -slope * d."""

    slopes: torch.Tensor  # [heads], positive
