"""The training-free peers (StreamingLLM, Self-Extend, ReRoPE, Leaky ReRoPE, STRING, DCA, PI, dynamic NTK, YaRN)
against an independent float64 reference of their definitions, vanilla where they must equal it, and across code
paths."""

from __future__ import annotations

import math

import pytest
import torch
from reference import reference
from test_core import ATOL, generate, greedy_by_reforward, left_padded, logits, reference_logits

from lminf_eval import LMInfiniteCache, LMInfiniteError, apply_lm_infinite
from lminf_eval.methods import applied, parse_method
from models import L_PRE, VOCAB, tiny_model

# windows far below the 8 x L_PRE tokens read, so every rule's far branch is exercised
PEERS = {
    "streaming-llm": "streaming-llm:n_global=2:n_local=12",
    "self-extend": "self-extend:limit_distance=6:group_size=3",
    "rerope": "rerope:limit_distance=5:log_scale_base=8",
    "leaky-rerope": "leaky-rerope:limit_distance=5:group_size=4:log_scale_base=8",
    "string": "string:limit_distance=7:shift_local=2",
    "dca": "dca",  # its defaults: chunk_size 3 L_pre/4 = 12, local_window L_pre/8 = 2, so 13 chunks of 10
}
ALIBI = ("mpt", "bloom")
ROPE_ONLY = ("dca",)  # refused on ALiBi models (test_unsupported_combinations_are_one_line_errors)
BLOCKS_ONLY = ("dca",)  # the blocks kernel's own branch: backend=flex is refused in one line


def settings_of(spec: str, target: int | None = None):
    return parse_method(spec).settings(L_PRE, target)


@pytest.mark.parametrize(
    "name, peer",
    [
        (name, peer)
        for peer in PEERS
        for name in ["llama", "gpt_neox", "gptj", "mpt", "bloom"]
        if not (peer in ROPE_ONLY and name in ALIBI)
    ],
)
def test_peers_equal_reference(name, peer):
    """GQA (llama), partial rotary (gpt_neox), interleaved (gptj), ALiBi (mpt, bloom), left padding."""
    model = tiny_model(name)
    ids, mask = left_padded([8 * L_PRE, 8 * L_PRE - 9], 8 * L_PRE, seed=6)
    real = mask.bool()
    with applied(model, settings_of(PEERS[peer]), L_PRE):
        ours = logits(model, ids, mask)
        torch.testing.assert_close(ours[real], reference_logits(model, ids, mask)[real], atol=ATOL, rtol=0)
        alone = logits(model, ids[1:, 9:])
        torch.testing.assert_close(ours[1, 9:], alone[0], atol=ATOL, rtol=0)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("peer", [peer for peer in PEERS if peer not in BLOCKS_ONLY])
def test_peers_flex_path_equals_reference(peer):
    settings = settings_of(PEERS[peer] + ":backend=flex")
    model = tiny_model("llama")
    ids, mask = left_padded([6 * L_PRE, 6 * L_PRE - 5], 6 * L_PRE, seed=7)
    real = mask.bool()
    with applied(model, settings, L_PRE):
        torch.testing.assert_close(
            logits(model, ids, mask)[real], reference_logits(model, ids, mask)[real], atol=ATOL, rtol=0
        )


@pytest.mark.parametrize("peer", list(PEERS))
def test_peers_chunked_through_cache_equal_one_forward(peer):
    """StreamingLLM through its bounded cache (never more than sinks + window + slack), the others through
    transformers' full cache: chunk by chunk equals one forward."""
    model = tiny_model("llama")
    n = 8 * L_PRE
    ids, mask = left_padded([n, n - 5], n, seed=8)
    settings = settings_of(PEERS[peer])
    with applied(model, settings, L_PRE):
        whole = logits(model, ids, mask)
        pieces, cache, start = [], None, 0
        for size in [20, 1, 33, 2, 1, 40, 31]:
            with torch.no_grad():
                out = model(ids[:, start : start + size], attention_mask=mask[:, : start + size], cache=cache)
            cache, start = out.cache, start + size
            pieces.append(out.logits)
    assert start == n
    real = mask.bool()
    torch.testing.assert_close(torch.cat(pieces, 1)[real], whole[real], atol=ATOL, rtol=0)
    assert isinstance(cache, LMInfiniteCache) == (peer == "streaming-llm")
    if peer == "streaming-llm":
        assert cache.layers[0].used <= (5 + settings.n_global) + settings.n_local + cache.slack + 40


