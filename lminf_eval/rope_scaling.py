"""Transformers' own RoPE scaling (PI = "linear", dynamic NTK = "dynamic", YaRN = "yarn") set on a loaded model.

The model's rotary embedding is rebuilt from a copy of its config with `rope_parameters` changed, so the
frequencies (and YaRN's attention factor) come from transformers' `ROPE_INIT_FUNCTIONS`, not from code of ours.
Known pitfalls (methods.md): a cache keeps keys rotated with the frequencies in force when they were written,
so dynamic NTK mixes bases once generation grows past the prompt; and transformers' dynamic rotary keeps the
largest base it has grown to until a forward strictly shorter than L_pre, so a forward of length L_pre (or any
length) after a longer one reads the longer one's base unless `reset_dynamic_rope` runs between them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from torch import nn

from .errors import LMInfiniteError

# rope types whose rotation depends on the length of the forward (the others: a run-wide factor)
LENGTH_DEPENDENT = frozenset({"dynamic"})


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


def reset_dynamic_rope(model: nn.Module) -> None:
    """Put a dynamic rotary back at its L_pre base, so the next forward's base follows that forward's length
    alone (transformers grows it with each longer forward and shrinks it only below L_pre). No-op otherwise."""
    rotary = getattr(model.base_model, "rotary_emb", None)
    if rotary is None or getattr(rotary, "rope_type", None) not in LENGTH_DEPENDENT:
        return
    if rotary.max_seq_len_cached != rotary.original_max_seq_len:
        original = rotary.original_inv_freq.to(rotary.inv_freq.device)
        rotary.register_buffer("inv_freq", original.clone(), persistent=False)
        rotary.max_seq_len_cached = rotary.original_max_seq_len
