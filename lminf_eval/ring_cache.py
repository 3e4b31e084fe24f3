"""A fixed-size KV cache for LM-Infinite whose decode step compiles into one graph: a ring of g + w slots.

Each layer holds g global slots and w local slots, allocated once. The t-th real token of a row goes to slot t
while t < g, else to slot g + (t - g) mod w, so after any number of tokens the ring holds exactly what the
Λ-mask can still see: the first g and the last w real tokens of every row. Each slot records which real token
it holds (per row, so left padding and batches work) and whether it holds one.

A decode step (one new token) is branch-free tensor code: write the new key/value into its slot with a
scatter, then one attention over all g + w slots whose mask and bias come from the slot positions. Keys are
stored as the model rotated them (at their own position); the pairs past the distance ceiling (for
LM-Infinite: the global keys, once the text is longer than the ceiling) are re-scored each step with the key
turned to its far position and the query to its own (`far_positions`), which enters the fused call as an
additive bias. Nothing reads a tensor value on the host, so `torch.compile(..., fullgraph=True)` gives one
graph that no step recompiles (`decode_step`).

A forward of several tokens (a prompt, read in one piece or in chunks) runs today's blocks kernel over the
ring's contents in token order followed by the new tokens, then stores only the survivors.

Positions: the model is given each token's index among its row's real tokens as `position_ids`, so RoPE
rotations agree between prefill and decode whatever the caller passed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from .attention.blocks import _raw_scores
from .attention.plan import Plan, alibi_bias, far_positions, is_far, log_scale, visible
from .attention.positions import Alibi, Rope
from .errors import LMInfiniteError
from .settings import Settings


@dataclass
class RingStep:
    """What the attention of a one-token forward needs (stands where a `Plan` stands for longer forwards)."""

    q_idx: torch.Tensor  # [b, 1] real-token index of the new token
    slot_idx: torch.Tensor  # [b, S] real-token index held by each slot
    slot_valid: torch.Tensor  # [b, S] whether the slot holds a token
    slot: torch.Tensor  # [b] the slot the new token goes to
    valid: torch.Tensor  # [b] whether the new token is real (False: padding, nothing is written)


@dataclass
class RingPrefill:
    """Where a several-token forward's keys come from and which of them survive (eager; built once per forward)."""

    order: torch.Tensor | None  # [b, S] ring slots in token order (None: the ring is still empty)
    rows: torch.Tensor  # survivors: row, position in the new tokens, and slot
    cols: torch.Tensor
    slots: torch.Tensor


