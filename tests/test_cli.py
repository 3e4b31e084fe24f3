"""The harness end to end on a random tiny model and local text: files and schemas, resume, OOM, bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import fixtures
import pandas as pd
import pytest
import torch
from fixtures import run, takes
from lminf_eval.tasks import ppl as ppl_task
from lminf_eval.tasks.base import method_table
from lminf_eval.tasks.generate import score
from lminf_eval.tasks.passkey import Needles, first_integer, found, make_prompt
from lminf_eval.tasks.ppl import Perplexity, PerplexityOptions
from typer.testing import CliRunner

from lminf_eval.harness.cli import app
from lminf_eval.methods import parse_methods

runner = CliRunner()


def load(out: Path):
    results = json.loads((out / "results.json").read_text())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return results, samples


def test_ppl_end_to_end(tiny, tmp_path):
    res = run(tiny, "ppl", "--lengths", "1x,2x,8x", "--num-docs", "2", out=tmp_path)
    assert res.exit_code == 0, res.output
    results, samples = load(tmp_path)
    assert results["status"] == "complete" and results["command"] == "ppl"
    assert {"config", "versions", "git", "device", "wall_seconds", "metrics", "tables"} <= results.keys()
    assert results["config"]["model"] == str(tiny.model) and results["resolved"]["lengths"] == [32, 64, 256]
    assert results["argv"][:2] == ["lminf-eval", "ppl"] and results["argv"][-2:] == ["--n-global", "4"]
    settings = [m["settings"] for m in results["resolved"]["methods"]]
    assert settings[0] is None and settings[1]["n_global"] == 4 and settings[1]["n_local"] == 32
    # which attention path ran, per method (vanilla runs the model's own attention: none of ours)
    assert list(results["attention_paths"]) == ["lm-infinite"]
    assert set(results["attention_paths"]["lm-infinite"]) == {"blocks"}
    assert len(samples) == 4 and all(len(s["nll"]) == s["tokens"] - 1 == 255 for s in samples)
    table = pd.read_csv(tmp_path / "ppl.csv", index_col=0)
    assert list(table.index) == ["vanilla", "lm-infinite"] and list(table.columns) == ["32", "64", "256", "overall"]
    # inside the window LM-Infinite is the vanilla model; beyond it they differ
    assert table.loc["vanilla", "32"] == pytest.approx(table.loc["lm-infinite", "32"], rel=1e-4)
    assert table.loc["vanilla", "256"] != pytest.approx(table.loc["lm-infinite", "256"], rel=1e-3)
    for name in ("ppl.md", "nll.csv", "nll_vs_position.png"):
        assert (tmp_path / name).stat().st_size > 0
    # two documents: every number with its bootstrap interval, in results.json, the CSV beside, the Markdown
    lo, hi = results["tables"]["ppl"]["lo"][1][2], results["tables"]["ppl"]["hi"][1][2]
    assert lo <= table.loc["lm-infinite", "256"] <= hi
    assert results["metrics"]["lm-infinite"]["256"]["ppl_ci95"] == [lo, hi]
    assert pd.read_csv(tmp_path / "ppl_intervals.csv", index_col=0).loc["lm-infinite", "256 lo"] == pytest.approx(lo)
    assert "[" in (tmp_path / "ppl.md").read_text().splitlines()[-1]


def test_ppl_stream_keeps_memory_flat(tiny, tmp_path):
    res = run(tiny, "stream", "--stream-tokens", "4000", "--chunk-size", "64", "--method", "lm-infinite", out=tmp_path)
    assert res.exit_code == 0, res.output
    results, samples = load(tmp_path)
    (row,) = samples
    assert row["cache_slots"] == 4 + 32  # the ring: first g + window, whatever the stream's length
    assert len(row["window_nll"]) >= 40 and all(math.isfinite(x) for x in row["window_nll"])
    assert (tmp_path / "stream_nll.csv").exists() and (tmp_path / "stream_nll.png").exists()
    assert list(pd.read_csv(tmp_path / "stream_rss.csv", index_col=0).columns) == ["RSS MB @400", "RSS MB @4,000"]


def test_stream_through_the_ring_equals_the_default_cache(tiny):
    """The stream's NLL through the ring equals the one through LMInfiniteCache (chunks of 48 over a window
    of 32: the ring wraps every chunk)."""
    from lminf_eval.tasks.stream import stream_nll

    from lminf_eval import apply_lm_infinite
    from lminf_eval.harness.models import load_model
    from lminf_eval.ring_cache import LMInfiniteRingCache

    model, _ = load_model(str(tiny.model))
    apply_lm_infinite(model, n_global=4)
    ids = torch.randint(0, model.config.vocab_size, (1, 600), generator=torch.Generator().manual_seed(0))
    ring = stream_nll(model, ids, 48, 100, LMInfiniteRingCache.for_model(model))
    default = stream_nll(model, ids, 48, 100)
    assert ring["cache_slots"] == 36 and default["cache_slots"] > 36
    assert ring["window_nll"] == pytest.approx(default["window_nll"], abs=1e-3)  # (rounded to 4 places)
    assert ring["mean_nll"] == pytest.approx(default["mean_nll"], abs=1e-5)


def test_passkey_end_to_end(tiny, tmp_path):
    res = run(
        tiny,
        "passkey",
        "--lengths",
        "32x,48x",  # (the tiny byte-level tokenizer spends ~500 tokens on the prompt's fixed part)
        "--depths",
        "0,0.5,1",
        "--num-samples",
        "2",
        "--distractors",
        "2",
        "--method",
        "vanilla,truncate,lm-infinite:top_k=2:top_k_from_layer=1",
        out=tmp_path,
    )
    assert res.exit_code == 0, res.output
    results, samples = load(tmp_path)
    assert len(samples) == 3 * 2 * 3 * 2
    assert all({"key", "answer", "correct", "prompt_tokens"} <= s.keys() for s in samples)
    # every method saw the same prompts
    keys = {(s["cell"]["length"], s["cell"]["depth"], s["cell"]["sample"], s["key"]) for s in samples}
    assert len(keys) == 2 * 3 * 2
    acc = pd.read_csv(tmp_path / "passkey_accuracy.csv", index_col=0)
    assert list(acc.columns) == ["1024", "1536", "avg"] and len(acc) == 3
    assert (tmp_path / "passkey_by_depth.csv").exists()
    assert len(list(tmp_path.glob("passkey_heatmap_*.png"))) == 3


def test_generate_end_to_end(tiny, tmp_path):
    res = run(tiny, "generate", "--lengths", "1x,4x", "--new-tokens", "12", "--num-docs", "2", out=tmp_path)
    assert res.exit_code == 0, res.output
    results, samples = load(tmp_path)
    assert len(samples) == 2 * 2 * 2 and all(s["hypothesis"] and s["reference"] for s in samples)
    for metric in ("bleu", "rouge1", "rouge2", "rougeL"):
        table = pd.read_csv(tmp_path / f"{metric}.csv", index_col=0)
        assert list(table.columns) == ["32", "128"]
        assert ((table >= 0) & (table <= 100)).all().all()


def test_timing_end_to_end(tiny, tmp_path):
    res = run(tiny, "timing", "--lengths", "2x,4x", "--new-tokens", "3", out=tmp_path)
    assert res.exit_code == 0, res.output
    results, samples = load(tmp_path)
    assert all(s["encode_s"] > 0 and s["decode_s_per_token"] > 0 for s in samples)
    speed = pd.read_csv(tmp_path / "speedup_encode_s.csv", index_col=0)
    assert speed.loc["vanilla"].tolist() == [1.0, 1.0]


def test_diagnose_end_to_end(tiny, tmp_path):
    res = run(tiny, "diagnose", "--lengths", "4x", "--method", "vanilla", out=tmp_path)
    assert res.exit_code == 0, res.output
    results, (row,) = load(tmp_path)
    assert set(row["max_logit"]) == {"1", "2"} and len(row["entropy"]["2"]) == 128
    assert len(row["max_logit"]["2"]) == 4  # one row of distance buckets per head
    maxima = pd.read_csv(tmp_path / "diagnose_max_logit.csv", index_col=0)
    assert (maxima.diff(axis=1).iloc[:, 1:] >= 0).all().all()  # "max within <= d" never decreases
    assert (tmp_path / "diagnose.png").stat().st_size > 0
    sink = pd.read_csv(tmp_path / "diagnose_sink.csv", index_col=0).iloc[:, 0]
    assert ((sink >= 0) & (sink <= 1)).all()


def test_diagnose_sink_share_equals_dense_softmax():
    """The blockwise position-0 share against one dense causal softmax, across block boundaries."""
    from lminf_eval.tasks import diagnose

    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 300, 8, generator=gen), torch.randn(1, 2, 300, 8, generator=gen)
    k[:, :, 0] *= 4  # a strong first key, so the share is far from uniform
    stats = diagnose.Stats({0}, 300, l_pre=200, block=70)
    stats.observe(0, q, k, 0.5)
    scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.5
    p = scores.masked_fill(torch.ones(300, 300, dtype=torch.bool).triu(1), -math.inf).softmax(-1)
    assert stats.sink[0] == pytest.approx(float(p[0, :, diagnose.SINK_FROM : 200, 0].mean()), rel=1e-5)


def test_report_reads_runs(tiny, tmp_path):
    out = tmp_path / "run"
    assert run(tiny, "ppl", "--lengths", "1x,2x", "--num-docs", "1", out=out).exit_code == 0
    res = runner.invoke(app, ["report", str(out), "--output", str(tmp_path / "report.md")])
    assert res.exit_code == 0, res.output
    text = (tmp_path / "report.md").read_text()
    assert "### ppl: ppl" in text and "| lm-infinite |" in text
    assert f"- {out}: complete, 2 of 2 cells, 0 OOM, documents per cell: 1" in text


def test_report_shows_documents_per_cell_where_they_differ(tiny, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "long.txt").write_text((tiny.data / "doc0.txt").read_text())
    (data / "short.txt").write_text((tiny.data / "doc1.txt").read_text()[:120])  # reaches 1x (32), not 4x (128)
    out = tmp_path / "run"
    res = runner.invoke(
        app, ["ppl", "--model", str(tiny.model), "--dataset", str(data), "--lengths", "1x,4x", "--min-tokens", "40",
              "--num-docs", "2", "--method", "vanilla", "--output-dir", str(out)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    text = runner.invoke(app, ["report", str(out)]).output
    assert "documents per cell: 1 to 2 (table docs)" in text
    assert "### ppl: docs" in text and "| vanilla | 2 | 1 |" in text.replace(".0 ", " ")


def test_config_file_and_flag_precedence(tiny, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("methods: [vanilla, window]\nlengths: 1x,2x\nnum-docs: 1\n")
    res = run(tiny, "ppl", "--config", config, "--lengths", "1x,4x", out=tmp_path / "out")
    assert res.exit_code == 0, res.output
    results, _ = load(tmp_path / "out")
    assert results["config"]["method"] == ["vanilla", "window"]  # from the file
    assert results["resolved"]["lengths"] == [32, 128]  # the flag wins


def test_resume_after_interrupt(tiny, tmp_path, monkeypatch):
    calls = []
    original = Perplexity.run_cell

    def interrupted(self, cell):
        calls.append(cell.key)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, cell)

    monkeypatch.setattr(Perplexity, "run_cell", interrupted)
    res = run(tiny, "ppl", "--lengths", "1x,2x", "--num-docs", "2", out=tmp_path)
    assert res.exit_code == 130
    results, samples = load(tmp_path)
    assert results["status"] == "interrupted" and len(samples) == 2
    calls.clear()
    res = run(tiny, "ppl", "--lengths", "1x,2x", "--num-docs", "2", "--resume", out=tmp_path)
    assert res.exit_code == 0, res.output
    results, samples = load(tmp_path)
    assert results["status"] == "complete" and len(samples) == 4 and len(calls) == 2
    assert len({json.dumps(s["cell"], sort_keys=True) for s in samples}) == 4


def test_oom_cell_is_recorded_and_run_goes_on(tiny, tmp_path, monkeypatch):
    original = ppl_task.token_nll
    seen = []

    def sometimes_oom(model, ids):
        seen.append(1)
        if len(seen) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return original(model, ids)

    monkeypatch.setattr(ppl_task, "token_nll", sometimes_oom)
    res = run(tiny, "ppl", "--lengths", "1x,2x", "--num-docs", "2", "--method", "lm-infinite", out=tmp_path)
    assert res.exit_code == 0, res.output
    results, samples = load(tmp_path)
    assert [s["status"] for s in samples] == ["ok", "oom"] and results["cells"]["oom"] == 1
    res = run(tiny, "ppl", "--lengths", "1x", "--num-docs", "1", "--method", "vanilla", out=tmp_path / "all")
    monkeypatch.setattr(ppl_task, "token_nll", lambda m, i: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")))
    res = run(tiny, "ppl", "--lengths", "1x", "--num-docs", "1", out=tmp_path / "none")
    assert res.exit_code == 0
    assert pd.read_csv(tmp_path / "none" / "ppl.csv", index_col=0).loc["vanilla", "32"] == "OOM"


def test_nll_buckets_by_hand():
    methods = parse_methods(["vanilla"])
    options = PerplexityOptions(bucket_size=2)
    run_config = SimpleNamespace(options=options, seed=0)
    task = Perplexity(SimpleNamespace(lengths=[4, 8], l_pre=8, methods=methods, run_config=run_config))
    rows = [  # nll[k] is the NLL of target position k + 1
        {"cell": {"method": "vanilla", "doc": "a"}, "status": "ok", "nll": [1, 2, 3, 4, 5, 6, 7]},
        {"cell": {"method": "vanilla", "doc": "b"}, "status": "ok", "nll": [3, 3, 5, 6]},
    ]
    metrics, tables = task.summarize(rows)
    # at 4: targets 2,3 -> a: 2,3  b: 3,5 -> mean 3.25 ; at 8: targets 6,7 -> a only: 6,7 -> 6.5
    assert metrics["vanilla"]["4"]["nll"] == pytest.approx(3.25)
    one_doc = {"ppl": pytest.approx(math.exp(6.5)), "nll": 6.5, "docs": 1, "ppl_ci95": [None, None]}
    assert metrics["vanilla"]["8"] == one_doc | {"nll_ci95": [None, None]}  # (no interval from one document)
    lo, hi = metrics["vanilla"]["4"]["nll_ci95"]  # two documents, means 2.5 and 4: resampled, within them
    assert lo == pytest.approx(2.5) and hi == pytest.approx(4.0) and tables["nll"].loc["vanilla", "4"].lo == lo
    assert metrics["vanilla"]["overall"]["nll"] == pytest.approx((28 + 17) / 11)
    assert tables["ppl"].loc["vanilla", "4"] == pytest.approx(math.exp(3.25))


def test_bleu_rouge_on_known_strings():
    same = score(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert same["bleu"] == pytest.approx(100) and same["rougeL"] == pytest.approx(100)
    part = score(["the cat"], ["the cat sat"])  # ROUGE-1: P = 1, R = 2/3 -> F = 0.8
    assert part["rouge1"] == pytest.approx(80) and part["rouge2"] == pytest.approx(100 * 2 * 1 * 0.5 / 1.5)
    assert score(["completely different words"], ["the cat sat on the mat"])["bleu"] == pytest.approx(0)


def test_passkey_prompt_and_scoring():
    import random

    tok = fixtures.tokenizer()
    for depth in (0.0, 1.0):
        ids, [key] = make_prompt(tok, 2000, depth, random.Random(1))
        text = tok.decode(ids)
        assert abs(len(ids) - 2000) < 90 and text.count(key) == 2  # within one filler sentence (~80 bytes)
        where = text.index(key) / len(text)
        assert where < 0.3 if depth == 0 else where > 0.8
    ids, [key] = make_prompt(tok, 3000, 0.5, random.Random(2), Needles(distractors=3))
    text = tok.decode(ids)
    assert text.count("Remember it.") == 4 and text.count(key) == 2  # true needle + 3 decoys, key once in it
    asked = text.rsplit("What is the pass key of ", 1)[1].split("?")[0]
    assert f"The pass key of {asked} is {key}." in text
    assert first_integer(" 4821. Remember it") == "4821" and first_integer("no digits") is None


KINDS = [("name", "number"), ("word", "word"), ("uuid", "uuid"), ("number", "word")]


@pytest.mark.parametrize("key_type,value_type", KINDS)
def test_needle_variants_hide_and_ask_what_they_say(key_type, value_type):
    import random
    import re

    tok = fixtures.tokenizer()
    value_pattern = {"number": r"\d+", "word": r"[a-z]+-[a-z]+", "uuid": r"[0-9a-f-]{36}"}[value_type]
    for variant in ("multivalue", "multiquery"):
        needles = Needles(variant, distractors=2, values=3, queries=3, key_type=key_type, value_type=value_type)
        ids, answers = make_prompt(tok, 1500, 0.3, random.Random(5), needles)
        text = tok.decode(ids)
        stored = re.findall(r"The pass key of (.+?) is (" + value_pattern + r")\. Remember", text)
        keys = [k for k, _ in stored]
        asked = text.rsplit("What are all the pass keys of ", 1)[1].split("?")[0].split(", ")
        assert len(answers) == 3 and len({v for _, v in stored}) == len(stored)  # values all distinct
        assert sorted(answers) == sorted(v for k, v in stored if k in asked)
        if variant == "multivalue":  # one key holds 3 values, 2 decoy keys one each
            assert len(stored) == 5 and len(asked) == 1 and keys.count(asked[0]) == 3 and len(set(keys)) == 3
        else:  # 3 keys asked, 2 decoys, every key distinct
            assert len(stored) == 5 and len(asked) == 3 and len(set(keys)) == 5
        assert abs(len(ids) - 1500) < 100
    a, b = "river-stone", "1234567"
    assert found(f" {a}, 7 and {b}.", a, False) and found(f" {b}.", b, False) and not found(" 12345678", b, False)
    assert not found(" big-river-stone", a, False) and found(" 1234567 or 5", b, True)
    assert not found(" 5, 1234567", b, True)  # the paper's single passkey: the first number must be it


def test_essay_and_file_haystacks(tmp_path):
    import random

    tok = fixtures.tokenizer()
    ids, [key] = make_prompt(tok, 3000, 0.5, random.Random(3), haystack="essay")
    text = tok.decode(ids)
    assert "The grass is green" not in text and "Python" in text and text.count(key) == 2
    assert abs(len(ids) - 3000) < 150
    own = tmp_path / "hay.txt"
    own.write_text("Ships sail at dawn. Gulls follow them home! Who counts the waves?")
    ids, [key] = make_prompt(tok, 800, 0.0, random.Random(3), haystack=str(own))
    text = tok.decode(ids)
    assert text.count("Gulls follow them home!") > 5 and text.count(key) == 2  # the short file, cycled


def test_passkey_variants_end_to_end(tiny, tmp_path):
    args = ["passkey", "--lengths", "48x", "--depths", "0,1", "--num-samples", "1", "--method", "vanilla,lm-infinite"]
    args += ["--variants", "single,multivalue,multiquery", "--values", "2", "--queries", "2", "--key-type", "word"]
    res = run(tiny, *args, "--haystack", "essay", out=tmp_path)
    assert res.exit_code == 0, res.output
    results, samples = load(tmp_path)
    assert len(samples) == 2 * 3 * 2 and results["status"] == "complete"
    assert all(0 <= s["recall"] <= 1 and s["correct"] == (s["recall"] == 1) for s in samples)
    assert sum(isinstance(s["key"], list) and len(s["key"]) == 2 for s in samples) == 2 * 2 * 2
    acc = pd.read_csv(tmp_path / "passkey_accuracy.csv", index_col=0)
    variants = ("single", "multivalue", "multiquery")
    assert list(acc.index) == [f"{m} [{v}]" for m in ("vanilla", "lm-infinite") for v in variants]
    assert (tmp_path / "passkey_recall.csv").exists() and len(list(tmp_path.glob("passkey_heatmap_*.png"))) == 6


BAD_INPUTS = {
    "unknown model": (["ppl", "--model", "no-such-model"], "unknown model"),
    "offline hub model": (["ppl", "--model", "someorg/somemodel"], "cannot reach"),
    "unknown dataset": (["ppl", "--dataset", "no-such-data"], "unknown dataset"),
    "offline hub dataset": (["ppl", "--dataset", "someorg/somedata"], "cannot reach"),
    "unknown method": (["ppl", "--method", "vanilla,lm-infinity"], "unknown method"),
    "bad method option": (["ppl", "--method", "lm-infinite:top_kk=3"], "bad method option"),
    "unparsable lengths": (["ppl", "--lengths", "4k,lots"], "cannot parse length"),
    "n_global > n_local": (["ppl", "--n-global", "40"], "n_global (40) > n_local (32)"),
    "no document long enough": (["ppl", "--lengths", "1000x"], "longest of 3"),
    "bad depths": (["passkey", "--depths", "0,2"], "--depths"),
    "unknown needle variant": (["passkey", "--variants", "single,multikey"], "unknown --variants"),
    "unknown key type": (["passkey", "--key-type", "colour"], "unknown --key-type colour"),
    "unknown value type": (["passkey", "--value-type", "name"], "unknown --value-type name"),
    "too many name keys": (["passkey", "--distractors", "12"], "only 12 names"),
    "missing haystack file": (["passkey", "--haystack", "/no/such/hay.txt"], "--haystack /no/such/hay.txt"),
    "stream on an unbounded method": (["stream", "--method", "vanilla"], "lm-infinite, window, lambda-only, streaming"),
    "generate --compile without a bounded method": (["generate", "--method", "vanilla", "--compile"], "drop --compile"),
    "passkey --compile top-k": (["passkey", "--method", "lm-infinite:top_k=5:top_k_from_layer=0", "--compile"], "none"),
    "timing --compile, no bounded method": (["timing", "--method", "vanilla,self-extend", "--compile"], "none of"),
    "batch size 0": (["generate", "--batch-size", "0"], "--batch-size"),
    "lm-eval without tasks": (["lm-eval"], "--tasks is required"),
    "unknown lm-eval task": (["lm-eval", "--tasks", "no_such_task"], "unknown lm-eval task no_such_task"),
    "lm-eval include path": (["lm-eval", "--tasks", "x", "--include-path", "/no/such/dir"], "--include-path"),
    "lm-eval gen kwargs": (["lm-eval", "--tasks", "niah_single_1", "--gen-kwargs", "top_p"], "key=value pairs"),
    "lm-eval chat template": (["lm-eval", "--tasks", "niah_single_1", "--apply-chat-template"], "no chat template"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2(tiny, tmp_path, monkeypatch, case):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lminf_eval.harness import models

    models.hub_reachable.cache_clear()
    args, expected = BAD_INPUTS[case]
    base = {
        "--model": tiny.model,
        "--dataset": tiny.data,
        "--output-dir": tmp_path,
        "--lengths": "1x,2x",
        "--n-global": 4,
    }
    for flag, value in base.items():
        if flag not in args and takes(args[0], flag):
            args = [*args, flag, str(value)]
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lminf-eval: error:") and expected in lines[0], res.stderr
    assert "Traceback" not in res.output


def test_unknown_config_key_and_unsupported_architecture(tiny, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = tmp_path / "bad.yaml"
    config.write_text("lenghts: 1x\n")
    res = run(tiny, "ppl", "--config", config, out=tmp_path / "a")
    assert res.exit_code == 2 and "unknown config key 'lenghts'" in res.stderr
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(fixtures.tokenizer()))).save_pretrained(
        gpt2
    )
    fixtures.tokenizer().save_pretrained(gpt2)
    res = runner.invoke(
        app, ["ppl", "--model", str(gpt2), "--dataset", str(tiny.data), "--output-dir", str(tmp_path / "b")]
    )
    assert res.exit_code == 2 and "unsupported architecture 'gpt2'" in res.stderr and "llama" in res.stderr


def test_missing_optional_package(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setitem(sys.modules, "accelerate", None)  # as if not installed
    res = run(tiny, "ppl", out=tmp_path)
    assert res.exit_code == 2 and "missing optional package accelerate" in res.stderr


def test_lengths_inside_the_window_warn(tiny, tmp_path):
    res = run(tiny, "ppl", "--lengths", "0.5x,1x", "--num-docs", "1", out=tmp_path)
    assert res.exit_code == 0 and "warning" in res.stderr and "within the pretraining length" in res.stderr


def test_two_cpu_processes_split_the_cells_and_merge(tiny, tmp_path):
    """torchrun with 2 CPU processes: a real group, the 6 cells split 3 + 3, one merged folder, and the tables of
    one process."""
    args = ["ppl", "--model", tiny.model, "--dataset", tiny.data, "--n-global", "4", "--lengths", "1x,4x"]
    args += ["--num-docs", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "lminf_eval"]
    done = subprocess.run(
        [*launch, *map(str, args), "--output-dir", str(tmp_path / "two")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    res = runner.invoke(app, [*map(str, args), "--output-dir", str(tmp_path / "one")])
    assert res.exit_code == 0
    two, one = load(tmp_path / "two"), load(tmp_path / "one")
    assert len(two[1]) == len(one[1]) == 6 and not list((tmp_path / "two").glob("samples.rank*"))
    assert sorted(r["rank"] for r in two[1]) == [0, 0, 0, 1, 1, 1]  # each process ran its own half
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "two" / "ppl.csv", index_col=0),
        pd.read_csv(tmp_path / "one" / "ppl.csv", index_col=0),
        rtol=1e-5,
    )


def test_help_shows_each_commands_resolved_defaults():
    """Defaults live once (settings, RunConfig, task options); help text shows what applies to each command."""
    for command, n_global, lengths in (("ppl", 100, "0.5x,1x,2x"), ("passkey", 10, "1x,1.5x,2x"), ("stream", 10, None)):
        res = runner.invoke(app, [command, "--help"], env={"COLUMNS": "400"})
        assert res.exit_code == 0
        line = next(x for x in res.output.splitlines() if "--n-global" in x)
        assert f"(default: {n_global})" in line, line
        line = next((x for x in res.output.splitlines() if "--lengths" in x), None)
        assert lengths in line if lengths else line is None, line  # (a stream's length is --stream-tokens)
    res = runner.invoke(app, ["generate", "--help"], env={"COLUMNS": "400"})
    assert "(default: 100)" in next(x for x in res.output.splitlines() if "--new-tokens" in x)


def test_each_command_lists_and_reads_only_its_own_flags(tiny, tmp_path):
    """A flag a task does not read is absent from its help and refused in its --config; the defaults of stream
    (bounded methods) and diagnose (vanilla) run as they are, without a warning about themselves."""
    documents = ["--dataset", "--text-field", "--split", "--num-docs", "--min-tokens"]
    absent = {
        "passkey": documents,
        "timing": documents,
        "lm-eval": documents,
        "stream": ["--lengths", "--num-docs", "--min-tokens"],
        "diagnose": ["--num-docs", "--min-tokens", "--n-global", "--top-k"],
    }
    for command, flags in absent.items():
        shown = {w for line in runner.invoke(app, [command, "--help"], env={"COLUMNS": "400"}).output.splitlines()
                 for w in line.replace("│", " ").split() if w.startswith("--")}  # fmt: skip
        assert "--model" in shown and not shown & set(flags), (command, shown & set(flags))
    config = tmp_path / "passkey.yaml"
    config.write_text("dataset: arxiv-sample\n")
    res = run(tiny, "passkey", "--config", config, out=tmp_path / "refused")
    assert res.exit_code == 2 and "unknown config key 'dataset'" in res.stderr
    res = run(tiny, "passkey", "--lengths", "32x", "--num-samples", "1", "--method", "vanilla", out=tmp_path / "pk")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "pk" / "results.json").read_text())["config"]["dataset"] is None
    res = run(tiny, "stream", "--stream-tokens", "300", "--chunk-size", "64", out=tmp_path / "stream")
    assert res.exit_code == 0, res.output
    assert [m["label"] for m in load(tmp_path / "stream")[0]["resolved"]["methods"]] == ["lm-infinite", "streaming-llm"]
    res = run(tiny, "diagnose", "--lengths", "4x", out=tmp_path / "diagnose")  # (queries from position 64 on)
    assert res.exit_code == 0 and "ignored" not in res.stderr and "warning" not in res.stderr, res.stderr


def test_third_party_task_from_an_entry_point(tiny, tmp_path, monkeypatch):
    """A task registered through the `lminf_eval.tasks` entry point group becomes a command that runs."""
    from dataclasses import dataclass

    from lminf_eval.harness import cli, task

    @dataclass
    class CountOptions:
        scale: int = task.option(2, "Multiplier.")

    class CountTokens(task.Task):
        name = "count-tokens"
        help = "Tokens per document, times --scale."
        Options = CountOptions

        def cells(self):
            return [task.Cell({"method": m.label, "length": n}, m) for m in self.ctx.methods for n in self.ctx.lengths]

        def run_cell(self, cell):
            return {"value": cell.key["length"] * self.options.scale}

        def summarize(self, rows):
            values = {(r["cell"]["method"], r["cell"]["length"]): r["value"] for r in rows}
            return {}, {"counts": method_table(values, self.labels, self.ctx.lengths)}

    entry = SimpleNamespace(load=lambda: CountTokens)
    monkeypatch.setattr(task, "entry_points", lambda group: [entry] if group == "lminf_eval.tasks" else [])
    monkeypatch.setitem(task.TASKS, "count-tokens", CountTokens)  # (gone again after the test)
    cli.register_commands()
    res = run(tiny, "count-tokens", "--lengths", "1x,2x", "--scale", "3", out=tmp_path)
    assert res.exit_code == 0, res.output
    counts = pd.read_csv(tmp_path / "counts.csv", index_col=0)
    assert counts.loc["lm-infinite"].tolist() == [96, 192]


def test_gguf_cache_follows_the_file_content(tmp_path, monkeypatch):
    """A converted copy is found by the file's content: a replaced or emptied .gguf under a cached name is not
    served the old weights, and an unreadable one is a one-line ModelError."""
    from lminf_eval.harness import models

    monkeypatch.setenv("LMINF_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(200)))
    converted = tmp_path / "cache" / "lminf-eval" / "converted"
    fixtures.checkpoint(converted / f"m-{models.gguf_digest(gguf)}")  # as if converted before
    model, _ = models.load_gguf(gguf, "m", torch.float32)
    assert model.config.model_type == "llama"  # served from the cache
    fixtures.checkpoint(converted / "m")  # a copy under the bare name, as older versions kept it
    gguf.write_bytes(b"GGUF" + bytes(range(100)))  # replaced: not the cached weights
    with pytest.raises(models.ModelError, match="cannot read"):
        models.load_gguf(gguf, "m", torch.float32)
    gguf.write_bytes(b"")
    with pytest.raises(models.ModelError, match="not a GGUF file"):
        models.load_gguf(gguf, "m", torch.float32)


def test_torn_last_line_is_repaired_and_every_cell_is_kept(tiny, tmp_path):
    """A kill or a full disk mid-write leaves half a line: --resume drops it (that cell runs again), the next
    cell's line is not glued to it, and the run ends complete with every cell and the uninterrupted table."""
    args = ("ppl", "--lengths", "1x,2x", "--num-docs", "3")
    assert run(tiny, *args, out=tmp_path / "whole").exit_code == 0
    torn = tmp_path / "torn"
    assert run(tiny, *args, out=torn).exit_code == 0
    lines = (torn / "samples.jsonl").read_text().splitlines(keepends=True)
    (torn / "samples.jsonl").write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    res = run(tiny, *args, "--resume", out=torn)
    assert res.exit_code == 0, res.output
    assert "torn" in res.stderr
    results, samples = load(torn)
    assert results["status"] == "complete" and len(samples) == 6
    pd.testing.assert_frame_equal(pd.read_csv(torn / "ppl.csv"), pd.read_csv(tmp_path / "whole" / "ppl.csv"))


