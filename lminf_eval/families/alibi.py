"""What ALiBi families share: they compute attention inline and pass no keyword arguments down, so their
attention modules get a replacement forward that calls the registered attention function itself, with the
`Forward` the patch's pre-hook left in `patch.current`. A new ALiBi-like family is one file: an
`InlineAttention` subclass (the model's attention forward, re-written around `self.attend`) and an
`AlibiFamily` subclass naming it, with its slopes."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .base import Family


class InlineAttention:
    """A replacement attention forward. A small object holding what it reads (not a closure), so that
    `copy.deepcopy` of a patched model gives a copy whose forwards read the copy's own patch and config."""

    def __init__(self, module: nn.Module, patch, config):
        self.module, self.patch, self.config = module, patch, config

    def attend(self, q, k, v, scaling) -> torch.Tensor:
        """The registered attention function the model's implementation names, called as transformers would."""
        attention = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        return attention(self.module, q, k, v, None, scaling=scaling, lm_infinite=self.patch.current)[0]

    def __call__(self, hidden_states, *args, **kwargs):
        raise NotImplementedError


class AlibiFamily(Family):
    kind = "alibi"
    registry_attention = False
    Attention: ClassVar[type[InlineAttention]] = InlineAttention  # the replacement forward of its attention modules

    def install(self, model: nn.Module, patch, config) -> None:
        for module in model.modules():
            if type(module).__name__.endswith("Attention") and hasattr(module, "layer_idx"):
                patch.set(module, "forward", self.Attention(module, patch, config))