class RingLayer(CacheLayerMixin):
    """One layer's ring: keys and values [b, kv_heads, g + w, head_dim], allocated at the first write."""

    is_compileable = True

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h = key_states.shape[:2]
        self.keys = key_states.new_zeros(b, h, self.size, key_states.shape[-1])
        self.values = value_states.new_zeros(b, h, self.size, value_states.shape[-1])
        self.device = key_states.device
        if not torch.compiler.is_compiling():  # the buffers live across steps: no copy into the graph
            torch._dynamo.mark_static_address(self.keys)
            torch._dynamo.mark_static_address(self.values)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError("LMInfiniteRingCache.update writes the layers")

    def write_step(self, key_states: torch.Tensor, value_states: torch.Tensor, step: RingStep):
        """Decode: the new key/value into its slot (rows whose token is padding keep the slot as it was)."""
        b, h = self.keys.shape[:2]
        keep = ~step.valid.view(b, 1, 1, 1)
        for buffer, new in ((self.keys, key_states), (self.values, value_states)):
            index = step.slot.view(b, 1, 1, 1).expand(b, h, 1, buffer.shape[-1])
            new = torch.where(keep, buffer.gather(2, index), new.to(buffer.dtype))
            buffer.scatter_(2, index, new)
        return self.keys, self.values

    def write_prefill(self, key_states: torch.Tensor, value_states: torch.Tensor, fill: RingPrefill):
        """Several tokens: returns the ring's tokens in token order followed by the new ones (what this forward
        attends to), and stores the survivors."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        out = []
        for buffer, new in ((self.keys, key_states), (self.values, value_states)):
            if fill.order is None:
                seen = new
            else:
                b, h, _, d = buffer.shape
                old = buffer.gather(2, fill.order.view(b, 1, -1, 1).expand(b, h, -1, d))
                seen = torch.cat((old, new.to(buffer.dtype)), 2)
            buffer[fill.rows, :, fill.slots] = new[fill.rows, :, fill.cols].to(buffer.dtype)
            out.append(seen)
        return out[0], out[1]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.size, 0

    def get_seq_length(self) -> int:
        return self.size

    def get_max_length(self) -> int:
        return self.size

    def reset(self) -> None:
        if self.is_initialized:
            self.keys.zero_()
            self.values.zero_()


class LMInfiniteRingCache(Cache):
    """Bounded LM-Infinite cache of exactly g + w slots per layer. Pass it to a patched model
    (`model(..., cache=ring)`, `model.generate(..., cache=ring)`); build it with `LMInfiniteRingCache.for_model`.
    For the methods whose cache is bounded (`Settings.bounded`: lm-infinite, streaming-llm, window, lambda-only
    with top_k off); a decode step compiles with `decode_step`."""

    # False for transformers' generate(): "compileable" would make it replace the 2-D padding mask, which the
    # ring reads, by a prebuilt 4-D one. The ring compiles all the same (`decode_step`).
    is_compileable = False

    def __init__(self, num_layers: int, n_global: int, n_local: int):
        self.n_global, self.n_local = int(n_global), int(n_local)
        self.size = self.n_global + self.n_local
        super().__init__(layers=[RingLayer(self.size) for _ in range(num_layers)])
        self.count: torch.Tensor | None = None  # [b] real tokens seen per row
        self.slot_idx: torch.Tensor | None = None  # [b, S]
        self.slot_valid: torch.Tensor | None = None  # [b, S]
        self.seen: torch.Tensor | None = None  # tokens (padding included) fed so far, a 0-dim tensor
        self.step: RingStep | RingPrefill | None = None  # the running forward's layout
        self.stored = False  # whether any forward has written to the ring (eager bookkeeping)

    @classmethod
    def for_model(cls, model: nn.Module) -> LMInfiniteRingCache:
        """A ring sized by the settings `apply_lm_infinite` gave `model`; refuses what a fixed ring cannot hold."""
        patch = getattr(model, "lm_infinite", None)
        settings = getattr(patch, "settings", None)
        check_settings(settings)
        return cls(model.config.num_hidden_layers, settings.n_global, int(settings.n_local))

    # --- transformers' Cache interface ---------------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer, step = self.layers[layer_idx], self.step
        if isinstance(step, RingStep):
            if not layer.is_initialized:
                layer.lazy_initialization(key_states, value_states)
            return layer.write_step(key_states, value_states, step)
        if step is None:
            raise LMInfiniteError("LMInfiniteRingCache needs a model patched with apply_lm_infinite")
        return layer.write_prefill(key_states, value_states, step)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens fed so far (positions continue from them). Inside a compiled step nothing needs it (positions
        come from the ring), so it answers a constant there rather than a host read."""
        if torch.compiler.is_compiling() or self.seen is None:
            return 0 if self.seen is None else self.size
        return int(self.seen)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.size + query_length, 0  # (our mask function builds no mask; the sizes are never used)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # any text length

    def reset(self) -> None:
        super().reset()
        self.count = self.slot_idx = self.slot_valid = self.seen = None
        self.step, self.stored = None, False

    def crop(self, max_length: int) -> None:
        raise LMInfiniteError("LMInfiniteRingCache cannot be cropped: assisted decoding is not supported with it")

    def kv_bytes(self) -> int:
        """Bytes of every layer's key and value buffers."""
        return sum(
            t.numel() * t.element_size()
            for layer in self.layers
            if layer.is_initialized
            for t in (layer.keys, layer.values)
        )

    # --- called by the model's pre-forward hook -------------------------------------------------------------

    def slot_of(self, idx: torch.Tensor) -> torch.Tensor:
        """The slot of real token `idx`: idx while idx < g, else g + (idx - g) mod w."""
        g = self.n_global
        return torch.where(idx < g, idx, g + (idx - g).remainder(self.n_local))

    def begin(self, attention_mask: torch.Tensor | None, batch: int, n_new: int, device) -> RingStep | Plan:
        """Before a forward of `n_new` tokens: the layout its attention reads; the new tokens' real-token indices
        (the positions the model is given) are `positions(...)`."""
        if self.count is None:
            self.count = torch.zeros(batch, dtype=torch.long, device=device)
            self.slot_idx = torch.zeros(batch, self.size, dtype=torch.long, device=device)
            self.slot_valid = torch.zeros(batch, self.size, dtype=torch.bool, device=device)
            self.seen = torch.zeros((), dtype=torch.long, device=device)
            if not torch.compiler.is_compiling():  # updated in place by every step: CUDA graphs need fixed addresses
                for t in (self.count, self.slot_idx, self.slot_valid, self.seen):
                    torch._dynamo.mark_static_address(t)
        if n_new == 1:
            return self._begin_step(attention_mask, batch)
        return self._begin_prefill(attention_mask, batch, n_new)

    def _begin_step(self, attention_mask: torch.Tensor | None, batch: int) -> RingStep:
        if attention_mask is None:
            valid = torch.ones_like(self.count, dtype=torch.bool)
        else:
            valid = attention_mask[:, -1].to(device=self.count.device, dtype=torch.bool)
        r = self.count.clone()
        slot = self.slot_of(r)
        at = slot[:, None]
        self.slot_idx.scatter_(1, at, torch.where(valid[:, None], r[:, None], self.slot_idx.gather(1, at)))
        self.slot_valid.scatter_(1, at, valid[:, None] | self.slot_valid.gather(1, at))
        self.count.add_(valid.long())
        self.seen.add_(1)
        self.step = RingStep(r[:, None], self.slot_idx, self.slot_valid, slot, valid)
        self.stored = True
        return self.step

    def _begin_prefill(self, attention_mask: torch.Tensor | None, batch: int, n_new: int) -> Plan:
        device, g, w = self.count.device, self.n_global, self.n_local
        if attention_mask is None:
            valid = torch.ones(batch, n_new, dtype=torch.bool, device=device)
        else:
            valid = attention_mask[:, -n_new:].to(device=device, dtype=torch.bool)
        c = self.count
        new_idx = c[:, None] + valid.long().cumsum(1) - 1
        after = c + valid.sum(1)
        if self.stored:  # the ring in token order: global slots, then the local ones oldest first
            local = g + ((c - g).clamp(min=0)[:, None] + torch.arange(w, device=device)).remainder(w)
            order = torch.cat((torch.arange(g, device=device).expand(batch, g), local), 1)
            k_idx = torch.cat((self.slot_idx.gather(1, order), new_idx), 1)
            k_valid = torch.cat((self.slot_valid.gather(1, order), valid), 1)
            plan = Plan.build(k_idx, k_valid, n_new, g, head=g)
        else:
            order = None
            plan = Plan.build(new_idx, valid, n_new, g)
        survive = valid & ((new_idx < g) | (new_idx >= (after - w)[:, None]))
        rows, cols = survive.nonzero(as_tuple=True)
        slots = self.slot_of(new_idx[rows, cols])
        self.slot_idx[rows, slots] = new_idx[rows, cols]
        self.slot_valid[rows, slots] = True
        self.count.copy_(after)
        self.seen.add_(n_new)
        self.step = RingPrefill(order, rows, cols, slots)
        self.stored = True
        self.positions = new_idx.clamp(min=0)
        return plan