def test_file_size_limit_on_a_real_filesystem_keeps_finished_cells(tiny, tmp_path):
    """A real write failure, not a simulated one: the process may not grow a file past 5 KB (RLIMIT_FSIZE, as
    a quota or a full disk does), so samples.jsonl fails mid-run, possibly mid-line. One line, exit 2, the
    finished cells kept; --resume without the limit ends complete with the uninterrupted table."""
    import resource
    import signal

    args = ["ppl", "--lengths", "1x,8x", "--num-docs", "3", "--n-global", "4", "--model", str(tiny.model)]
    args += ["--dataset", str(tiny.data)]
    assert runner.invoke(app, [*args, "--output-dir", str(tmp_path / "whole")]).exit_code == 0

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (5000, 5000))

    out = tmp_path / "limited"
    cli = [sys.executable, "-m", "lminf_eval", *args, "--output-dir", str(out)]
    proc = subprocess.run(cli, capture_output=True, text=True, preexec_fn=limited, timeout=600)
    error = [line for line in proc.stderr.splitlines() if line.startswith("lminf-eval: error")]
    assert proc.returncode == 2 and len(error) == 1 and "cannot write" in error[0], proc.stderr[-2000:]
    kept = [line for line in (out / "samples.jsonl").read_text().splitlines() if line.endswith("}")]
    assert 1 <= len(kept) < 6
    res = runner.invoke(app, [*args, "--output-dir", str(out), "--resume"])
    assert res.exit_code == 0, res.output
    results, samples = load(out)
    assert results["status"] == "complete" and len(samples) == 6
    pd.testing.assert_frame_equal(pd.read_csv(out / "ppl.csv"), pd.read_csv(tmp_path / "whole" / "ppl.csv"))