def test_streaming_llm_decode_equals_reforward():
    """Token by token through the bounded cache (the StreamingLLM paper's own protocol) = full forwards."""
    model = tiny_model("llama")
    ids = torch.randint(1, VOCAB, (1, 3 * L_PRE))
    with applied(model, settings_of(PEERS["streaming-llm"]), L_PRE):
        new = generate(model, ids, 2 * L_PRE)[:, ids.shape[1] :]
        assert torch.equal(new, greedy_by_reforward(model, ids, 2 * L_PRE))


def test_dca_decode_equals_reforward():
    """DCA token by token through transformers' cache (each new query placed by the chunks behind it) = full
    forwards, from a prompt ending mid-chunk across several chunk boundaries."""
    model = tiny_model("llama")
    ids = torch.randint(1, VOCAB, (1, L_PRE + 3))
    with applied(model, settings_of(PEERS["dca"]), L_PRE):
        new = generate(model, ids, L_PRE)[:, ids.shape[1] :]
        assert torch.equal(new, greedy_by_reforward(model, ids, L_PRE))


@pytest.mark.parametrize(
    "backend, spec",
    [
        ("blocks-masked", "dca"),
        ("plain", "dca:chunk_size=9:local_window=5"),
        ("blocks", "dca:chunk_size=9:local_window=5"),
        ("blocks", "dca:rope_type=linear:rope_factor=2"),
    ],
)
def test_dca_backends_equal_reference(backend, spec):
    """Every block masked (blocks-masked), plain fp32 math, and the slices of an unpadded row (blocks), with the
    defaults (chunks of 10), local_window >= c (chunks of 4, earlier chunks at 2c - 1 = 7 < chunk_size), or on a
    PI-scaled rotary (as ChunkLlama runs on PI models); one row padded, the other alone equal to its padded self."""
    model = tiny_model("llama")
    ids, mask = left_padded([4 * L_PRE, 4 * L_PRE - 7], 4 * L_PRE, seed=9)
    real = mask.bool()
    with applied(model, settings_of(f"{spec}:backend={backend}"), L_PRE):
        ours, ref = logits(model, ids, mask), reference_logits(model, ids, mask)
        torch.testing.assert_close(ours[real], ref[real], atol=ATOL, rtol=0)
        torch.testing.assert_close(logits(model, ids[:1]), ours[:1], atol=ATOL, rtol=0)


def test_dca_left_right_padding_and_a_gap_equal_reference():
    """Rows padded on either side run row by row as slices; a row with a hole in its mask takes the masked path."""
    model = tiny_model("llama")
    n = 4 * L_PRE
    ids = torch.randint(1, VOCAB, (3, n))
    mask = torch.ones(3, n, dtype=torch.long)
    mask[0, :9], mask[1, -6:], mask[2, 30:33] = 0, 0, 0
    real = mask.bool()
    with applied(model, settings_of(PEERS["dca"]), L_PRE):
        rows = logits(model, ids[:2], mask[:2])
        torch.testing.assert_close(
            rows[real[:2]], reference_logits(model, ids[:2], mask[:2])[real[:2]], atol=ATOL, rtol=0
        )
        gap = logits(model, ids, mask)
        torch.testing.assert_close(gap[real], reference_logits(model, ids, mask)[real], atol=ATOL, rtol=0)


def test_dca_equals_vanilla_up_to_chunk_size_only():
    """With local_window < c (the defaults), tokens 0..chunk_size see only their own chunk or the previous one at
    i mod c <= local_window, both at the pair's own distance: vanilla. Token chunk_size + 1 sees the previous chunk
    capped at chunk_size: not."""
    settings = settings_of(PEERS["dca"])
    size = int(settings.chunk_size)
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (1, size + 2))
    vanilla = logits(model, ids)
    with applied(model, settings, L_PRE):
        ours = logits(model, ids)
    torch.testing.assert_close(ours[:, : size + 1], vanilla[:, : size + 1], atol=ATOL, rtol=0)
    assert (ours[:, size + 1] - vanilla[:, size + 1]).abs().max() > 1e-3