def supports(settings: Settings | None) -> bool:
    """Whether a ring cache can serve these settings (`check_settings` says why not)."""
    try:
        check_settings(settings)
    except LMInfiniteError:
        return False
    return True


def check_settings(settings: Settings | None) -> None:
    """One-line errors for what a fixed g + w ring cannot serve."""
    if settings is None:
        raise LMInfiniteError("LMInfiniteRingCache needs a model patched with apply_lm_infinite(model, ...) first")
    if settings.top_k:
        raise LMInfiniteError(
            "the ring cache drops middle tokens, which top_k needs: set top_k=0 or use the default cache"
        )
    if not math.isfinite(settings.n_local):
        raise LMInfiniteError(
            "the ring cache holds g + w keys, but this method keeps every key (n_local inf): use a bounded method "
            "(lm-infinite, streaming-llm, window, lambda-only) or the model's own cache"
        )
    if settings.rope_type == "dynamic":
        raise LMInfiniteError(
            "dynamic NTK changes its base with the length, which a ring cannot follow: use rope_type none"
        )


def ring_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    step: RingStep,
    settings: Settings,
    position: Rope | Alibi,
    scaling: float,
) -> torch.Tensor:
    """One query per row over the g + w ring slots: [b, hq, 1, d] -> [b, hq, 1, dv]. The Λ-mask, ALiBi's bias
    and the distance ceiling (the far pairs' score difference) are one additive bias of one fused call."""
    b, hq = query.shape[:2]
    qi, ki = step.q_idx, step.slot_idx  # [b, 1], [b, S]
    dist = qi - ki
    seen = visible(dist, ki, step.slot_valid, settings.n_global, settings.n_local)  # [b, S]
    if settings.log_scale_base:
        query = query * log_scale(qi, settings.log_scale_base).to(query.dtype)[:, None, :, None]
    limit = settings.limit_distance
    if isinstance(position, Alibi):
        slopes = position.slopes.to(device=query.device, dtype=torch.float32).view(1, -1, 1, 1)
        bias = alibi_bias(slopes, qi[:, None, :, None], ki[:, None, None, :], settings)  # [b, hq, 1, S]
    else:
        bias = torch.zeros(b, 1, 1, ki.shape[1], dtype=torch.float32, device=query.device)
        # slots that may be past the ceiling: only the global ones when the ceiling is not inside the window
        n = settings.n_global if limit >= settings.n_local else ki.shape[1]
        if math.isfinite(limit) and n:
            q_pos, k_pos = far_positions(qi, ki[:, :n], settings)
            near = _raw_scores(query, key[:, :, :n], scaling)
            far = _raw_scores(
                position.rotate(query, q_pos - qi), position.rotate(key[:, :, :n], k_pos - ki[:, :n]), scaling
            )
            diff = torch.where(is_far(dist[:, :n], limit)[:, None, None, None], far - near, 0.0)
            bias = bias.expand(b, hq, 1, ki.shape[1]).clone()
            bias[..., :n] = diff.reshape(b, hq, 1, n)
    bias = bias.masked_fill(~seen[:, None, None, :], -math.inf)
    if query.dtype == torch.float32:
        return torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=bias, scale=scaling, enable_gqa=bool(hq != key.shape[1])
        )
    # half precision: the bias (a score difference) in fp32, so plain fp32 math
    hk, size = key.shape[1], ki.shape[1]
    s = _raw_scores(query, key, scaling) + bias.expand(b, hq, 1, size).reshape(b, hk, -1, 1, size)
    p = torch.softmax(s, dim=-1).nan_to_num_(0.0)
    out = torch.matmul(p.view(b, hk, -1, size), value.float())
    return out.view(b, hq, 1, value.shape[-1]).to(query.dtype)


