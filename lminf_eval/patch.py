"""Turn a transformers causal LM into its LM-Infinite version in place, and back.

The path of one forward: a pre-hook on the base model builds the `Forward` (the `Plan` of where each token
sits, the settings, the position encoding) and, when a cache is used, swaps in the bounded `LMInfiniteCache`.
RoPE families receive the `Forward` as the keyword argument `lm_infinite`, which transformers hands down to the
attention function registered as "lm_infinite" (`lm_infinite_attention` -> `attention.dispatch.lambda_attention`).
MPT and Bloom compute attention inline and pass no keyword arguments down, so their attention modules get a
small replacement forward (`AlibiAttention`, holding the `Patch`), which reads the `Forward` the hook left in
`Patch.current`.
"""

from __future__ import annotations

import copy
import inspect
import types
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .attention.dispatch import lambda_attention
from .attention.plan import Plan
from .attention.positions import Alibi, Rope, bloom_slopes, gptj_inv_freq, mpt_slopes
from .cache import LMInfiniteCache
from .errors import LMInfiniteError
from .rope_scaling import apply_rope_scaling
from .settings import Settings

IMPLEMENTATION = "lm_infinite"

# model_type -> how relative position enters attention
FAMILIES = {
    "llama": "rope",
    "mistral": "rope",
    "qwen2": "rope",
    "qwen3": "rope",
    "gpt_neox": "rope",
    "phi": "rope",
    "gptj": "rope",
    "mpt": "alibi",
    "bloom": "alibi",
}
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
    shared_config: object = None  # the config the model had: it may be shared, so we patch a copy
    gptj_table: torch.Tensor | None = None
    current: Forward | None = None  # MPT/Bloom only: the running forward's `Forward` (see module docstring)


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
    config = getattr(model, "config", None)
    family = FAMILIES.get(getattr(config, "model_type", None))
    if family is None:
        raise LMInfiniteError(
            f"unsupported architecture {getattr(config, 'model_type', type(model).__name__)!r}: "
            f"LM-Infinite supports {', '.join(sorted(FAMILIES))}"
        )
    l_pre = pretraining_length_override or pretraining_length(config)
    resolved = Settings.resolve(l_pre, target_length, **settings)
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
    patch.position = position_encoding(model)
    patch.shared_config, config = config, _own_config(model, config)
    register_attention(IMPLEMENTATION, lambda_attention)
    use_implementation(model, IMPLEMENTATION)
    if family == "alibi":
        for module in model.modules():
            if _is_attention(module):
                _set(patch, module, "forward", AlibiAttention(module, patch, config))
    if config.model_type == "gptj":
        rotary = base.rotary_emb
        patch.gptj_table = rotary.embed_positions
        _set(patch, rotary, "forward", types.MethodType(_gptj_rotary_forward, rotary))
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
    if patch.gptj_table is not None:  # the grown sin/cos table goes back to its original size
        model.base_model.rotary_emb.embed_positions = patch.gptj_table
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
    if FAMILIES.get(model.config.model_type) == "alibi":
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


def _set(patch: Patch, obj, name: str, value) -> None:
    setattr(obj, name, value)
    patch.patched.append((obj, name))


def _is_attention(module: nn.Module) -> bool:
    return type(module).__name__.endswith("Attention") and hasattr(module, "layer_idx")


def position_encoding(model: nn.Module) -> Rope | Alibi:
    """How `model` encodes relative position, read from its own parameters (rotary `inv_freq`, ALiBi slopes)."""
    config, base = model.config, model.base_model
    if FAMILIES.get(config.model_type) == "alibi":
        if config.model_type == "mpt":
            return Alibi(mpt_slopes(base, config.n_heads))
        return Alibi(bloom_slopes(config.n_head))
    rotary = getattr(base, "rotary_emb", None)
    if rotary is not None and hasattr(rotary, "inv_freq"):
        return Rope(source=rotary, fixed_inv_freq=None, interleaved=False)
    if config.model_type == "gptj":
        return Rope(source=None, fixed_inv_freq=gptj_inv_freq(rotary.pos_embd_dim), interleaved=True)
    raise LMInfiniteError(f"cannot find the rotary embedding of {config.model_type}")