def _authors_dca(q_raw, k_raw, v, chunk_size: int, local_window: int, inv_freq, scaling):
    """ChunkLlama's chunkllama_attn_replace.py restated on unrotated q, k [b, h, n, d] (float64): its position
    tables (q_t, qc_t, k_t), its prefill loop over query chunks (intra causal, successive, inter keys before the
    previous chunk at qc_t[c - 1]) merged by log-sum-exp, and its one-token decoding branch for the last row."""
    c = chunk_size - local_window
    n = q_raw.shape[2]
    q_t = torch.arange(c, dtype=torch.float64)
    qc_t = (torch.arange(c, dtype=torch.float64) + c).clamp(max=chunk_size)
    k_t = torch.arange(n, dtype=torch.float64) % c
    position_ids = torch.arange(n) % c

    def rope(x, t):  # rotate_half layout: cat(freqs, freqs)
        angle = torch.cat((t[:, None] * inv_freq, t[:, None] * inv_freq), -1)
        half = x.shape[-1] // 2
        return x * angle.cos() + torch.cat((-x[..., half:], x[..., :half]), -1) * angle.sin()

    def attend(q, k, vv, causal):
        s = q @ k.transpose(-1, -2) * scaling
        if causal:
            s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), -math.inf)
        return torch.softmax(s, -1) @ vv, torch.logsumexp(s, -1)

    key = rope(k_raw, k_t)
    rows = []
    for begin in range(0, n, c):
        end, q = min(begin + c, n), q_raw[:, :, begin : min(begin + c, n)]
        parts = [attend(rope(q, q_t[position_ids[begin:end]]), key[:, :, begin:end], v[:, :, begin:end], True)]
        if begin >= c:
            q_succ = rope(q, qc_t[position_ids[begin:end]])
            parts.append(attend(q_succ, key[:, :, begin - c : begin], v[:, :, begin - c : begin], False))
        if begin - c > 0:
            q_inter = rope(q, qc_t[position_ids[c - 1]].repeat(end - begin))
            parts.append(attend(q_inter, key[:, :, : begin - c], v[:, :, : begin - c], False))
        lse = torch.stack([p[1] for p in parts])
        weights = torch.softmax(lse, 0)[..., None]
        rows.append(sum(p[0] * w for p, w in zip(parts, weights, strict=True)))
    prefill = torch.cat(rows, 2)
    # decoding: the last token as the new query over the cache of all n keys
    cur, pos = (n - 1) // c, position_ids[-1:]
    q = q_raw[:, :, -1:]
    scores = [rope(q, q_t[pos]) @ key[:, :, c * cur :].transpose(-1, -2)]
    if cur >= 1:
        scores.insert(0, rope(q, qc_t[pos]) @ key[:, :, c * (cur - 1) : c * cur].transpose(-1, -2))
    if cur >= 2:
        scores.insert(0, rope(q, qc_t[[c - 1]]) @ key[:, :, : c * (cur - 1)].transpose(-1, -2))
    decode = torch.softmax(torch.cat(scores, -1) * scaling, -1) @ v
    return prefill, decode


@pytest.mark.parametrize("spec", ["dca", "dca:chunk_size=9:local_window=3", "dca:chunk_size=9:local_window=5"])
def test_dca_kernel_equals_the_authors_chunk_loop(spec):
    """The kernel on q, k rotated at their own positions (as the model hands them over), one forward and one
    decoding step, against the authors' algorithm on the unrotated ones (GQA: 4 query heads, 2 K/V heads)."""
    from lminf_eval.attention.dca import dual_chunk_attention
    from lminf_eval.attention.plan import Plan
    from lminf_eval.attention.positions import Rope

    settings = settings_of(spec)
    n, d = 5 * L_PRE + 3, 16
    gen = torch.Generator().manual_seed(3)
    q_raw, k_raw, v = (torch.randn(1, h, n, d, generator=gen, dtype=torch.float64) for h in (4, 2, 2))
    inv_freq = 1.0 / 100.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    rope = Rope(None, inv_freq, interleaved=False)
    own = torch.arange(n)[None]
    q, k = rope.rotate(q_raw, own).float(), rope.rotate(k_raw, own).float()
    prefill, decode = _authors_dca(
        q_raw, k_raw.repeat_interleave(2, 1), v.repeat_interleave(2, 1), int(settings.chunk_size),
        settings.local_window, inv_freq, d**-0.5,
    )  # fmt: skip
    ours = dual_chunk_attention(q, k, v.float(), Plan.contiguous(n, 0), settings, rope, d**-0.5)
    torch.testing.assert_close(ours.double(), prefill, atol=1e-5, rtol=0)
    step = Plan.from_mask(None, 1, 1, n - 1, 0, "cpu")
    ours = dual_chunk_attention(q[:, :, -1:], k, v.float(), step, settings, rope, d**-0.5)
    torch.testing.assert_close(ours.double(), decode, atol=1e-5, rtol=0)


