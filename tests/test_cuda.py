"""The CUDA-only paths against the O(n^2) reference (skipped without a GPU): compiled block-sparse FlexAttention,
the flash-window backend's flash call (PyTorch's sliding-window FlashAttention-2) and its compiled far branch, and
the ring cache's decode step compiled with CUDA graphs. The CPU suite runs each of them with a reference kernel or
eagerly (test_core.py, test_flash_window.py, test_ring_cache.py); only here do they run as they do for users.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from test_core import (
    PRESETS,
    assert_bf16_kernel_matches_reference,
    assert_flex_matches_reference,
    generate,
    greedy_by_reforward,
    left_padded,
)

from lminf_eval import apply_lm_infinite
from models import FAMILY_NAMES, L_PRE, VOCAB, lm_kwargs, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
G = 2


@pytest.fixture(autouse=True)
def strict_fp32_and_no_eager_flex():
    """fp32 matmuls in IEEE precision (TF32 would be a 1e-3 error), and an eager flex call is a failure."""
    torch.backends.cuda.matmul.allow_tf32 = False
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="flex_attention called without torch.compile")
        yield


def on_cuda(name, **kw):
    return apply_lm_infinite(tiny_model(name).cuda(), **kw)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_compiled_flex_matches_reference(name, monkeypatch):
    model = on_cuda(name, n_global=G, **lm_kwargs(name))
    n = 8 * L_PRE
    ids, mask = left_padded([n, n - 9], n, seed=4)
    chunks = [(0, 37), (37, 38), (38, 100), (100, n)]
    assert_flex_matches_reference(model, ids.cuda(), mask.cuda(), monkeypatch, chunks)


@pytest.mark.parametrize("name,preset", [("llama", "ceiling-only"), ("gptj", "window"), ("mpt", "lambda-only")])
def test_compiled_flex_presets(name, preset, monkeypatch):
    model = on_cuda(name, **{"n_global": G, **PRESETS[preset], **lm_kwargs(name)})
    ids, mask = left_padded([8 * L_PRE, 8 * L_PRE - 9], 8 * L_PRE, seed=3)
    assert_flex_matches_reference(model, ids.cuda(), mask.cuda(), monkeypatch)


@pytest.mark.parametrize("name", ["llama", "mpt"])
def test_compiled_flex_across_many_blocks(name, monkeypatch):
    """Windows of 200 over 1.5k tokens: flex's 128-blocks are full, partial and skipped, unlike at L_PRE=16."""
    w = 200
    model = on_cuda(name, n_global=5, n_local=w, limit_distance=w if name == "llama" else math.inf)
    ids, mask = left_padded([1500, 1371], 1500, seed=6)
    chunks = [(0, 700), (700, 701), (701, 1500)]
    assert_flex_matches_reference(model, ids.cuda(), mask.cuda(), monkeypatch, chunks)


@pytest.mark.parametrize("name", ["llama", "gptj", "bloom"])
def test_compiled_flex_generate_equals_cpu(name):
    """Greedy generate() through the cache on the GPU = full re-forwards on the CPU kernel."""
    cpu = apply_lm_infinite(tiny_model(name), n_global=G, **lm_kwargs(name))
    gpu = on_cuda(name, n_global=G, **lm_kwargs(name))
    ids = torch.randint(1, VOCAB, (1, 3 * L_PRE), generator=torch.Generator().manual_seed(7))
    steps = 2 * L_PRE
    new = generate(gpu, ids.cuda(), steps)[:, ids.shape[1] :].cpu()
    assert torch.equal(new, greedy_by_reforward(cpu, ids, steps))


@pytest.mark.parametrize("name", ["llama", "mpt"])
def test_compiled_flex_unpadded_prompt(name, monkeypatch):
    """One unpadded sequence: the arithmetic masks, kept across forwards, compiled."""
    model = on_cuda(name, n_global=G, backend="flex", **lm_kwargs(name))
    ids, mask = left_padded([8 * L_PRE], 8 * L_PRE, seed=5)
    assert_flex_matches_reference(model, ids.cuda(), mask.cuda(), monkeypatch, [(0, 37), (37, 8 * L_PRE)])


@pytest.mark.parametrize("backend", ["flex", "blocks", "flash-window"])
def test_bf16_kernel_matches_reference(backend):
    """The flex path, the FlashAttention-2 blocks and the flash-window backend in bf16 (auto's CUDA choice)."""
    from lminf_eval.attention import dispatch

    dispatch.paths_run(reset=True)
    assert_bf16_kernel_matches_reference("cuda", backend)
    if backend == "flash-window":
        assert set(dispatch.paths_run()) == {"flash-window (CUDA flash)"}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("w,n_q", [(37, 300), (37, 100), (math.inf, 300)])
def test_flash_window_call_equals_reference_window(w, n_q, dtype):
    """The flash call alone against the CPU's reference window branch: causal over the last w keys, its LSE,
    GQA 4:2, queries that are the last n_q of 300 keys (a chunk after earlier ones)."""
    from lminf_eval.attention import flash_window

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, n_q, 64, generator=gen)
    k, v = (torch.randn(2, 2, 300, 64, generator=gen) for _ in range(2))
    assert flash_window.uses_flash(q.cuda().to(dtype))
    out, lse = flash_window.window_attention(*(t.cuda().to(dtype) for t in (q, k, v)), w, 0.125)
    ref_out, ref_lse = flash_window.window_reference(q, k, v, w, 0.125)
    torch.testing.assert_close(lse.float().cpu(), ref_lse, atol=2e-2, rtol=0)
    torch.testing.assert_close(out.float().cpu(), ref_out, atol=2e-2, rtol=0)


@pytest.mark.parametrize("name", ["llama", "gptj", "qwen3"])
def test_flash_window_model_in_half_precision(name):
    """A whole tiny model in fp16 on the GPU takes the flash call (and the inductor-compiled far branch) and
    gives the fp32 CPU model's logits up to half-precision rounding."""
    from lminf_eval.attention import dispatch

    kw = dict(n_global=G, **lm_kwargs(name))
    cpu = apply_lm_infinite(tiny_model(name), backend="blocks", **kw)
    gpu = apply_lm_infinite(tiny_model(name).half().cuda(), **kw)
    ids = torch.randint(1, VOCAB, (2, 9 * L_PRE), generator=torch.Generator().manual_seed(1))
    dispatch.paths_run(reset=True)
    with torch.no_grad():
        ours = gpu(ids.cuda()).logits.float().cpu()
        ref = cpu(ids).logits
    assert set(dispatch.paths_run()) == {"flash-window (CUDA flash)"}
    torch.testing.assert_close(ours, ref, atol=5e-2, rtol=0)


@pytest.mark.parametrize("name", ["llama", "mpt"])
def test_ring_decode_compiled_with_cuda_graphs(name):
    """The ring's decode step compiled by inductor with CUDA graphs: 3w + 1 steps that wrap the ring, no graph
    break, one graph, no recompile, the eager ring's tokens."""
    from test_ring_cache import assert_compiled_steps_equal_eager
    from torch._dynamo.utils import counters

    from lminf_eval.ring_cache import decode_step

    torch._dynamo.reset()
    counters.clear()
    model = on_cuda(name, n_global=G, **lm_kwargs(name))
    ids, mask = (t.cuda() for t in left_padded([20, 17], 20, seed=2))
    assert_compiled_steps_equal_eager(model, ids, mask, decode_step(model), 1e-4)
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["inductor"]["cudagraph_skips"]  # (e.g. a mutated input without a fixed address)
