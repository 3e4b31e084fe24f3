"""LM-Infinite core against the vanilla model, an independent O(n^2) reference, and across code paths."""

from __future__ import annotations

import math

import pytest
import torch
from reference import reference, reference_attention

import lminf_eval
from lminf_eval import LMInfiniteCache, LMInfiniteError, Settings, apply_lm_infinite, remove_lm_infinite
from lminf_eval.attention import Plan, Rope, lambda_attention
from lminf_eval.methods import allow_long_vanilla
from models import FAMILY_NAMES, L_PRE, VOCAB, lm_kwargs, tiny_model

ATOL = 1e-4
G = 2  # n_global for the tiny models (w = L = L_PRE = 16)


def logits(model, ids, mask=None, **kw):
    with torch.no_grad():
        return model(ids, attention_mask=mask, use_cache=False, **kw).logits


def reference_logits(model, ids, mask=None):
    with reference(model):
        return logits(model, ids, mask)


def left_padded(lengths, total, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(lengths), total), generator=gen)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, total - n :] = 1
        ids[row, : total - n] = 0
    return ids, mask


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_inside_window_equals_vanilla(name):
    model = tiny_model(name)
    ids = torch.randint(0, VOCAB, (2, L_PRE))
    vanilla = logits(model, ids)
    apply_lm_infinite(model, n_global=G, **lm_kwargs(name))
    torch.testing.assert_close(logits(model, ids), vanilla, atol=ATOL, rtol=0)


@pytest.mark.parametrize("backend", ["blocks", "blocks-masked"])
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_long_padded_batch_matches_reference_and_alone(name, backend):
    """`blocks`: plain windows run as unmasked band calls (the usual path); `blocks-masked`: every block takes
    the masked one."""
    model = apply_lm_infinite(tiny_model(name), n_global=G, backend=backend, **lm_kwargs(name))
    n = 9 * L_PRE
    ids, mask = left_padded([n, n - 23], n)
    ours = logits(model, ids, mask)
    alone = logits(model, ids[1:, 23:])
    ref = reference_logits(model, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(ours[1, 23:], alone[0], atol=ATOL, rtol=0)
    # the data must be able to tell the global tokens apart: otherwise this test could not fail
    lminf_eval.configure(model, n_global=0)
    assert (logits(model, ids, mask)[real] - ours[real]).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["llama", "gptj", "mpt"])
