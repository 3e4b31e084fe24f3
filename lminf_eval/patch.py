"""Turn a transformers causal LM into its LM-Infinite version in place, and back.

RoPE families go through transformers' own extension points: an attention function and a mask function
registered as "lm_infinite". ALiBi families (MPT, Bloom) compute attention inline, so their attention
modules get a small replacement forward. A pre-hook on the base model builds the per-forward `Plan` (where
each token sits in its own sequence) and swaps in the bounded `LMInfiniteCache`; a post-hook prunes it.
"""

from __future__ import annotations

import inspect
import math
import types
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import AttentionMaskInterface

from .attention.kernel import Plan, Settings, lambda_attention
from .attention.positions import Alibi, Rope, bloom_slopes, gptj_inv_freq, mpt_slopes
from .cache import LMInfiniteCache, full_plan
from .errors import UserError

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


class LMInfiniteError(UserError):
    """A bad argument or an unsupported model; the message is one line and names the fix."""


@dataclass
class State:
    """Everything the attention code needs, shared by all attention modules of one patched model."""

    settings: Settings
    position: Rope | Alibi
    pretraining_length: int
    plan: Plan | None = None
    saved_attn: str | None = None
    hooks: list = field(default_factory=list)
    patched: list = field(default_factory=list)  # (object, attribute) pairs we set and must delete
    gptj_table: torch.Tensor | None = None


