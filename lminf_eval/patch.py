"""Turn a transformers causal LM into its LM-Infinite version in place, and back.

The path of one forward: a pre-hook on the base model builds the `Forward` (the `Plan` of where each token
sits, the settings, the position encoding) and, when a cache is used, swaps in the bounded `LMInfiniteCache`.
RoPE families receive the `Forward` as the keyword argument `lm_infinite`, which transformers hands down to the
attention function registered as "lm_infinite" (`lm_infinite_attention` -> `attention.dispatch.lambda_attention`).
MPT and Bloom compute attention inline and pass no keyword arguments down, so their attention modules get a
small replacement forward (`families.alibi.InlineAttention`, holding the `Patch`), which reads the `Forward` the
hook left in `Patch.current`. What differs between families is read from their adapter (`lminf_eval.families`).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import AttentionMaskInterface

from .attention.dispatch import lambda_attention
from .attention.plan import Plan
from .attention.positions import Alibi, Rope
from .cache import LMInfiniteCache
from .errors import LMInfiniteError
from .families import FAMILIES, family_of
from .ring_cache import LMInfiniteRingCache, check_settings
from .rope_scaling import apply_rope_scaling
from .settings import Settings

IMPLEMENTATION = "lm_infinite"
LENGTH_KEYS = ("max_position_embeddings", "max_seq_len", "n_positions", "seq_length", "n_ctx")


@dataclass
class Forward:
    """What every attention layer of one forward needs: passed down as the `lm_infinite` keyword argument."""

    plan: Plan
    settings: Settings
    position: Rope | Alibi


@dataclass
class Patch:
    """What `apply_lm_infinite` changed on a model (`model.lm_infinite`), so `remove_lm_infinite` can undo it."""

    settings: Settings
    position: Rope | Alibi | None  # None: attention is the model's own (only a RoPE scaling was set)
    pretraining_length: int | None
    undo_rope: Callable | None = None  # puts the rotary embedding back after `apply_rope_scaling`
    hooks: list = field(default_factory=list)
    patched: list = field(default_factory=list)  # (object, attribute) pairs we set and must delete
    saved: list = field(default_factory=list)  # (object, attribute, value) to put back (e.g. GPT-J's table)
    shared_config: object = None  # the config the model had: it may be shared, so we patch a copy
    current: Forward | None = None  # MPT/Bloom only: the running forward's `Forward` (see module docstring)

    def set(self, obj, name: str, value) -> None:
        """Set an attribute that `remove_lm_infinite` deletes (e.g. a replacement `forward`)."""
        setattr(obj, name, value)
        self.patched.append((obj, name))

    def restore_later(self, obj, name: str) -> None:
        """Note the attribute's value now: `remove_lm_infinite` puts it back (it may change meanwhile)."""
        self.saved.append((obj, name, getattr(obj, name)))


def pretraining_length(config) -> int | None:
    for key in LENGTH_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def apply_lm_infinite(
    model: nn.Module, *, pretraining_length_override: int | None = None, target_length: int | None = None, **settings
) -> nn.Module:
    """Patch `model` in place and return it. `settings` are the fields of `lminf_eval.Settings` (help in
    `lminf_eval.settings.HELP`; unset: the default, lengths from the pretraining length L_pre in the config;
    `math.inf` switches the window or the ceiling off, for the ablations). The peer methods are settings too:
    a RoPE scaling (`rope_type`) is set on the model first, and attention is replaced only where the settings
    change it (`Settings.changes_attention`). `target_length`: the longest input, for the default rope_factor."""
    family = family_of(model)
    config = model.config
    l_pre = pretraining_length_override or pretraining_length(config)
    resolved = Settings.resolve(l_pre, target_length, **settings)
    if resolved.dual_chunk and family.kind != "rope":
        raise LMInfiniteError(
            f"dual chunk attention re-rotates queries per key chunk, which needs RoPE; {config.model_type} uses "
            f"{family.kind or 'another position encoding'}: use another method"
        )
    layers = getattr(config, "num_hidden_layers", None)
    if resolved.top_k and isinstance(layers, int) and resolved.top_k_from_layer >= layers:
        raise LMInfiniteError(
            f"top_k_from_layer {resolved.top_k_from_layer} is past the model's {layers} layers: use 0..{layers - 1}"
        )
    # (checked before an earlier patch is removed: a refused re-apply leaves the model as it was)
    if getattr(model, "lm_infinite", None) is not None:
        remove_lm_infinite(model)
        config = model.config  # (the earlier patch's own copy is gone: patch the model's config again)
    patch = Patch(resolved, None, l_pre)
    if resolved.rope_type != "none":
        patch.undo_rope = apply_rope_scaling(model, resolved.rope_type, resolved.rope_factor, l_pre)
    model.lm_infinite = patch
    if not resolved.changes_attention:
        return model
    base = model.base_model
    patch.position = family.position(model)
    patch.shared_config, config = config, _own_config(model, config)
    register_attention(IMPLEMENTATION, lambda_attention)
    use_implementation(model, IMPLEMENTATION)
    family.install(model, patch, config)
    patch.hooks.append(base.register_forward_pre_hook(BeforeForward(model, patch), with_kwargs=True))
    patch.hooks.append(base.register_forward_hook(AfterForward(patch), with_kwargs=True))
    return model


