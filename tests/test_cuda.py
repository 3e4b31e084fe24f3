"""The compiled FlexAttention path on a CUDA device against the O(n^2) reference (skipped without a GPU).

The CPU suite runs flex.py eagerly; only here does it run as it does for users: compiled, block-sparse.
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


@pytest.mark.parametrize("backend", ["flex", "blocks"])
def test_bf16_kernel_matches_reference(backend):
    """The flex path and the FlashAttention-2 blocks in bf16."""
    assert_bf16_kernel_matches_reference("cuda", backend)