BACKEND = "inductor"  # torch.compile's backend for `decode_step` (tests of the harness trace with "eager")


def decode_step(model: nn.Module, compile: bool = True, backend: str | None = None) -> Callable:
    """`step(token [b, 1], cache) -> logits [b, vocab]`: one greedy decode step through the ring; compiled with
    `fullgraph=True` (`mode="reduce-overhead"` on CUDA) unless `compile` is False; `backend`: torch.compile's
    (tests trace with "aot_eager", which skips code generation). Feed it a ring that a prompt has been read
    into (the first step allocates nothing then)."""

    def step(token: torch.Tensor, cache: LMInfiniteRingCache) -> torch.Tensor:
        return model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]

    if not compile:
        return step
    device = next(model.parameters()).device
    backend = backend or BACKEND
    mode = "reduce-overhead" if device.type == "cuda" and backend == "inductor" else None
    compiled = torch.compile(step, fullgraph=True, mode=mode, backend=backend)

    def compiled_step(token: torch.Tensor, cache: LMInfiniteRingCache) -> torch.Tensor:
        return compiled(token.contiguous(), cache)  # (a sliced token has other strides: no recompile for it)

    return compiled_step


def greedy_ring(
    model: nn.Module,
    ids: torch.Tensor,
    new_tokens: int,
    attention_mask: torch.Tensor | None = None,
    compile: bool = True,
    suppress: int | list[int] | None = None,
) -> torch.Tensor:
    """`new_tokens` greedy tokens [b, new_tokens] after `ids` through a ring cache: the prompt in one eager
    forward, then (compiled) one-token steps. `suppress`: token ids never chosen (as generate's min_new_tokens
    does with EOS)."""
    cache = LMInfiniteRingCache.for_model(model)
    step = decode_step(model, compile)
    banned = [] if suppress is None else [suppress] if isinstance(suppress, int) else list(suppress)

    def pick(logits: torch.Tensor) -> torch.Tensor:
        if banned:
            logits = logits.clone()
            logits[:, banned] = -math.inf
        return logits.argmax(-1, keepdim=True)

    out = []
    with torch.no_grad():
        logits = model(ids, attention_mask=attention_mask, cache=cache, use_cache=True, logits_to_keep=1).logits
        token = pick(logits[:, -1])
        for _ in range(new_tokens):
            out.append(token)
            if len(out) == new_tokens:
                break
            token = pick(step(token, cache))
    return torch.cat(out, 1)