# --- per-forward plan and cache --------------------------------------------------------------------
# Hooks and replacement forwards are small objects holding what they read (not closures), so that
# `copy.deepcopy` of a patched model gives a copy whose hooks read the copy's own patch and config.


class BeforeForward:
    """Pre-hook on the base model: builds this forward's `Forward` and swaps in the bounded cache."""

    def __init__(self, model: nn.Module, patch: Patch):
        self.config, self.patch = model.config, patch
        self.signature = inspect.signature(model.base_model.forward)  # (read once: this runs every decode step)
        self.cache_name = "cache" if "cache" in self.signature.parameters else "past_key_values"

    def __call__(self, module, args, kwargs):
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
        if FAMILIES[self.config.model_type] == "alibi":
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


# --- ALiBi families: replacement attention forwards --------------------------------------------------


class AlibiAttention:
    """The forward of an MPT or Bloom attention module, with attention through the registered function."""

    def __init__(self, module: nn.Module, patch: Patch, config):
        self.module, self.patch, self.config = module, patch, config

    def attend(self, q, k, v, scaling) -> torch.Tensor:
        """The registered attention function the model's implementation names, called as transformers would."""
        attention = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        return attention(self.module, q, k, v, None, scaling=scaling, lm_infinite=self.patch.current)[0]

    def __call__(self, hidden_states, *args, **kwargs):
        if self.config.model_type == "mpt":
            return self.mpt(hidden_states, *args, **kwargs)
        return self.bloom(hidden_states, *args, **kwargs)

    def mpt(self, hidden_states, position_bias=None, cache=None, attention_mask=None, **kwargs):
        m = self.module
        b, n = hidden_states.shape[:2]
        qkv = m.Wqkv(hidden_states)
        if m.clip_qkv:
            qkv = qkv.clamp(min=-m.clip_qkv, max=m.clip_qkv)
        q, k, v = (t.reshape(b, n, m.n_heads, m.head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=2))
        if cache is not None:
            k, v = cache.update(k, v, m.layer_idx)
        out = self.attend(q, k, v, m.softmax_scale)  # [b, n, h, d]
        return m.out_proj(out.reshape(b, n, -1)), None

    def bloom(self, hidden_states, residual, alibi=None, attention_mask=None, layer_past=None, **kwargs):
        from transformers.models.bloom.modeling_bloom import dropout_add

        m = self.module
        b, n = hidden_states.shape[:2]
        # Bloom fuses q, k, v per head: [b, n, heads * 3 * head_dim]
        fused = m.query_key_value(hidden_states).view(b, n, m.num_heads, 3, m.head_dim)
        q, k, v = (fused[..., i, :].transpose(1, 2) for i in range(3))
        if layer_past is not None:
            k, v = layer_past.update(k, v, m.layer_idx)
        out = m.dense(self.attend(q, k, v, m.inv_norm_factor).reshape(b, n, -1))
        return dropout_add(out, residual, m.hidden_dropout, m.training), None


def _gptj_rotary_forward(self, x: torch.Tensor, position_ids: torch.LongTensor):
    """GPT-J reads sin/cos from a table of max_position_embeddings rows; grow it (same values) on demand."""
    from transformers.models.gptj.modeling_gptj import create_sinusoidal_positions

    needed = int(position_ids.max()) + 1
    if needed > self.embed_positions.shape[0]:
        table = create_sinusoidal_positions(max(needed, 2 * self.embed_positions.shape[0]), self.pos_embd_dim)
        self.embed_positions = table.to(self.embed_positions.device)
    return type(self).forward(self, x, position_ids)