def test_resume_refuses_a_different_run(tiny, tmp_path):
    """--resume compares what changes a number and names what differs, in one line, exit 2."""
    base = ("ppl", "--lengths", "1x,2x", "--num-docs", "1")
    assert run(tiny, *base, out=tmp_path).exit_code == 0
    other = tmp_path / "other.txt"
    other.write_text(fixtures.sentences(150, seed=99))  # (other text than the run's documents)
    cases = {
        "methods": ["--n-global", "5"],
        "lengths": ["--lengths", "1x,4x"],
        "documents": ["--dataset", str(other)],
        "seed": ["--seed", "3"],
    }
    for what, change in cases.items():
        res = runner.invoke(
            app, [*base, "--model", str(tiny.model), "--dataset", str(tiny.data), "--n-global", "4",
                  "--output-dir", str(tmp_path), "--resume", *change],
        )  # fmt: skip
        assert res.exit_code == 2, (what, res.output)
        assert len(res.stderr.strip().splitlines()) == 1 and what in res.stderr, res.stderr
    res = run(tiny, *base, "--resume", out=tmp_path)  # the same run resumes (nothing left to do)
    assert res.exit_code == 0 and load(tmp_path)[0]["status"] == "complete"


def test_a_locked_folder_refuses_a_second_run(tiny, tmp_path):
    from lminf_eval.harness.results import _lock

    tmp_path.mkdir(exist_ok=True)
    held = _lock(tmp_path)  # as a first run holds it
    res = run(tiny, "ppl", "--lengths", "1x", "--num-docs", "1", out=tmp_path)
    held.close()
    assert res.exit_code == 2 and "another lminf-eval run" in res.stderr
    assert not (tmp_path / "samples.jsonl").exists()


