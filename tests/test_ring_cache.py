"""The g + w ring cache (lminf_eval/ring_cache.py) against the default cache and the float64 reference, token by
token past two wraps of the ring; its compiled decode step (one graph, no recompile); its fixed size. Also the
default cache's size bound (issue 24)."""

from __future__ import annotations

import math

import pytest
import torch
from reference import reference
from test_core import ATOL, G, generate, left_padded, logits

import lminf_eval.ring_cache as ring_module
from lminf_eval import LMInfiniteCache, LMInfiniteError, apply_lm_infinite
from lminf_eval.ring_cache import LMInfiniteRingCache, decode_step, greedy_ring
from models import FAMILY_NAMES, L_PRE, VOCAB, lm_kwargs, tiny_model

W = L_PRE  # the window (and ceiling) of the tiny models
CHUNKS = [7, 1, 19, 2, 9]  # a prompt of 38 tokens read in pieces


def teacher_forced(model, ids, mask, cache, prompt_chunks):
    """Logits of every position: the prompt in the given pieces, then one token per forward."""
    pieces, start = [], 0
    with torch.no_grad():
        for size in [*prompt_chunks, *[1] * (ids.shape[1] - sum(prompt_chunks))]:
            end = start + size
            out = model(ids[:, start:end], attention_mask=mask[:, :end], cache=cache, use_cache=True)
            pieces.append(out.logits)
            cache, start = out.cache, end  # (None at first: the patched model makes its default cache)
    return torch.cat(pieces, 1)


@pytest.mark.parametrize("chunks", [[38], CHUNKS], ids=["one-forward", "chunks"])
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_ring_decode_equals_default_cache_and_reference(name, chunks):
    """38 prompt tokens, then 2w + 10 one-token steps (the ring wraps twice), a left-padded batch."""
    model = apply_lm_infinite(tiny_model(name), n_global=G, **lm_kwargs(name))
    n = sum(chunks) + 2 * W + 10
    ids, mask = left_padded([n, n - 9], n, seed=4)
    ring = LMInfiniteRingCache.for_model(model)
    ours = teacher_forced(model, ids, mask, ring, chunks)
    default = teacher_forced(model, ids, mask, None, chunks)
    with reference(model):
        ref = logits(model, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(ours[real], default[real], atol=ATOL, rtol=0)
    assert int(ring.count[0]) == n and int(ring.count[1]) == n - 9


@pytest.mark.parametrize("name", ["llama", "gpt_neox", "mpt"])
def test_ring_streaming_llm_equals_reference(name):
    model = apply_lm_infinite(tiny_model(name), n_global=4, n_local=12, far_distance="cache", **lm_kwargs(name))
    n = 20 + 3 * 12
    ids, mask = left_padded([n, n - 5], n, seed=6)
    ours = teacher_forced(model, ids, mask, LMInfiniteRingCache.for_model(model), [20])
    with reference(model):
        ref = logits(model, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], atol=ATOL, rtol=0)


def test_without_the_ceiling_rotation_the_ring_differs(monkeypatch):
    """Control: global keys scored at their own distance (no turn to the ceiling) differ from the reference."""
    model = apply_lm_infinite(tiny_model("llama"), n_global=G)
    n = 38 + 2 * W + 10
    ids, mask = left_padded([n, n - 9], n, seed=4)
    with reference(model):
        ref = logits(model, ids, mask)
    monkeypatch.setattr(ring_module, "far_positions", lambda q, k, settings: (q, k))
    ours = teacher_forced(model, ids, mask, LMInfiniteRingCache.for_model(model), [38])
    real = mask.bool()
    assert (ours[real] - ref[real]).abs().max() > 1e-2


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_generate_with_the_ring_equals_the_default_cache(name):
    """`model.generate(..., cache=ring)`, and the ring's own greedy loop, give the default cache's tokens."""
    model = apply_lm_infinite(tiny_model(name), n_global=G, **lm_kwargs(name))
    n, steps = 3 * W, 2 * W + 3
    ids, mask = left_padded([n, n - 7], n, seed=3)
    default = generate(model, ids, steps, attention_mask=mask)
    ring = LMInfiniteRingCache.for_model(model)
    assert torch.equal(generate(model, ids, steps, attention_mask=mask, cache=ring), default)
    assert torch.equal(greedy_ring(model, ids, steps, attention_mask=mask, compile=False), default[:, n:])