def pretraining_length(config) -> int | None:
    for key in LENGTH_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def apply_lm_infinite(
    model: nn.Module,
    n_global: int = 10,
    n_local: float | None = None,
    limit_distance: float | None = None,
    top_k: int | None = None,
    top_k_from_layer: int = 4,
    top_k_distance: float | None = None,
    pretraining_length_override: int | None = None,
) -> nn.Module:
    """Patch `model` in place and return it. `None` means the pretraining length L_pre from the config;
    `math.inf` disables the window (`n_local`) or the ceiling (`limit_distance`) for the ablations."""
    config = model.config
    family = FAMILIES.get(getattr(config, "model_type", None))
    if family is None:
        raise LMInfiniteError(
            f"unsupported architecture {getattr(config, 'model_type', type(model).__name__)!r}: "
            f"LM-Infinite supports {', '.join(sorted(FAMILIES))}"
        )
    if getattr(model, "lm_infinite", None) is not None:
        remove_lm_infinite(model)
    l_pre = pretraining_length_override or pretraining_length(config)
    if l_pre is None and (n_local is None or limit_distance is None):
        raise LMInfiniteError(
            f"{config.model_type} config has no pretraining length: pass n_local and limit_distance explicitly"
        )
    settings = Settings(
        n_global=int(n_global),
        n_local=_length(n_local, l_pre, "n_local"),
        limit_distance=_length(limit_distance, l_pre, "limit_distance"),
        top_k=int(top_k or 0),
        top_k_from_layer=int(top_k_from_layer),
        top_k_distance=_length(top_k_distance, (l_pre or 2) // 2, "top_k_distance"),
    )
    if settings.n_global < 0 or settings.top_k < 0:
        raise LMInfiniteError("n_global and top_k must be >= 0")
    if settings.n_global > settings.n_local:
        raise LMInfiniteError(
            f"n_global ({settings.n_global}) > n_local ({settings.n_local}): lower --n-global or raise --n-local"
        )
    base = model.base_model
    state = State(settings, _position(model, base, family), l_pre or 0)
    _register()
    state.saved_attn = config._attn_implementation
    config._attn_implementation = IMPLEMENTATION
    for module in model.modules():
        if _is_attention(module):
            _set(state, module, "lm_infinite_state", state)
            if family == "alibi":
                forward = _mpt_forward if config.model_type == "mpt" else _bloom_forward
                _set(state, module, "forward", types.MethodType(forward, module))
    if config.model_type == "gptj":
        rotary = base.rotary_emb
        state.gptj_table = rotary.embed_positions
        _set(state, rotary, "forward", types.MethodType(_gptj_rotary_forward, rotary))
    state.hooks.append(base.register_forward_pre_hook(_before_forward(model, base, state), with_kwargs=True))
    state.hooks.append(base.register_forward_hook(_after_forward(state), with_kwargs=True))
    model.lm_infinite = state
    return model


def remove_lm_infinite(model: nn.Module) -> nn.Module:
    """Undo `apply_lm_infinite`: the model computes exactly what it did before."""
    state = getattr(model, "lm_infinite", None)
    if state is None:
        return model
    for hook in state.hooks:
        hook.remove()
    for obj, name in state.patched:
        delattr(obj, name)
    if state.gptj_table is not None:  # the grown sin/cos table goes back to its original size
        model.base_model.rotary_emb.embed_positions = state.gptj_table
    model.config._attn_implementation = state.saved_attn
    del model.lm_infinite
    return model


def configure(model: nn.Module, **changes) -> None:
    """Change settings of an already patched model (e.g. the top-k options) without re-patching."""
    state = model.lm_infinite
    state.settings = replace(state.settings, **changes)


def _length(value, default, name) -> float:
    if value is None:
        value = default
    if value is None:
        raise LMInfiniteError(f"{name} is required for a model whose config has no pretraining length")
    if isinstance(value, float) and math.isinf(value):
        return math.inf
    if int(value) < 1:
        raise LMInfiniteError(f"{name} must be >= 1 (or inf), got {value}")
    return int(value)


def _set(state: State, obj, name: str, value) -> None:
    setattr(obj, name, value)
    state.patched.append((obj, name))


def _is_attention(module: nn.Module) -> bool:
    return type(module).__name__.endswith("Attention") and hasattr(module, "layer_idx")


def _position(model, base, family: str) -> Rope | Alibi:
    config = model.config
    if family == "alibi":
        if config.model_type == "mpt":
            return Alibi(mpt_slopes(config.n_heads, config.attn_config.alibi_bias_max))
        return Alibi(bloom_slopes(config.n_head))
    rotary = getattr(base, "rotary_emb", None)
    if rotary is not None and hasattr(rotary, "inv_freq"):
        return Rope(source=rotary, fixed_inv_freq=None, interleaved=False)
    if config.model_type == "gptj":
        return Rope(source=None, fixed_inv_freq=gptj_inv_freq(rotary.pos_embd_dim), interleaved=True)
    raise LMInfiniteError(f"cannot find the rotary embedding of {config.model_type}")


# --- transformers registries -------------------------------------------------------------------------


def lm_infinite_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Registered attention function: same contract as transformers' sdpa/eager functions."""
    state: State = module.lm_infinite_state
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    out = lambda_attention(query, key, value, state.plan, state.settings, state.position, scaling, module.layer_idx)
    return out.transpose(1, 2).contiguous(), None


def lm_infinite_mask(batch_size: int, *args, **kwargs) -> torch.Tensor:
    """Registered mask function: the kernel masks from the plan, so no n x n mask is ever built. A
    zero-size tensor (not None) because some models (MPT) call `.to()` on the mask."""
    return torch.empty(0, dtype=torch.bool)


def _register() -> None:
    AttentionInterface.register(IMPLEMENTATION, lm_infinite_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, lm_infinite_mask)


# --- per-forward plan and cache --------------------------------------------------------------------


def _before_forward(model, base, state: State):
    signature = inspect.signature(base.forward)
    cache_name = "cache" if "cache" in signature.parameters else "past_key_values"
    num_layers = model.config.num_hidden_layers

    def hook(module, args, kwargs):
        bound = signature.bind_partial(*args, **kwargs).arguments
        bound.update(bound.pop("kwargs", {}))
        tokens = bound.get("input_ids")
        tokens = tokens if tokens is not None else bound["inputs_embeds"]
        batch, n_new = tokens.shape[:2]
        mask = bound.get("attention_mask")
        cache = bound.get(cache_name, bound.get("past_key_values"))
        use_cache = bound.get("use_cache")
        use_cache = model.config.use_cache if use_cache is None else use_cache
        s = state.settings
        bounded = math.isfinite(s.n_local) and not s.top_k
        fresh = cache is None or (type(cache) is DynamicCache and cache.get_seq_length() == 0)
        if use_cache and bounded and fresh:
            cache = LMInfiniteCache(num_layers, s.n_global, s.n_local)
            bound.pop("past_key_values", None)
            bound[cache_name] = cache
        if isinstance(cache, LMInfiniteCache):
            state.plan = cache.begin(mask, batch, n_new, tokens.device)
        else:
            past = cache.get_seq_length() if isinstance(cache, Cache) else 0
            state.plan = full_plan(mask, batch, n_new, past, s.n_global, tokens.device)
        return (), bound

    return hook


def _after_forward(state: State):
    def hook(module, args, kwargs, output):
        state.plan = None
        cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
        if isinstance(cache, LMInfiniteCache):
            cache.end()
        return output

    return hook


# --- ALiBi families: replacement attention forwards --------------------------------------------------


def _mpt_forward(self, hidden_states, position_bias=None, cache=None, attention_mask=None, **kwargs):
    b, n = hidden_states.shape[:2]
    qkv = self.Wqkv(hidden_states)
    if self.clip_qkv:
        qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
    q, k, v = (t.reshape(b, n, self.n_heads, self.head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=2))
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx)
    state: State = self.lm_infinite_state
    out = lambda_attention(q, k, v, state.plan, state.settings, state.position, self.softmax_scale, self.layer_idx)
    return self.out_proj(out.transpose(1, 2).reshape(b, n, -1)), None


def _bloom_forward(self, hidden_states, residual, alibi=None, attention_mask=None, layer_past=None, **kwargs):
    from transformers.models.bloom.modeling_bloom import dropout_add

    q, k, v = self._reshape(self.query_key_value(hidden_states))
    if layer_past is not None:
        k, v = layer_past.update(k, v, self.layer_idx)
    state: State = self.lm_infinite_state
    out = lambda_attention(q, k, v, state.plan, state.settings, state.position, self.inv_norm_factor, self.layer_idx)
    b, _, n, _ = out.shape
    out = self.dense(out.transpose(1, 2).reshape(b, n, -1))
    return dropout_add(out, residual, self.hidden_dropout, self.training), None


def _gptj_rotary_forward(self, x: torch.Tensor, position_ids: torch.LongTensor):
    """GPT-J reads sin/cos from a table of max_position_embeddings rows; grow it (same values) on demand."""
    from transformers.models.gptj.modeling_gptj import create_sinusoidal_positions

    needed = int(position_ids.max()) + 1
    if needed > self.embed_positions.shape[0]:
        table = create_sinusoidal_positions(max(needed, 2 * self.embed_positions.shape[0]), self.pos_embd_dim)
        self.embed_positions = table.to(self.embed_positions.device)
    return type(self).forward(self, x, position_ids)
