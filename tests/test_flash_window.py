"""The flash-window backend on the CPU (its reference window branch in place of the CUDA flash call) against the
float64 reference: whole models, every far-distance rule, the far branch and merge alone, compiled vs eager, and
the fallbacks. test_cuda.py runs the CUDA flash call itself."""

from __future__ import annotations

import math

import pytest
import torch
from reference import reference_attention
from test_core import ATOL, left_padded, logits, reference_logits
from torch._dynamo.testing import CompileCounterWithBackend

from lminf_eval import Settings, apply_lm_infinite
from lminf_eval.attention import Alibi, Plan, Rope, backend_for, dispatch, flash_window, lambda_attention
from models import L_PRE, lm_kwargs, tiny_model

G = 2
FLASH_CPU = "flash-window (reference window)"


@pytest.fixture(autouse=True)
def fresh_paths():
    dispatch.paths_run(reset=True)
    yield


def rope(d_rot: int, interleaved: bool = False) -> Rope:
    return Rope(None, 1.0 / (100 ** (torch.arange(0, d_rot, 2).float() / d_rot)), interleaved)


def qkv(b=2, hq=4, hk=2, n=300, d=16, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=gen, dtype=dtype) for h in (hq, hk, hk)]


@pytest.mark.parametrize("name", ["llama", "llama3", "qwen3", "gpt_neox", "gptj", "mpt", "bloom"])
def test_model_matches_reference(name):
    """GQA (llama: 2 K/V heads, llama3: 1), partial (gpt_neox) and interleaved partial (gptj) rotary, ALiBi (mpt,
    bloom): an unpadded batch runs the flash-window path and gives the reference's logits."""
    model = apply_lm_infinite(tiny_model(name), n_global=G, backend="flash-window", **lm_kwargs(name))
    ids, _ = left_padded([9 * L_PRE, 9 * L_PRE], 9 * L_PRE, seed=1)
    ours = logits(model, ids)
    assert set(dispatch.paths_run()) == {FLASH_CPU}
    torch.testing.assert_close(ours, reference_logits(model, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["llama", "mpt"])
def test_padding_and_cache_gaps_fall_back_as_designed(name):
    """A padded batch takes the blocks path (recorded with the reason), as does a chunk read after a bounded
    cache dropped keys; both still give the reference's logits."""
    model = apply_lm_infinite(tiny_model(name), n_global=G, backend="flash-window", **lm_kwargs(name))
    n = 8 * L_PRE
    ids, mask = left_padded([n, n - 9], n, seed=2)
    ours = logits(model, ids, mask)
    assert set(dispatch.paths_run(reset=True)) == {"blocks (flash-window: padded or gapped plan)"}
    real = mask.bool()
    torch.testing.assert_close(ours[real], reference_logits(model, ids, mask)[real], atol=ATOL, rtol=0)
    ids = ids[:1]
    with torch.no_grad():
        first = model(ids[:, :40], use_cache=True)
        second = model(ids[:, 40:], cache=first.cache, use_cache=True).logits
    paths = dispatch.paths_run()
    assert FLASH_CPU in paths and "blocks (flash-window: padded or gapped plan)" in paths
    whole = reference_logits(model, ids)
    torch.testing.assert_close(torch.cat((first.logits, second), 1), whole, atol=ATOL, rtol=0)


RULES = [
    dict(),  # LM-Infinite: w = L
    dict(n_local=40, limit_distance=100),  # window inside the ceiling: global keys near, then far
    dict(far_distance="leaky"),
    dict(far_distance="grouped"),
    dict(far_distance="cache", n_local=48),  # StreamingLLM
    dict(limit_distance=math.inf),  # no ceiling: a sliding window with global keys
]


CASES = [(kw, 16, False) for kw in RULES] + [(kw, 8, il) for kw in RULES[:2] for il in (False, True)]


@pytest.mark.parametrize("kw,d_rot,interleaved", CASES, ids=[f"{i}" for i in range(len(CASES))])
def test_kernel_matches_reference(kw, d_rot, interleaved):
    """One call on random q/k/v (2 rows, GQA 4:2, 300 tokens, w = 64): every far rule, full, partial and
    interleaved rotary; then against keys read after earlier ones (a chunk of 100 queries over 300 keys)."""
    q, k, v = qkv()
    position = rope(d_rot, interleaved)
    settings = Settings.resolve(64, n_global=3, backend="flash-window", **kw)
    for n_q in (100, 300):
        plan = Plan.from_mask(None, 2, n_q, 300 - n_q, 3, "cpu")
        ours = lambda_attention(q[:, :, -n_q:], k, v, plan, settings, position, 0.25)
        ref = reference_attention(q[:, :, -n_q:].double(), k.double(), v.double(), plan, settings, position, 0.25)
        torch.testing.assert_close(ours.double(), ref, atol=ATOL, rtol=0)
    assert set(dispatch.paths_run()) == {FLASH_CPU}
    without_globals = Settings.resolve(64, n_global=0, backend="flash-window", **kw)  # the test can fail
    plan = Plan.from_mask(None, 2, 300, 0, 0, "cpu")
    assert (lambda_attention(q, k, v, plan, without_globals, position, 0.25) - ours).abs().max() > 0.01


def test_alibi_kernel_matches_reference():
    q, k, v = qkv(hk=4)
    alibi = Alibi(torch.tensor([0.5, 0.25, 0.125, 0.0625]))
    for kw in (dict(), dict(n_local=40, limit_distance=100)):
        settings = Settings.resolve(64, n_global=3, backend="flash-window", **kw)
        plan = Plan.from_mask(None, 2, 300, 0, 3, "cpu")
        ours = lambda_attention(q, k, v, plan, settings, alibi, 0.25)
        ref = reference_attention(q.double(), k.double(), v.double(), plan, settings, alibi, 0.25)
        torch.testing.assert_close(ours.double(), ref, atol=ATOL, rtol=0)


def test_ceiling_inside_the_window_falls_back():
    q, k, v = qkv()
    settings = Settings.resolve(64, n_global=3, limit_distance=20, backend="flash-window")
    plan = Plan.from_mask(None, 2, 300, 0, 3, "cpu")
    ours = lambda_attention(q, k, v, plan, settings, rope(16), 0.25)
    assert dispatch.paths_run() == {"blocks (flash-window: ceiling inside the window)": 1}
    ref = reference_attention(q.double(), k.double(), v.double(), plan, settings, rope(16), 0.25)
    torch.testing.assert_close(ours.double(), ref, atol=ATOL, rtol=0)


def test_auto_picks_flash_window_where_it_applies(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    settings = Settings.resolve(64)
    assert backend_for(settings, cpu, torch.bfloat16, rope(16)) == "blocks"
    monkeypatch.setattr(flash_window, "kernel_available", lambda: False)
    assert backend_for(settings, cuda, torch.bfloat16, rope(16)) == "flex"
    monkeypatch.setattr(flash_window, "kernel_available", lambda: True)
    assert backend_for(settings, cuda, torch.bfloat16, rope(16)) == "flash-window"
    assert backend_for(settings, cuda, torch.float32, rope(16)) == "flex"  # (the flash kernel is half only)
    assert backend_for(settings, cuda, torch.float16, Alibi(torch.ones(4))) == "flex"
    assert backend_for(Settings.resolve(64, backend="blocks"), cuda, torch.bfloat16, rope(16)) == "blocks"


def test_window_reference_is_a_sliding_window():
    """The window branch alone (what the CUDA call computes): causal over the last w keys, with its LSE, GQA."""
    q, k, v = qkv(n=130)
    w = 37
    out, lse = flash_window.window_reference(q, k, v, w, 0.25)
    s = torch.einsum("bhnd,bhkd->bhnk", q.double(), k.repeat_interleave(2, 1).double()) * 0.25
    dist = torch.arange(130)[:, None] - torch.arange(130)
    s = s.masked_fill(~((dist >= 0) & (dist < w)), -math.inf)
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.double(), s.softmax(-1) @ v.repeat_interleave(2, 1).double(), atol=1e-5, rtol=0)


def far_case(seed=0, interleaved=False, d=16, d_rot=12):
    """Inputs of `far_merge` for a window part and g far keys, and the float64 softmax over both parts: the
    window's scores as given, the far keys' at distance L (query turned by L - i, key by -j)."""
    gen = torch.Generator().manual_seed(seed)
    b, hk, groups, n, g, n_win, big_l = 2, 2, 2, 40, 3, 7, 50
    q = torch.randn(b, hk, groups, n, d, generator=gen)
    win_s = torch.randn(b, hk, groups, n, n_win, generator=gen, dtype=torch.float64) * 2
    win_s[..., 0, 1:] = -math.inf  # a row that sees one window key only
    win_v = torch.randn(b, hk, 1, n_win, d, generator=gen, dtype=torch.float64)
    keys = torch.randn(b, hk, 1, g, d, generator=gen)
    vals = torch.randn(b, hk, 1, g, d, generator=gen)
    position = rope(d_rot, interleaved)
    qi = torch.arange(100, 100 + n).expand(b, n)
    kj = torch.arange(g).expand(b, g)
    seen = torch.ones(b, n, g, dtype=torch.bool)
    seen[:, :5, 2] = False  # pairs this branch does not score
    far_bias = torch.zeros(b, 1, 1, n, g).masked_fill(~seen[:, None, None], -math.inf)
    k_far = position.rotate(keys[:, :, 0].double(), -kj)[:, :, None]
    q_far = position.rotate(q.flatten(1, 2).double(), big_l - qi).unflatten(1, (hk, groups))
    far_s = (q_far @ k_far.transpose(-1, -2)) * 0.25 + far_bias.double()
    probs = torch.cat((win_s, far_s), -1).softmax(-1)
    expect = probs[..., :n_win] @ win_v + probs[..., n_win:] @ vals.double()
    out = (win_s.softmax(-1) @ win_v).float()
    lse = torch.logsumexp(win_s, -1).float()
    angles = (big_l - qi).double()[:, None, None, :, None] * position.inv_freq.double()
    args = (out, lse, q, None, k_far.float(), vals, angles.cos().float(), angles.sin().float(), None, far_bias)
    return args, expect


@pytest.mark.parametrize("interleaved", [False, True])
def test_far_branch_and_merge_alone(interleaved):
    """The far scores (query turn inside the reduction, partial rotary) and the merge into `out` in place,
    against the float64 softmax over the window's and the far keys' scores together."""
    args, expect = far_case(interleaved=interleaved)
    out = args[0]
    flash_window.far_merge(*args, 0.25, interleaved)
    torch.testing.assert_close(out.double(), expect, atol=1e-5, rtol=0)
    plain, _ = far_case(interleaved=interleaved)
    assert (plain[0].double() - expect).abs().max() > 0.05  # (the far keys change the result)


def test_far_merge_compiles_in_one_graph_and_equals_eager():
    """fullgraph=True, traced with aot_eager (no code generation, so the test stays fast): no graph break, one
    graph, the eager numbers. The CUDA run compiles it with inductor (test_cuda.py)."""
    args, _ = far_case(seed=3)
    eager_out = args[0].clone()
    flash_window.far_merge(eager_out, *args[1:], 0.25, False)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(flash_window.far_merge, fullgraph=True, backend=counter)
    compiled(args[0], *args[1:], 0.25, False)  # (fullgraph=True: a graph break would raise)
    assert counter.frame_count == 1
    torch.testing.assert_close(args[0], eager_out, atol=1e-6, rtol=0)
