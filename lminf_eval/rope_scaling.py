"""Transformers' own RoPE scaling (PI = "linear", dynamic NTK = "dynamic", YaRN = "yarn") set on a loaded model.

The model's rotary embedding is rebuilt from a copy of its config with `rope_parameters` changed, so the
frequencies (and YaRN's attention factor) come from transformers' `ROPE_INIT_FUNCTIONS`, not from code of ours.
Known pitfall (methods.md): a cache keeps keys rotated with the frequencies in force when they were written,
so dynamic NTK mixes bases once generation grows past the prompt; a single forward (perplexity) is unaffected.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from torch import nn

from .errors import LMInfiniteError


def apply_rope_scaling(model: nn.Module, rope_type: str, factor: float, pretraining_length: int) -> Callable:
    """Give `model` RoPE scaling `rope_type` with factor `factor` over `pretraining_length`; returns the
    function that puts the original rotary embedding back."""
    config, base = model.config, model.base_model
    rotary = getattr(base, "rotary_emb", None)
    params = getattr(config, "rope_parameters", None)
    if rotary is None or not hasattr(rotary, "inv_freq") or not isinstance(params, dict) or "rope_theta" not in params:
        raise LMInfiniteError(
            f"rope_type {rope_type} needs a model with transformers' rotary embedding; {config.model_type} has none"
        )
    if params.get("rope_type", "default") != "default":
        raise LMInfiniteError(
            f"this model already uses rope_type {params['rope_type']!r}: {rope_type} would replace its native scaling"
        )
    scaled = copy.deepcopy(config)
    scaled.rope_parameters = {**params, "rope_type": rope_type, "factor": float(factor)}
    if rope_type == "yarn":
        scaled.rope_parameters["original_max_position_embeddings"] = pretraining_length
    scaled.max_position_embeddings = pretraining_length  # dynamic NTK's threshold L
    base.rotary_emb = type(rotary)(scaled).to(rotary.inv_freq.device)

    def undo(model: nn.Module) -> None:
        model.base_model.rotary_emb = rotary

    return undo