def test_failed_start_writes_nothing_and_resume_finds_the_run(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ("ppl", "--lengths", "1x,2x", "--num-docs", "1")
    assert run(tiny, *args).exit_code == 0
    first = next((tmp_path / "results" / "ppl").rglob("samples.jsonl")).parent
    (first / "results.json").unlink()
    assert run(tiny, "ppl", "--lengths", "16y").exit_code == 2  # a failed start...
    assert run(tiny, "ppl", "--lengths", "1000x").exit_code == 2  # (fails after the model loaded)
    assert list((tmp_path / "results" / "ppl").glob("*/*")) == [first]  # ...leaves no folder behind
    res = run(tiny, *args, "--resume")
    assert res.exit_code == 0 and (first / "results.json").exists()


def _signalled_run(tiny, out: Path, at: str, sig: str = "SIGTERM") -> tuple[subprocess.CompletedProcess, Path]:
    """A real `lminf-eval ppl` process that sends itself `sig` at a known point (`at`): the second cell's
    start ("cell") or the summary's ("summary"). No sleep races the run: the signal lands where the test says."""
    args = ["ppl", "--model", str(tiny.model), "--dataset", str(tiny.data), "--lengths", "1x,8x", "--num-docs", "3"]
    args += ["--method", "vanilla,lm-infinite,window", "--n-global", "4", "--output-dir", str(out)]
    script = f"""
import os, signal, sys
from lminf_eval.tasks.ppl import Perplexity
calls = []
def hook(original):
    def wrapped(self, *a):
        calls.append(1)
        if {at!r} == "summary" or len(calls) == 2:
            os.kill(os.getpid(), signal.{sig})
        return original(self, *a)
    return wrapped
name = "run_cell" if {at!r} == "cell" else "summarize"
setattr(Perplexity, name, hook(getattr(Perplexity, name)))
from lminf_eval.harness.cli import app
sys.exit(app({args!r}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    return proc, out


def test_sigterm_ends_the_run_like_ctrl_c(tiny, tmp_path):
    proc, out = _signalled_run(tiny, tmp_path, "cell")
    assert (out / "results.json").exists(), (proc.returncode, proc.stderr[-3000:])
    results, samples = load(out)
    assert proc.returncode == 130 and results["status"] == "interrupted" and len(samples) == 1, proc.stderr[-2000:]
    assert results["cells"] == {"total": 1, "planned": 9, "oom": 0}
    assert "--resume" in proc.stdout + proc.stderr


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_during_the_summary_still_writes_it_whole(tiny, tmp_path, sig):
    """The window the old test raced into: every cell done, the signal lands while results are written."""
    proc, out = _signalled_run(tiny, tmp_path, "summary", sig)
    assert proc.returncode == 130, (proc.returncode, proc.stderr[-3000:])
    results, samples = load(out)
    assert results["status"] == "complete" and len(samples) == 9 and (out / "ppl.md").exists()


def test_resume_retries_oom_cells(tiny, tmp_path, monkeypatch):
    original = ppl_task.token_nll
    monkeypatch.setattr(ppl_task, "token_nll", lambda m, i: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")))
    args = ("ppl", "--lengths", "1x", "--num-docs", "1", "--method", "lm-infinite")
    assert run(tiny, *args, out=tmp_path).exit_code == 0
    assert [s["status"] for s in load(tmp_path)[1]] == ["oom"]
    monkeypatch.setattr(ppl_task, "token_nll", original)
    assert run(tiny, *args, "--resume", "--keep-oom", out=tmp_path).exit_code == 0  # (the flag turns retry off)
    results, samples = load(tmp_path)
    assert results["cells"]["oom"] == 1 and [s["status"] for s in samples] == ["oom"]
    assert run(tiny, *args, "--resume", out=tmp_path).exit_code == 0
    results, _ = load(tmp_path)
    assert results["cells"]["oom"] == 0 and pd.read_csv(tmp_path / "ppl.csv", index_col=0).notna().all().all()


def test_non_finite_nll_marks_the_cell_instead_of_dropping_the_document():
    """A document with a non-finite NLL (stored as null) makes its cells NaN: no method's number may come from
    fewer documents than another's."""
    methods = parse_methods(["vanilla", "lm-infinite"])
    run_config = SimpleNamespace(options=PerplexityOptions(bucket_size=2), seed=0)
    task = Perplexity(SimpleNamespace(lengths=[4, 8], l_pre=8, methods=methods, run_config=run_config))
    rows = [
        {"cell": {"method": m, "doc": d}, "status": "ok", "nll": nll}
        for m, bad in (("vanilla", None), ("lm-infinite", 7))
        for d, nll in (("a", [1, 2, 3, 4, 5, 6, 7]), ("b", [3, 3, 5, 6, 2, 2, bad or 4]))
    ]
    metrics, tables = task.summarize(rows)
    ppl = tables["ppl"]
    assert ppl.loc["vanilla", "8"] == pytest.approx(math.exp((6 + 7 + 2 + 4) / 4))
    rows[-1]["nll"][-1] = None  # lm-infinite, document b, target 7: non-finite
    metrics, tables = task.summarize(rows)
    assert tables["ppl"].loc["lm-infinite", "8"] == "NaN" and tables["ppl"].loc["lm-infinite", "overall"] == "NaN"
    assert tables["ppl"].loc["lm-infinite", "4"] == pytest.approx(ppl.loc["vanilla", "4"])  # (bucket 2..3: finite)
    assert metrics["lm-infinite"]["8"]["non_finite"] == 1


def _flag_cases():
    """(command, flag, bad value) for every int flag of every command: one below its declared minimum, and text."""
    from lminf_eval.harness.cli import _flags, _strip_none
    from lminf_eval.harness.task import TASKS
    from lminf_eval.settings import NAMES

    cases = []
    for command, task_type in sorted(TASKS.items()):
        for name, kind, _, minimum in _flags(task_type):
            if _strip_none(kind) is int and name not in NAMES:  # (settings are checked by Settings.resolve)
                assert minimum is not None, f"{command} --{name} declares no least value: option(..., min=)"
                cases += [(command, name, minimum - 1), (command, name, "abc")]
    return cases


def test_every_numeric_flag_refuses_bad_values_in_one_line(tiny, tmp_path):
    """Generated: a new int flag without a declared minimum fails here; each bad value, on the command line or
    in a --config file, is one line, exit 2, and no folder is written."""
    for command, name, bad in _flag_cases():
        config = tmp_path / "bad.yaml"
        config.write_text(f"{name}: {bad}\n")
        for args in ([f"--{name.replace('_', '-')}", str(bad)], ["--config", str(config)]):
            res = run(tiny, command, *args, out=tmp_path / "out")
            lines = res.stderr.strip().splitlines()
            assert res.exit_code == 2 and len(lines) == 1 and f"--{name.replace('_', '-')}" in lines[0], (
                command,
                args,
                res.output,
            )
    assert not (tmp_path / "out").exists()


def test_bad_files_and_values_are_one_line_errors(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    jsonl = {
        "not-json.jsonl": '{"text": "fine"}\n{"text": \n',
        "not-object.jsonl": "[1, 2]\n",
        "not-text.jsonl": '{"text": 5}\n',
    }
    for name, content in jsonl.items():
        (tmp_path / name).write_text(content)
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "results.json").write_text('{"command": "ppl", "config": {')
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "results.json").write_text("")
    (tmp_path / "a-file").write_text("x")
    cases = {
        "config is a folder": (["ppl", "--config", str(tmp_path)], "not a file"),
        "lengths infx": (["ppl", "--lengths", "infx"], "cannot parse length"),
        "n_global=inf": (["ppl", "--method", "lm-infinite:n_global=inf"], "whole number"),
        "device foo": (["ppl", "--device", "foo"], "unsupported --device"),
        "backend fast": (["ppl", "--backend", "fast"], "unknown backend"),
        "backend as a method option": (["ppl", "--method", "lm-infinite:backend=fast"], "unknown backend"),
        "group_size=0": (["ppl", "--method", "self-extend:group_size=0"], "group_size must be >= 1"),
        "rope_type wrong": (["ppl", "--method", "yarn:rope_type=ntk"], "unknown rope_type"),
        "device mps": (["ppl", "--device", "mps"], "unsupported --device"),
        "output-dir a file": (["ppl", "--output-dir", str(tmp_path / "a-file")], "cannot write"),
        **{f"jsonl {n}": (["ppl", "--dataset", str(tmp_path / n)], n.split(".")[0].replace("-", " ")) for n in jsonl},
        "model folder without a model": (["ppl", "--model", str(tmp_path / "empty")], "cannot load model"),
        "report truncated": (["report", str(truncated)], "not a complete results.json"),
        "report empty": (["report", str(tmp_path / "empty")], "not a complete results.json"),
    }
    for case, (args, expected) in cases.items():
        full = [*args] if args[0] == "report" else [*args, "--n-global", "4", "--num-docs", "1"]
        if args[0] != "report" and "--model" not in args:
            full += ["--model", str(tiny.model)]
        if args[0] != "report" and "--dataset" not in args:
            full += ["--dataset", str(tiny.data)]
        if args[0] != "report" and "--output-dir" not in args:
            full += ["--output-dir", str(tmp_path / "out")]
        res = runner.invoke(app, full)
        lines = res.stderr.strip().splitlines()
        message = {"not json": "not valid JSON", "not object": "has no field", "not text": "is not text"}
        expected = message.get(expected, expected)
        assert res.exit_code == 2 and len(lines) == 1 and expected in lines[0], (case, res.output)
    good = tmp_path / "good"
    assert run(tiny, "ppl", "--lengths", "1x", "--num-docs", "1", out=good).exit_code == 0
    res = runner.invoke(app, ["report", str(good), "--output", str(tmp_path)])
    assert res.exit_code == 2 and "cannot write" in res.stderr


