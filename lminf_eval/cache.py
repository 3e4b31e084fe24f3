"""A KV cache that keeps only what LM-Infinite can still attend to: the first g tokens and the last w.

Keys stay at their original positions (they are stored already rotated), so local distances stay exact and
feeding a text in chunks equals one forward over it. Slots are appended into a buffer with some slack; once
the slack is used, the forward that overflows it stores only the surviving slots (each layer's attention
still reads all of that forward's keys), so per-token cost is an append, and even a long prompt read in one
forward never holds more than the bound.
"""

from __future__ import annotations

import math

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .attention.plan import Plan


class LMInfiniteLayer(DynamicLayer):
    """One layer's keys/values in a growable buffer; `LMInfiniteCache.update` says which slots survive."""

    def __init__(self):
        super().__init__()
        self.used = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.keys = key_states.new_empty(*key_states.shape[:2], 0, key_states.shape[-1])
        self.values = value_states.new_empty(*value_states.shape[:2], 0, value_states.shape[-1])
        self.is_initialized = True

    def store(
        self, key_states: torch.Tensor, value_states: torch.Tensor, keep: torch.Tensor | None, slack: int, bound: float
    ):
        """Append this forward's keys/values, or, when `keep` is given (the forward overflows the slack), store
        only those slots of old + new. Returns every key/value this forward attends to. The buffer never holds
        more than `bound` slots (head + n_local + slack): an append stays within it, else `keep` is given."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        slots = keep
        if slots is not None:  # this forward overflows the slack: attend to everything, store the survivors
            keys, values = key_states, value_states
            if self.used:
                keys = torch.cat((self.keys[:, :, : self.used], key_states), 2)
                values = torch.cat((self.values[:, :, : self.used], value_states), 2)
            m, capacity = slots.numel(), slots.numel() + slack
            if not m <= self.keys.shape[-2] <= capacity:  # (a larger buffer, e.g. a long prompt's, is given back)
                self.keys, self.values = self._empty(keys, capacity), self._empty(values, capacity)
            self.keys[:, :, :m] = keys.index_select(2, slots)
            self.values[:, :, :m] = values.index_select(2, slots)
            self.used = m
            return keys, values
        n = key_states.shape[-2]
        if self.used + n > self.keys.shape[-2]:
            self._resize(int(min(self.used + n + slack, max(bound, self.used + n))))
        self.keys[:, :, self.used : self.used + n] = key_states
        self.values[:, :, self.used : self.used + n] = value_states
        self.used += n
        return self.keys[:, :, : self.used], self.values[:, :, : self.used]

    @staticmethod
    def _empty(like: torch.Tensor, capacity: int) -> torch.Tensor:
        return like.new_empty(*like.shape[:2], capacity, like.shape[-1])

    def _resize(self, capacity: int) -> None:
        keys, values = self._empty(self.keys, capacity), self._empty(self.values, capacity)
        keys[:, :, : self.used] = self.keys[:, :, : self.used]
        values[:, :, : self.used] = self.values[:, :, : self.used]
        self.keys, self.values = keys, values

    def get_seq_length(self) -> int:
        return self.used

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.used + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("LMInfiniteCache cannot be cropped (assisted decoding is not supported)")


class LMInfiniteCache(Cache):
    """Bounded cache for LM-Infinite; `apply_lm_infinite` makes `generate()` and `model(..., use_cache=True)`
    use it. Memory is at most (head + n_local + slack) slots per layer, whatever the text length; the head holds
    every row's first g tokens (g slots without padding; padding in a batch can widen it)."""

    def __init__(self, num_layers: int, n_global: int, n_local: float, slack: int | None = None):
        super().__init__(layers=[LMInfiniteLayer() for _ in range(num_layers)])
        self.n_global = n_global
        self.n_local = n_local
        self.slack = slack if slack is not None else (int(n_local) // 4 + 16 if math.isfinite(n_local) else 0)
        self.seen = 0
        self.pending = 0
        self.global_slots = 0  # kept slots before the contiguous tail (holding the first g tokens of every row)
        self.keep_slots: torch.Tensor | None = None  # set for a forward after which slots are dropped
        self.next_global_slots = 0
        self.slot_idx: torch.Tensor | None = None  # [b, S] real-token index of each slot
        self.slot_valid: torch.Tensor | None = None  # [b, S]
        self.real_count: torch.Tensor | None = None  # [b] real tokens seen per row

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        bound = self.global_slots + self.n_local + self.slack
        return self.layers[layer_idx].store(key_states, value_states, self.keep_slots, self.slack, bound)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen  # positions continue from every token seen, kept or not

    def begin(self, attention_mask: torch.Tensor | None, batch: int, n_new: int, device) -> Plan:
        """Called before a forward: the layout of the keys every layer will see, new tokens appended."""
        if self.slot_idx is None:
            self.slot_idx = torch.zeros(batch, 0, dtype=torch.long, device=device)
            self.slot_valid = torch.zeros(batch, 0, dtype=torch.bool, device=device)
            self.real_count = torch.zeros(batch, dtype=torch.long, device=device)
        if attention_mask is None:
            new_valid = torch.ones(batch, n_new, dtype=torch.bool, device=device)
        else:
            new_valid = attention_mask[:, -n_new:].to(device=device, dtype=torch.bool)
        new_idx = self.real_count[:, None] + new_valid.long().cumsum(1) - 1
        self.slot_idx = torch.cat((self.slot_idx, new_idx), 1)
        self.slot_valid = torch.cat((self.slot_valid, new_valid), 1)
        self.real_count = self.real_count + new_valid.sum(1)
        self.pending = n_new  # counted in `seen` after the forward: the model reads `seen` for positions
        plan = Plan.build(self.slot_idx, self.slot_valid, n_new, self.n_global, head=self.global_slots)
        total = self.slot_idx.shape[1]
        if math.isfinite(self.n_local) and total > self.global_slots + self.n_local + self.slack:
            # the slack is used up: after this forward keep the first-g slots and the last w
            tail = total - int(self.n_local)
            is_global = (self.slot_valid & (self.slot_idx < self.n_global)).any(0)
            keep = is_global.clone()
            keep[tail:] = True
            self.keep_slots = keep.nonzero().squeeze(1)
            self.next_global_slots = int(is_global[:tail].sum())
        return plan

    def end(self) -> None:
        """Called after a forward (whose layers stored only `keep_slots`): the slot bookkeeping follows."""
        self.seen += self.pending
        self.pending = 0
        if self.keep_slots is not None:
            slots, self.keep_slots = self.keep_slots, None
            self.slot_idx, self.slot_valid = self.slot_idx[:, slots], self.slot_valid[:, slots]
            self.global_slots = self.next_global_slots

    def reset(self) -> None:
        super().reset()
        for layer in self.layers:
            layer.used = 0
        self.seen, self.pending, self.global_slots = 0, 0, 0
        self.keep_slots = None
        self.slot_idx = self.slot_valid = self.real_count = None