def test_plain_math_path_matches_reference(name):
    """The blocks in plain fp32 math (no fused kernel), as on devices without one: the reference's numbers."""
    model = apply_lm_infinite(tiny_model(name), n_global=G, backend="plain", **lm_kwargs(name))
    ids, mask = left_padded([7 * L_PRE, 7 * L_PRE - 3], 7 * L_PRE, seed=5)
    ours = logits(model, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(ours[real], reference_logits(model, ids, mask)[real], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_chunked_through_cache_equals_one_forward(name):
    model = apply_lm_infinite(tiny_model(name), n_global=G, **lm_kwargs(name))
    n = 10 * L_PRE
    ids, mask = left_padded([n, n - 5], n, seed=1)
    whole = logits(model, ids, mask)
    pieces, cache, start, peak = [], None, 0, 0
    for size in [21, 1, 40, 3, 1, 1, 30, 17, 46]:
        end = start + size
        with torch.no_grad():
            out = model(ids[:, start:end], attention_mask=mask[:, :end], cache=cache, use_cache=True)
        cache = out.cache
        assert isinstance(cache, LMInfiniteCache)
        peak = max(peak, cache.layers[0].used)
        pieces.append(out.logits)
        start = end
    assert start == n
    real = mask.bool()
    torch.testing.assert_close(torch.cat(pieces, 1)[real], whole[real], atol=ATOL, rtol=0)
    # bounded: head (first g of each row, padding shifts them) + window + slack, never the whole text
    assert peak <= (5 + G) + L_PRE + cache.slack + 46
    assert cache.layers[0].used < n // 2


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_long_prompt_in_one_forward_stores_only_the_bound(name):
    """A prompt 10x the window read in one cached forward: the cache never holds more than head + window +
    slack slots, even while that forward runs, and continuing from it equals one forward over everything."""
    model = apply_lm_infinite(tiny_model(name), n_global=G, **lm_kwargs(name))
    n = 10 * L_PRE
    ids, mask = left_padded([n, n - 5], n, seed=2)
    whole = logits(model, ids, mask)
    cache = LMInfiniteCache(model.config.num_hidden_layers, G, L_PRE)
    held = []
    for layer in cache.layers:

        def store(*args, _layer=layer, _store=layer.store, **kw):
            out = _store(*args, **kw)
            held.append(_layer.keys.shape[-2])  # buffer capacity right after this layer stored its keys
            return out

        layer.store = store
    with torch.no_grad():
        first = model(ids[:, :-3], attention_mask=mask[:, :-3], cache=cache, use_cache=True).logits
        last = model(ids[:, -3:], attention_mask=mask, cache=cache, use_cache=True).logits
    real = mask.bool()
    torch.testing.assert_close(torch.cat((first, last), 1)[real], whole[real], atol=ATOL, rtol=0)
    assert len(held) == 2 * model.config.num_hidden_layers
    assert max(held) <= (5 + G) + L_PRE + cache.slack


def generate(model, ids, steps, **kw):
    model.generation_config.eos_token_id = None  # random models emit "EOS" ids: decode a fixed length
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=steps, do_sample=False, pad_token_id=0, use_cache=True, **kw)


def greedy_by_reforward(model, ids, steps):
    seq = ids
    for _ in range(steps):
        nxt = logits(model, seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat((seq, nxt), 1)
    return seq[:, ids.shape[1] :]


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_generate_through_cache_equals_reforward(name):
    model = apply_lm_infinite(tiny_model(name), n_global=G, **lm_kwargs(name))
    n, steps = 3 * L_PRE, 2 * L_PRE
    ids, mask = left_padded([n, n - 4], n, seed=2)
    caches = []
    model.base_model.register_forward_hook(lambda mod, args, out: caches.append(type(out.cache)))
    new = generate(model, ids, steps, attention_mask=mask)[:, n:]
    assert caches and all(c is LMInfiniteCache for c in caches)
    assert torch.equal(new[0:1], greedy_by_reforward(model, ids[0:1], steps))
    assert torch.equal(new[1:2], greedy_by_reforward(model, ids[1:2, 4:], steps))


PRESETS = {
    "window": dict(n_global=0, limit_distance=math.inf),
    "lambda-only": dict(n_global=G, limit_distance=math.inf),
    "ceiling-only": dict(n_global=G, n_local=math.inf),
}


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("name", ["llama", "gpt_neox", "gptj", "mpt", "bloom"])
def test_ablation_presets_equal_reference(name, preset):
    kwargs = {**PRESETS[preset], **lm_kwargs(name)}
    model = apply_lm_infinite(tiny_model(name), **kwargs)
    ids, mask = left_padded([8 * L_PRE, 8 * L_PRE - 9], 8 * L_PRE, seed=3)
    ours = logits(model, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(ours[real], reference_logits(model, ids, mask)[real], atol=ATOL, rtol=0)


FLEX_CASES = [(name, "lm-infinite") for name in FAMILY_NAMES]
FLEX_CASES += [("llama", "ceiling-only"), ("gptj", "window"), ("mpt", "ceiling-only")]


def assert_flex_matches_reference(model, ids, mask, monkeypatch, chunks=()):
    """The flex path ran, and its logits equal the reference's, in one forward and chunk by chunk through
    the cache (`chunks`: (start, end) pieces). Shared with the compiled-on-CUDA checks in test_cuda.py."""
    from lminf_eval.attention import flex

    calls, real_flex = [], flex.flex_attention_lambda  # a spy: the flex function still computes the result
    monkeypatch.setattr(flex, "flex_attention_lambda", lambda *a: calls.append(1) or real_flex(*a))
    ours = logits(model, ids, mask)
    pieces, cache = [], None
    for start, end in chunks:
        with torch.no_grad():
            out = model(ids[:, start:end], attention_mask=mask[:, :end], cache=cache, use_cache=True)
        pieces.append(out.logits)
        cache = out.cache
    ref = reference_logits(model, ids, mask)
    real = mask.bool()
    assert calls  # the flex path ran
    torch.testing.assert_close(ours[real], ref[real], atol=ATOL, rtol=0)
    if pieces:
        torch.testing.assert_close(torch.cat(pieces, 1)[real], ref[real], atol=ATOL, rtol=0)


def assert_bf16_kernel_matches_reference(device: str, backend: str = "auto") -> None:
    """Half precision, as models run: one attention call on random q/k/v with GQA, w = L = 512 over 2048
    tokens (band, global and far parts merged), against the float64 reference. Shared with test_cuda.py."""
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, 8, 2048, 64, device=device, generator=gen, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2, 2048, 64, device=device, generator=gen, dtype=torch.bfloat16) for _ in range(2))
    inv_freq = 1.0 / (1e4 ** (torch.arange(0, 64, 2, device=device).float() / 64))
    args = (Plan.contiguous(2048, 4, device), Settings.resolve(512, n_global=4, backend=backend))
    assert args[0].global_slots == 4
    rope = Rope(None, inv_freq, False)
    ours = lambda_attention(q, k, v, *args, rope, 0.125)
    assert ours.dtype == torch.bfloat16
    ref = reference_attention(q.double(), k.double(), v.double(), *args, rope, 0.125)
    torch.testing.assert_close(ours.double(), ref, atol=1e-2, rtol=1e-2)  # bf16 rounding of the output


def test_bf16_kernel_matches_reference():
    assert_bf16_kernel_matches_reference("cpu")


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("name,preset", FLEX_CASES)
def test_flex_path_matches_reference(name, preset, monkeypatch):
    """The fused CUDA path (FlexAttention), run eagerly on CPU: the reference's numbers, also through the cache."""
    kwargs = {"n_global": G, "backend": "flex", **PRESETS.get(preset, {}), **lm_kwargs(name)}
    model = apply_lm_infinite(tiny_model(name), **kwargs)
    ids, mask = left_padded([8 * L_PRE, 8 * L_PRE - 9], 8 * L_PRE, seed=4)
    # (ceiling-only has an unbounded window: no LM-Infinite cache to chunk through)
    chunks = [] if preset == "ceiling-only" else [(0, 37), (37, 38), (38, 100), (100, 8 * L_PRE)]
    assert_flex_matches_reference(model, ids, mask, monkeypatch, chunks)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("name,preset", [("llama", "lm-infinite"), ("gptj", "lm-infinite"), ("mpt", "lm-infinite")])
def test_flex_unpadded_prompt_takes_arithmetic_masks_kept_across_forwards(name, preset, monkeypatch):
    """One unpadded sequence: the mask functions are arithmetic on (q, k) and the block masks are built once
    for two forwards of the same shape; the logits are the reference's, in one forward and through the cache
    (whose later chunks have gaps: the per-forward masks)."""
    from lminf_eval.attention import flex

    built, real_build = [], flex.create_block_mask
    monkeypatch.setattr(flex, "create_block_mask", lambda *a, **k: built.append(a[1:]) or real_build(*a, **k))
    flex._MASKS.clear()
    model = apply_lm_infinite(tiny_model(name), n_global=G, backend="flex", **lm_kwargs(name))
    ids, mask = left_padded([8 * L_PRE], 8 * L_PRE, seed=5)
    assert_flex_matches_reference(model, ids, mask, monkeypatch, [(0, 37), (37, 38), (38, 8 * L_PRE)])
    masks = len(built)
    logits(model, ids, mask)  # the same shape again: no mask built
    assert masks and len(built) == masks
    assert len(flex._MASKS) >= 1


def test_ceiling_only_differs_from_vanilla_past_the_window():
    """Guards the reference itself: the ceiling must change scores that vanilla computes differently."""
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (1, 6 * L_PRE))
    vanilla = logits(model, ids)
    apply_lm_infinite(model, **PRESETS["ceiling-only"])
    ours = logits(model, ids)
    torch.testing.assert_close(ours[:, :L_PRE], vanilla[:, :L_PRE], atol=ATOL, rtol=0)
    assert (ours[:, 2 * L_PRE :] - vanilla[:, 2 * L_PRE :]).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["llama", "qwen3", "gptj", "mpt", "bloom"])