def remove_lm_infinite(model: nn.Module) -> nn.Module:
    """Undo `apply_lm_infinite`: the model computes exactly what it did before."""
    patch = getattr(model, "lm_infinite", None)
    if patch is None:
        return model
    for hook in patch.hooks:
        hook.remove()
    for obj, name in patch.patched:
        delattr(obj, name)
    for obj, name, value in patch.saved:
        setattr(obj, name, value)
    if patch.shared_config is not None:
        _own_config(model, patch.shared_config, swap_back=True)
    if patch.undo_rope is not None:
        patch.undo_rope(model)
    del model.lm_infinite
    return model


def configure(model: nn.Module, **changes) -> None:
    """Change settings of an already patched model (e.g. the top-k options) without re-patching; checked as
    `apply_lm_infinite` checks them."""
    patch: Patch | None = getattr(model, "lm_infinite", None)
    if patch is None:
        raise LMInfiniteError("configure() needs a patched model: call apply_lm_infinite first")
    settings = patch.settings.replace(patch.pretraining_length, **changes)
    fixed = ("rope_type", "rope_factor", "changes_attention")
    if any(getattr(settings, name) != getattr(patch.settings, name) for name in fixed):
        raise LMInfiniteError("configure() cannot change the RoPE scaling or switch attention on/off: re-apply")
    patch.settings = settings


def register_attention(name: str, kernel: Callable) -> None:
    """Register `kernel` (the signature of `attention.dispatch.lambda_attention`) with transformers' attention and
    mask registries under `name`; `use_implementation(model, name)` then routes a patched model through it."""
    AttentionInterface.register(name, _attention_function(kernel))
    AttentionMaskInterface.register(name, lm_infinite_mask)


def use_implementation(model: nn.Module, name: str) -> None:
    """Select a registered attention implementation. MPT and Bloom do not use transformers' attention registry
    (`set_attn_implementation` refuses them): for them the name only picks the mask function, and our
    replacement forwards look the attention function up by it."""
    family = FAMILIES.get(model.config.model_type)
    if family is not None and not family.registry_attention:
        model.config._attn_implementation = name
    else:
        model.set_attn_implementation(name)


def lm_infinite_mask(batch_size: int, *args, **kwargs) -> torch.Tensor:
    """Registered mask function: the kernels mask from the plan, so no n x n mask is ever built. A zero-size
    tensor (not None) because some models (MPT) call `.to()` on the mask."""
    return torch.empty(0, dtype=torch.bool)


def _attention_function(kernel: Callable) -> Callable:
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, lm_infinite=None, **kwargs):
        """Same contract as transformers' sdpa/eager attention functions; `lm_infinite` is the `Forward`."""
        if lm_infinite is None:
            raise LMInfiniteError("this model selects LM-Infinite attention but is not patched: call apply_lm_infinite")
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        f = lm_infinite
        out = kernel(query, key, value, f.plan, f.settings, f.position, scaling, module.layer_idx)
        return out.transpose(1, 2).contiguous(), None

    return attention