def test_dca_runs_on_the_blocks_kernel_only():
    """`auto` takes the blocks kernel's DCA branch on CUDA too (flex and flash-window do not compute DCA; asking
    for them is refused: test_unsupported_combinations_are_one_line_errors); the ring cache refuses DCA's
    unbounded cache in one line."""
    from lminf_eval.attention.dispatch import backend_for
    from lminf_eval.ring_cache import LMInfiniteRingCache

    settings = settings_of(PEERS["dca"])
    assert backend_for(settings, torch.device("cuda"), torch.float16) == "blocks"
    assert backend_for(settings, torch.device("cpu"), torch.float32) == "blocks"
    model = tiny_model("llama")
    with applied(model, settings, L_PRE), pytest.raises(LMInfiniteError, match="keeps every key") as err:
        LMInfiniteRingCache.for_model(model)
    assert "\n" not in str(err.value)


def test_dca_is_listed_with_its_options_and_defaults():
    from typer.testing import CliRunner

    from lminf_eval.harness.cli import app

    res = CliRunner().invoke(app, ["methods"])
    assert res.exit_code == 0, res.output
    block = res.output.split("\ndca\n")[1].split("\n")
    assert "An et al., arXiv 2402.17463" in block[1]
    assert block[2].split()[:3] == ["chunk_size", "default", "L_pre*3/4"]
    assert block[3].split()[:3] == ["local_window", "default", "L_pre/8"]
    resolved = settings_of("dca", target=None)  # the authors' L_pre * 3 // 4 and L_pre // 8
    assert (resolved.chunk_size, resolved.local_window) == (L_PRE * 3 // 4, L_PRE // 8)


def test_string_decode_equals_reforward():
    """STRING token by token through transformers' cache (each new query shifted past S) = full forwards."""
    model = tiny_model("llama")
    ids = torch.randint(1, VOCAB, (1, 2 * L_PRE))
    with applied(model, settings_of(PEERS["string"]), L_PRE):
        new = generate(model, ids, L_PRE)[:, ids.shape[1] :]
        assert torch.equal(new, greedy_by_reforward(model, ids, L_PRE))


@pytest.mark.parametrize("peer", list(PEERS))
def test_peers_equal_vanilla_inside_their_window_only(peer):
    """Inside the window (and below the log-scale base; DCA: up to chunk_size) a peer is the model itself; past
    it, it is not (so the comparison could fail)."""
    settings = settings_of(PEERS[peer])
    inside = min(settings.limit_distance, settings.log_scale_base or math.inf, settings.n_global + settings.n_local)
    inside = min(inside, settings.chunk_size)
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (1, 4 * L_PRE))
    with applied(model, None, L_PRE):
        vanilla = logits(model, ids)
    with applied(model, settings, L_PRE):
        ours = logits(model, ids)
    torch.testing.assert_close(ours[:, : int(inside)], vanilla[:, : int(inside)], atol=ATOL, rtol=0)
    assert (ours[:, -L_PRE:] - vanilla[:, -L_PRE:]).abs().max() > 1e-2


def _rope(model):
    rotary = model.base_model.rotary_emb
    return rotary.inv_freq.double(), rotary.attention_scaling


def test_rope_scaling_frequencies_follow_their_definitions():
    """PI, YaRN and dynamic NTK as methods.md states them, in float64, against what the model then uses."""
    model = tiny_model("llama")
    theta, dim, s = 100.0, 16, 4.0
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    with applied(model, settings_of("pi:rope_factor=4"), L_PRE):
        torch.testing.assert_close(_rope(model)[0], inv / s, rtol=1e-6, atol=0)
    with applied(model, settings_of("yarn", target=4 * L_PRE), L_PRE):  # factor = target / L_pre = 4
        low, high = (dim * math.log(L_PRE / (2 * math.pi * b)) / (2 * math.log(theta)) for b in (32, 1))
        low, high = max(math.floor(low), 0), min(math.ceil(high), dim - 1)
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
        got, attention_factor = _rope(model)
        torch.testing.assert_close(got, inv * (1 - ramp) + inv / s * ramp, rtol=1e-6, atol=0)
        assert attention_factor == pytest.approx(0.1 * math.log(s) + 1)
    with applied(model, settings_of("dynamic-ntk:rope_factor=4"), L_PRE):
        n = 3 * L_PRE
        logits(model, torch.randint(0, VOCAB, (1, n)))  # the base grows with the input read
        base = theta * (s * n / L_PRE - (s - 1)) ** (dim / (dim - 2))
        want = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        torch.testing.assert_close(_rope(model)[0], want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("spec", ["pi:rope_factor=1", "yarn:rope_factor=1", "dynamic-ntk:rope_factor=4"])
def test_rope_scaling_equals_vanilla_at_factor_one_or_inside_l_pre(spec):
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (1, L_PRE))
    vanilla = logits(model, ids)
    with applied(model, settings_of(spec), L_PRE):
        torch.testing.assert_close(logits(model, ids), vanilla, atol=ATOL, rtol=0)
    torch.testing.assert_close(logits(model, ids), vanilla, atol=0, rtol=0)  # and put back exactly