def test_top_k_last_row_equals_reference(name):
    model = apply_lm_infinite(
        tiny_model(name),
        n_global=G,
        top_k=3,
        top_k_from_layer=1,
        top_k_distance=L_PRE // 2,
        **lm_kwargs(name),
    )
    ids, mask = left_padded([8 * L_PRE, 8 * L_PRE - 6], 8 * L_PRE, seed=4)
    ours = logits(model, ids, mask)
    lminf_eval.configure(model, top_k=0)
    without = logits(model, ids, mask)
    lminf_eval.configure(model, top_k=3)
    assert (ours[:, -1] - without[:, -1]).abs().max() > 1e-3  # top-k changed the last row...
    torch.testing.assert_close(ours[:, :-1], without[:, :-1], atol=0, rtol=0)  # ...and only it
    torch.testing.assert_close(ours[:, -1], reference_logits(model, ids, mask)[:, -1], atol=ATOL, rtol=0)


def test_top_k_generate_equals_reforward():
    model = apply_lm_infinite(tiny_model("llama"), n_global=G, top_k=2, top_k_from_layer=1)
    ids = torch.randint(1, VOCAB, (1, 5 * L_PRE))
    out = generate(model, ids, 8)
    assert torch.equal(out[:, ids.shape[1] :], greedy_by_reforward(model, ids, 8))


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_remove_restores_vanilla_exactly(name):
    model = tiny_model(name)
    ids = torch.randint(0, VOCAB, (1, L_PRE))
    before = logits(model, ids)
    apply_lm_infinite(model, n_global=G, **lm_kwargs(name))
    logits(model, torch.randint(0, VOCAB, (1, 4 * L_PRE)))  # exercise the patched path (GPT-J grows its table)
    remove_lm_infinite(model)
    assert not hasattr(model, "lm_infinite")
    assert torch.equal(logits(model, ids), before)