def test_result_table_fits_80_columns(capsys, monkeypatch):
    """`make demo`'s table (2 methods x 8 columns) reads on an 80-column terminal: no cell cut short."""
    from lminf_eval.harness.runner import print_table

    df = pd.DataFrame(
        [[70.48, 190.12, 270.77, 174.57, 266.4, 426.25, 596.13, 384.81], [70.48, 190.12, 133.89, 98.9] + [88.38] * 4],
        index=pd.Index(["vanilla", "lm-infinite"], name="method"),
        columns=["128", "256", "512", "1024", "2048", "4096", "8192", "overall"],
    )
    monkeypatch.setenv("COLUMNS", "80")
    print_table("ppl", df)
    out = capsys.readouterr().out
    assert "…" not in out and "lm-infinite" in out and "overall" in out and "596.13" in out
    assert max(len(line) for line in out.splitlines()) <= 80


def test_paper_profile_dry_run_checks_every_step_offline(monkeypatch):
    """`reproduce.py --profile paper --dry-run` plans every step of the GPU profile here, offline, and a step
    with a bad argument is named in one line."""
    import importlib.util

    import yaml

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("reproduce", root / "scripts" / "reproduce.py")
    reproduce = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reproduce)
    steps = reproduce.load_profile("paper")
    assert len(steps) == len(yaml.safe_load((root / "configs" / "paper.yaml").read_text())["steps"])
    assert reproduce.dry_run(steps) == []
    bad = {
        "typo-method": ["ppl", "--model", "llama-2-7b", "--method", "lm-infinty"],
        "typo-flag": ["passkey", "--model", "llama-2-7b", "--num-sample", "3"],
        "typo-dataset": ["ppl", "--model", "llama-2-7b", "--dataset", "pg-19"],
        "bad-setting": ["ppl", "--model", "llama-2-7b", "--method", "self-extend:group_size=0"],
        "fine": ["ppl", "--model", "llama-2-7b", "--dataset", "pg19", "--lengths", "1x,8x"],
    }
    failed = reproduce.dry_run(bad)
    assert [line.split(":")[0] for line in failed] == ["typo-method", "typo-flag", "typo-dataset", "bad-setting"]
    assert "unknown method" in failed[0] and "--num-sample" in failed[1] and "unknown dataset" in failed[2]