@pytest.mark.parametrize("name", ["llama", "mpt"])
def test_compiled_decode_is_one_graph_without_recompiles(name):
    """3w + 1 compiled steps (fullgraph=True; dynamo's graph run by the "eager" backend, which skips code
    generation, so the test stays fast; bench/bench_decode.py runs inductor): no graph break, one graph, no
    recompile, the eager step's logits."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = apply_lm_infinite(tiny_model(name), n_global=G, **lm_kwargs(name))
    ids, mask = left_padded([20, 17], 20, seed=2)
    assert_compiled_steps_equal_eager(model, ids, mask, decode_step(model, backend="eager"), ATOL)
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


def assert_compiled_steps_equal_eager(model, ids, mask, compiled, atol: float) -> None:
    """3w + 1 steps after reading `ids`, each of `compiled` against the eager step on its own ring, under
    error_on_recompile (shared with test_cuda.py's CUDA-graph run)."""
    compiled_ring, eager_ring = LMInfiniteRingCache.for_model(model), LMInfiniteRingCache.for_model(model)
    eager = decode_step(model, compile=False)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for ring in (compiled_ring, eager_ring):
            model(ids, attention_mask=mask, cache=ring, use_cache=True)
        token = ids[:, -1:]
        for _ in range(3 * W + 1):
            a, b = compiled(token, compiled_ring), eager(token, eager_ring)
            torch.testing.assert_close(a, b, atol=atol, rtol=0)
            token = b.argmax(-1, keepdim=True)


def test_the_ring_holds_exactly_g_plus_w_slots():
    """After a prompt 10x the window and 3w steps: g + w slots per layer, in buffers allocated once."""
    model = apply_lm_infinite(tiny_model("llama"), n_global=G)
    cfg = model.config
    ids = torch.randint(1, VOCAB, (2, 10 * W))
    ring = LMInfiniteRingCache.for_model(model)
    step = decode_step(model, compile=False)
    with torch.no_grad():
        model(ids, cache=ring, use_cache=True)
        buffers = [layer.keys.data_ptr() for layer in ring.layers]
        token = ids[:, -1:]
        for _ in range(3 * W):
            token = step(token, ring).argmax(-1, keepdim=True)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    per_layer = 2 * 2 * cfg.num_key_value_heads * (G + W) * head_dim * 4  # keys + values, batch 2, fp32
    assert ring.kv_bytes() == cfg.num_hidden_layers * per_layer
    assert [layer.keys.data_ptr() for layer in ring.layers] == buffers
    assert all(layer.keys.shape[2] == G + W for layer in ring.layers)


def test_settings_a_ring_cannot_serve_are_one_line_errors():
    def error(**settings):
        model = apply_lm_infinite(tiny_model("llama"), **settings)
        with pytest.raises(LMInfiniteError) as info:
            LMInfiniteRingCache.for_model(model)
        return str(info.value)

    assert "top_k=0" in error(top_k=5, top_k_from_layer=0)
    assert "keeps every key" in error(n_local=math.inf)
    assert "rope_type" in error(rope_type="dynamic", rope_factor=2)
    with pytest.raises(LMInfiniteError, match="apply_lm_infinite"):
        LMInfiniteRingCache.for_model(tiny_model("llama"))
    model = apply_lm_infinite(tiny_model("llama"), n_global=G)
    with pytest.raises(LMInfiniteError, match="for_model"):
        model(torch.ones(1, 3, dtype=torch.long), cache=LMInfiniteRingCache(3, G + 1, W), use_cache=True)
    for message in [error(top_k=5, top_k_from_layer=0), error(n_local=math.inf)]:
        assert "\n" not in message


def test_default_cache_buffer_stays_within_its_bound():
    """Issue 24: a prompt shorter than head + w + slack, read in one forward, sized its buffer prompt + slack
    (SmolLM2, 10k tokens: 12064 slots against the documented 10266), and the drop kept that buffer. The
    buffer now never exceeds head + n_local + slack slots, before or after the first drop."""
    model = apply_lm_infinite(tiny_model("llama"), n_global=G)
    cache = LMInfiniteCache(model.config.num_hidden_layers, G, W)
    bound = G + W + cache.slack  # no padding: the head is the first g slots
    ids = torch.randint(1, VOCAB, (1, bound - 2))
    sizes = []
    with torch.no_grad():
        out = model(ids, cache=cache, use_cache=True)
        sizes.append(cache.layers[0].keys.shape[-2])
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(2 * cache.slack):
            out = model(token, cache=cache, use_cache=True)
            sizes.append(max(layer.keys.shape[-2] for layer in cache.layers))
            token = out.logits[:, -1:].argmax(-1)
    assert max(sizes) <= bound
    assert cache.layers[0].used < bound  # (it did drop)