def test_unsupported_model_is_one_line_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(LMInfiniteError) as err:
        apply_lm_infinite(model)
    message = str(err.value)
    assert "\n" not in message and "'gpt2'" in message and "llama" in message and "mpt" in message


def test_bad_arguments_are_one_line_errors():
    model = tiny_model("llama")
    with pytest.raises(LMInfiniteError, match="n_global"):
        apply_lm_infinite(model, n_global=20, n_local=8)
    with pytest.raises(LMInfiniteError, match="n_local"):
        apply_lm_infinite(model, n_local=0)
    with pytest.raises(LMInfiniteError, match="pretraining length"):
        apply_lm_infinite(tiny_model("bloom"))
    with pytest.raises(LMInfiniteError, match="backend"):
        apply_lm_infinite(model, backend="fast")
    patched = apply_lm_infinite(model, n_global=4)
    with pytest.raises(LMInfiniteError, match="n_global"):  # configure checks as apply does
        lminf_eval.configure(patched, n_global=-1)
    assert patched.lm_infinite.settings.n_global == 4


def test_defaults_come_from_the_config():
    model = apply_lm_infinite(tiny_model("llama"))
    s = model.lm_infinite.settings
    assert (s.n_global, s.n_local, s.limit_distance, s.top_k_distance) == (10, L_PRE, L_PRE, L_PRE // 2)
    assert s == Settings.resolve(L_PRE) and (s.top_k, s.top_k_from_layer, s.backend) == (0, 4, "auto")


def test_mpt_slopes_are_the_ones_its_forward_uses():
    """transformers' MptModel builds its ALiBi with alibi_bias_max 8 whatever the config says; slopes read from the
    config's value would make LM-Infinite differ from vanilla inside the window."""
    model = tiny_model("mpt")
    model.config.attn_config.alibi_bias_max = 16
    ids = torch.randint(0, VOCAB, (1, L_PRE))
    vanilla = logits(model, ids)
    apply_lm_infinite(model, n_global=G)
    torch.testing.assert_close(logits(model, ids), vanilla, atol=ATOL, rtol=0)


def test_bad_settings_leave_the_model_as_it_was():
    """Non-numeric, NaN and negative values are refused in one line; a refused re-apply keeps the old patch;
    configure() on an unpatched model says so."""
    model = tiny_model("llama")
    for bad in ({"n_global": float("nan")}, {"n_local": "wide"}, {"limit_distance": -4}, {"top_k_from_layer": -1}):
        with pytest.raises(LMInfiniteError):
            apply_lm_infinite(model, **bad)
    with pytest.raises(LMInfiniteError, match="patched"):
        lminf_eval.configure(model, top_k=2)
    apply_lm_infinite(model, n_global=3)
    with pytest.raises(LMInfiniteError):
        apply_lm_infinite(model, n_global=40, n_local=8)
    assert model.lm_infinite.settings.n_global == 3 and model.config._attn_implementation == "lm_infinite"


@pytest.mark.parametrize("name", ["llama", "gptj", "mpt", "bloom"])
def test_deepcopy_of_a_patched_model_is_its_own(name):
    """The copy computes the same; configuring or removing the copy leaves the original as it was."""
    import copy

    model = apply_lm_infinite(tiny_model(name), n_global=G, **lm_kwargs(name))
    ids = torch.randint(0, VOCAB, (1, 5 * L_PRE))
    short = ids[:, :L_PRE]  # (vanilla GPT-J's sin/cos table ends at L_PRE)
    ours, vanilla = logits(model, ids), logits(tiny_model(name), short)
    twin = copy.deepcopy(model)
    torch.testing.assert_close(logits(twin, ids), ours, atol=0, rtol=0)
    lminf_eval.configure(twin, n_global=0)
    assert (logits(twin, ids) - ours).abs().max() > 1e-3
    remove_lm_infinite(twin)
    torch.testing.assert_close(logits(twin, short), vanilla, atol=0, rtol=0)
    torch.testing.assert_close(logits(model, ids), ours, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["llama", "mpt"])
def test_two_models_sharing_one_config_do_not_affect_each_other(name):
    first = tiny_model(name)
    second = type(first)(first.config).eval()
    second.load_state_dict(first.state_dict())
    assert second.config is first.config
    allow_long_vanilla(second)  # (MPT's vanilla ALiBi table ends at L_PRE; this grows it in the shared config)
    ids = torch.randint(0, VOCAB, (1, 5 * L_PRE))
    vanilla = logits(second, ids)
    apply_lm_infinite(first, n_global=G)
    patched = logits(first, ids)
    if name == "llama":  # (this tiny MPT's ALiBi decays so fast that LM-Infinite changes it by ~1e-6 only)
        assert (patched - vanilla).abs().max() > 1e-3
    torch.testing.assert_close(logits(second, ids), vanilla, atol=0, rtol=0)  # the other model is vanilla
    remove_lm_infinite(first)
    assert first.config is second.config
    torch.testing.assert_close(logits(first, ids), vanilla, atol=0, rtol=0)


@pytest.mark.parametrize("method", ["rerope", "self-extend", "leaky-rerope", "lm-infinite:n_local=inf"])
@pytest.mark.parametrize("d_rot,interleaved", [(16, False), (8, True)])
def test_ceiling_band_matches_reference(method, d_rot, interleaved, monkeypatch):
    """Full-attention methods on an unpadded prompt: every block past the ceiling takes the five unmasked calls
    (`Layout.ceiling`; 16-row blocks, L_pre = 256, 600 tokens, GQA 4:2, full and partial interleaved rotary)
    and gives the float64 reference's output, in one call and for a chunk read after earlier keys; a padded
    batch takes the masked path and gives it too."""
    from lminf_eval.attention import blocks
    from lminf_eval.methods import parse_method

    monkeypatch.setattr(blocks, "BLOCK", 16)
    n = 600
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, n, 16, generator=gen)
    k, v = (torch.randn(2, 2, n, 16, generator=gen) for _ in range(2))
    rope = Rope(None, 1.0 / (100 ** (torch.arange(0, d_rot, 2).float() / d_rot)), interleaved)
    settings = parse_method(method).settings(256, n)
    limit = int(settings.limit_distance)
    for n_q in (n, 200):
        plan = Plan.from_mask(None, 2, n_q, n - n_q, settings.n_global, "cpu")
        ours = lambda_attention(q[:, :, -n_q:], k, v, plan, settings, rope, 0.25)
        blocks_run = {key[1:3]: lay for key, lay in plan.memo.items() if key[0] == "blocks"}
        past = {(s, e) for s, e in blocks_run if n - n_q + s >= limit and e - s >= 2}
        assert past and past == {se for se, lay in blocks_run.items() if lay.ceiling is not None}
        ref = reference_attention(q[:, :, -n_q:].double(), k.double(), v.double(), plan, settings, rope, 0.25)
        torch.testing.assert_close(ours.double(), ref, atol=ATOL, rtol=0)
    mask = torch.ones(2, n, dtype=torch.long)
    mask[1, :7] = 0
    plan = Plan.from_mask(mask, 2, n, 0, settings.n_global, "cpu")
    ours = lambda_attention(q, k, v, plan, settings, rope, 0.25)
    assert not any(lay.ceiling for key, lay in plan.memo.items() if key[0] == "blocks")
    ref = reference_attention(q.double(), k.double(), v.double(), plan, settings, rope, 0.25)
    torch.testing.assert_close(ours.double()[1, :, 7:], ref[1, :, 7:], atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.double()[0], ref[0], atol=ATOL, rtol=0)