def _own_config(model: nn.Module, config, swap_back: bool = False):
    """Give every module of `model` that holds `config` a copy of it (or, `swap_back`, the original again):
    selecting our attention is a config setting, and two models may share one config object."""
    mine = config if swap_back else copy.deepcopy(config)
    held = model.config
    for module in model.modules():
        if getattr(module, "config", None) is held:
            module.config = mine
    return mine


def position_encoding(model: nn.Module) -> Rope | Alibi:
    """How `model` encodes relative position, read from its own parameters (rotary `inv_freq`, ALiBi slopes)."""
    return family_of(model).position(model)


# --- per-forward plan and cache --------------------------------------------------------------------
# Hooks and replacement forwards are small objects holding what they read (not closures), so that
# `copy.deepcopy` of a patched model gives a copy whose hooks read the copy's own patch and config.


class BeforeForward:
    """Pre-hook on the base model: builds this forward's `Forward` and swaps in the bounded cache."""

    def __init__(self, model: nn.Module, patch: Patch):
        self.config, self.patch = model.config, patch
        self.inline = not family_of(model).registry_attention  # (its attention reads `patch.current`)
        self.signature = inspect.signature(model.base_model.forward)  # (read once: this runs every decode step)
        self.cache_name = "cache" if "cache" in self.signature.parameters else "past_key_values"

    def __call__(self, module, args, kwargs):
        ring = kwargs.get(self.cache_name, kwargs.get("past_key_values"))
        if isinstance(ring, LMInfiniteRingCache):
            return self._ring(ring, args, kwargs)
        cache_name = self.cache_name
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        bound.update(bound.pop("kwargs", {}))
        tokens = bound.get("input_ids")
        tokens = tokens if tokens is not None else bound["inputs_embeds"]
        batch, n_new = tokens.shape[:2]
        mask = bound.get("attention_mask")
        cache = bound.get(cache_name, bound.get("past_key_values"))
        use_cache = bound.get("use_cache")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        settings = self.patch.settings
        fresh = cache is None or (type(cache) is DynamicCache and cache.get_seq_length() == 0)
        if use_cache and settings.bounded and fresh:
            cache = LMInfiniteCache(self.config.num_hidden_layers, settings.n_global, settings.n_local)
            bound.pop("past_key_values", None)
            bound[cache_name] = cache
        if isinstance(cache, LMInfiniteCache):
            plan = cache.begin(mask, batch, n_new, tokens.device)
        else:
            past = cache.get_seq_length() if isinstance(cache, Cache) else 0
            plan = Plan.from_mask(mask, batch, n_new, past, settings.n_global, tokens.device)
        forward = Forward(plan, settings, self.patch.position)
        bound["lm_infinite"] = forward
        if self.inline:
            self.patch.current = forward
        return (), bound

    def _ring(self, ring: LMInfiniteRingCache, args, kwargs):
        """The ring cache's forward: no host reads on a one-token step (it compiles into one graph); the model
        is given each token's real-token index as its position."""
        bound = dict(kwargs) if not args else self.signature.bind_partial(*args, **kwargs).arguments
        bound.update(bound.pop("kwargs", {}))
        settings = self.patch.settings
        check_settings(settings)
        if (ring.n_global, ring.n_local) != (settings.n_global, settings.n_local):
            raise LMInfiniteError("this ring cache was sized for other settings: build it with for_model(model)")
        tokens = bound.get("input_ids")
        tokens = tokens if tokens is not None else bound["inputs_embeds"]
        batch, n_new = tokens.shape[:2]
        layout = ring.begin(bound.get("attention_mask"), batch, n_new, tokens.device)
        if "position_ids" in self.signature.parameters:
            bound["position_ids"] = layout.q_idx if n_new == 1 else ring.positions
        forward = Forward(layout, settings, self.patch.position)
        bound["lm_infinite"] = forward
        if self.inline:
            self.patch.current = forward
        return (), bound


class AfterForward:
    """Post-hook on the base model: the forward is over; the bounded cache updates its bookkeeping."""

    def __init__(self, patch: Patch):
        self.patch = patch

    def __call__(self, module, args, kwargs, output):
        self.patch.current = None
        cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
        if isinstance(cache, LMInfiniteCache):
            cache.end()
        return output