@pytest.mark.parametrize(
    "command,flags",
    [
        ("ppl", ["--lengths", "1x,4x", "--num-docs", "3", "--method", "vanilla,lm-infinite,dynamic-ntk"]),
        ("passkey", ["--lengths", "32x", "--num-samples", "3", "--method", "vanilla,lm-infinite", "--new-tokens", "4"]),
        ("generate", ["--lengths", "2x", "--num-docs", "3", "--new-tokens", "4", "--method", "vanilla,lm-infinite"]),
    ],
)
def test_batch_size_batches_and_changes_no_number(tiny, tmp_path, command, flags, monkeypatch):
    """--batch-size 3 runs the cells of one length in one batch (counted at the task's run_batch), and every
    result equals the one-at-a-time run's; Dynamic NTK (per length) and truncate keep running alone."""
    from lminf_eval.harness.task import TASKS

    sizes, real = [], TASKS[command].run_batch
    monkeypatch.setattr(TASKS[command], "run_batch", lambda self, cells: sizes.append(len(cells)) or real(self, cells))
    rows = {}
    for size in ("1", "3"):
        res = run(tiny, command, *flags, "--batch-size", size, out=tmp_path / size)
        assert res.exit_code == 0, res.output
        rows[size] = {json.dumps(r["cell"]): r for r in load(tmp_path / size)[1]}
    assert set(sizes) == {1, 3} and sizes.count(3) == 2  # (vanilla's and lm-infinite's batch of three)
    assert rows["1"].keys() == rows["3"].keys()
    for key, one in rows["1"].items():
        three = rows["3"][key]
        if command == "ppl":
            assert three["nll"] == pytest.approx(one["nll"], abs=2e-4)
        else:
            assert {k: three[k] for k in ("answer", "hypothesis") if k in one} == {
                k: one[k] for k in ("answer", "hypothesis") if k in one
            }


def test_dynamic_rope_starts_from_l_pre_before_every_batch(tiny, tmp_path, monkeypatch):
    """transformers keeps the base a longer forward grew until one shorter than L_pre: the runner puts it back
    before every batch, so a cell's Dynamic NTK base follows its own length (reset_dynamic_rope itself is
    tested against a fresh model in test_ppl_per_length.py)."""
    from lminf_eval.harness import runner

    calls = []
    real = runner.reset_dynamic_rope
    monkeypatch.setattr(runner, "reset_dynamic_rope", lambda model: calls.append(1) or real(model))
    flags = ["--lengths", "2x,4x", "--num-docs", "2", "--new-tokens", "2", "--method", "dynamic-ntk"]
    res = run(tiny, "generate", *flags, out=tmp_path)
    assert res.exit_code == 0, res.output
    assert len(calls) == 4  # one per cell