def test_rope_scaling_combines_with_lm_infinite():
    """lm-infinite:rope_type=yarn: the Λ kernel re-rotates with the scaled frequencies (reference agrees)."""
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (1, 6 * L_PRE))
    with applied(model, settings_of("lm-infinite:n_global=2:rope_type=yarn:rope_factor=2"), L_PRE):
        with reference(model):
            ref = logits(model, ids)
        torch.testing.assert_close(logits(model, ids), ref, atol=ATOL, rtol=0)


def test_unsupported_combinations_are_one_line_errors():
    for spec, family, words in [
        ("pi:rope_factor=2", "mpt", "rotary embedding"),
        ("yarn:rope_factor=2", "gptj", "rotary embedding"),
        ("yarn:rope_factor=2", "llama3", "already uses rope_type"),
        ("yarn", "llama", "rope_factor is required"),
        ("yarn:rope_factor=0.5", "llama", ">= 1"),
        ("self-extend:group_size=0", "llama", "group_size"),
        ("streaming-llm:n_local=inf", "llama", "finite n_local"),
        ("rerope:log_scale_base=1", "llama", "log_scale_base"),
        ("lm-infinite:far_distance=far", "llama", "unknown far_distance"),
        ("string:limit_distance=7:shift_local=7", "llama", "shift_local"),
        ("dca", "mpt", "needs RoPE"),
        ("dca", "bloom", "needs RoPE"),
        ("dca:backend=flex", "llama", "blocks kernel"),
        ("dca:backend=flash-window", "llama", "blocks kernel"),
        ("dca:chunk_size=9:local_window=9", "llama", "local_window"),
        ("dca:n_local=8", "llama", "n_local does not apply"),
        ("dca:top_k=1", "llama", "top_k"),
        ("lm-infinite:local_window=2", "llama", "dual chunk attention only"),
    ]:
        model = tiny_model(family)
        with pytest.raises(LMInfiniteError, match=words) as err:
            apply_lm_infinite(model, pretraining_length_override=L_PRE, **parse_method(spec).options, **_preset(spec))
        assert "\n" not in str(err.value)
        assert getattr(model, "lm_infinite", None) is None


def _preset(spec: str) -> dict:
    from lminf_eval.methods import PRESETS

    return {k: v for k, v in PRESETS[spec.split(":")[0]].fixes.items() if k not in parse_method(spec).options}


@pytest.mark.parametrize("spec", ["lm-infinite", "streaming-llm", "self-extend", "rerope", "leaky-rerope", "string"])
def test_far_positions_of_a_key_depend_on_the_key_alone(spec):
    """The contract the backends rely on (keys turned once per layer, queries once per block): for every rule,
    a key's far position is the same whichever query it is paired with, and a query's whichever key."""
    from lminf_eval.attention.plan import far_positions

    settings = settings_of(PEERS.get(spec, spec))
    q, k = torch.arange(0, 200)[:, None], torch.arange(0, 200)[None, :]
    q_pos, k_pos = (torch.as_tensor(t).double().broadcast_to(200, 200) for t in far_positions(q, k, settings))
    assert torch.equal(k_pos, k_pos[:1].expand(200, -1)) and torch.equal(q_pos, q_pos[:, :1].expand(-1, 200))


def test_far_positions_refuse_a_rule_they_do_not_know():
    import dataclasses

    from lminf_eval.attention.plan import far_positions

    unknown = dataclasses.replace(settings_of("lm-infinite"), far_distance="nearest")
    with pytest.raises(LMInfiniteError, match="unknown far_distance 'nearest'"):
        far_positions(torch.arange(4), torch.arange(4), unknown)
