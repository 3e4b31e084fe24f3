"""The lm-evaluation-harness bridge, offline on the shipped tiny-rope (L_pre 256): local YAML tasks
(loglikelihood and generate_until), RULER niah_single_1, lm-eval's own command line with the `lminf` model
type. lm-eval's per-sample log-likelihoods are checked against our own forward of the same tokens, so a
bridge that loses the method, the tokenizer or the context would fail here."""

from __future__ import annotations

import json
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lminf_eval.harness import view
from lminf_eval.harness.cli import app
from lminf_eval.harness.models import load_model
from lminf_eval.methods import applied, parse_method

runner = CliRunner()
WORDS = "river stone cloud lamp orange violin paper garden window silver market candle forest".split()


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """Local lm-eval tasks: short prompts (well inside the 256-token window) and long ones (~700 tokens)."""
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    for name, words in (("short", 12), ("long", 500)):
        rows = []
        for i in range(3):
            text = " ".join(WORDS[(i * 7 + j * j) % len(WORDS)] for j in range(words))
            rows.append({"prompt": text, "choices": [" river", " lamp", " market"], "label": i, "answer": " river"})
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        head = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        (root / f"{name}_mc.yaml").write_text(
            f"task: {name}_mc\n{head}output_type: multiple_choice\n"
            'doc_to_text: "{{prompt}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
            "metric_list:\n  - metric: acc\n"
        )
        (root / f"{name}_gen.yaml").write_text(
            f"task: {name}_gen\n{head}output_type: generate_until\n"
            'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
            "generation_kwargs:\n  until: []\n  max_gen_toks: 6\n  do_sample: false\n"
            "metric_list:\n  - metric: exact_match\n"
        )
    return root


def our_loglikelihoods(spec: str, samples: list[dict]) -> list[float]:
    """log p(choice | prompt) for every choice of every sample, from our own forward of the same tokens."""
    model, tok = load_model("tiny-rope")
    method = parse_method(spec)
    out = []
    with applied(model, method.settings(256, None), 256), torch.no_grad():
        for s in samples:
            for context, continuation in requests(s):
                ctx_ids = tok(context).input_ids
                ids = tok(context + continuation).input_ids
                logp = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
                out.append(sum(float(logp[t - 1, ids[t]]) for t in range(len(ctx_ids), len(ids))))
    return out


def requests(sample: dict) -> list[tuple[str, str]]:
    """(context, continuation) of each request of a sample, as we save them or as lm-eval's CLI does."""
    args = sample["arguments"]
    if isinstance(args, dict):
        return [(a["arg_0"], a["arg_1"]) for a in args.values()]
    return [tuple(a[:2]) for a in args]


def lm_eval_samples(run: Path, method: str, task: str) -> list[dict]:
    lines = (run / "lm-eval-samples" / f"{method}__{task}.jsonl").read_text().splitlines()
    return sorted((json.loads(line) for line in lines), key=lambda s: int(s["doc_id"]))


def loglikelihoods(samples: list[dict]) -> list[float]:
    return [float(r[0]) for s in samples for r in s["filtered_resps"]]


def test_local_tasks_on_every_method_match_our_own_forward(task_dir, tmp_path):
    args = ["lm-eval", "--model", "tiny-rope", "--method", "vanilla,lm-infinite:n_global=4"]
    args += ["--tasks", "short_mc,short_gen,long_mc", "--include-path", str(task_dir), "--log-samples"]
    res = runner.invoke(app, [*args, "--output-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "complete" and results["cells"]["planned"] == 6
    assert set(results["tables"]) >= {"short_mc", "short_gen", "long_mc"}
    lm = "lm-infinite_n_global_4"  # the method's label as a file name
    # inside the window the method changes nothing: the same log-likelihoods and the same generations
    short = {m: lm_eval_samples(tmp_path, m, "short_mc") for m in ("vanilla", lm)}
    assert loglikelihoods(short["vanilla"]) == pytest.approx(loglikelihoods(short[lm]), abs=1e-4)
    gen = {m: [s["filtered_resps"] for s in lm_eval_samples(tmp_path, m, "short_gen")] for m in ("vanilla", lm)}
    assert gen["vanilla"] == gen[lm]
    scores = results["metrics"]["results"]
    assert scores["vanilla"]["short_mc"] == scores["lm-infinite:n_global=4"]["short_mc"]
    # past it, lm-eval saw the patched model: its numbers are our own forward's with the method, not vanilla's
    long = {m: lm_eval_samples(tmp_path, m, "long_mc") for m in ("vanilla", lm)}
    assert len(requests(long["vanilla"][0])[0][0].split()) == 500
    for m, spec in (("vanilla", "vanilla"), (lm, "lm-infinite:n_global=4")):
        assert loglikelihoods(long[m]) == pytest.approx(our_loglikelihoods(spec, long[m]), abs=2e-3)
    assert abs(loglikelihoods(long["vanilla"])[0] - loglikelihoods(long[lm])[0]) > 0.1
    # resuming a complete run evaluates nothing again
    again = runner.invoke(app, [*args, "--output-dir", str(tmp_path), "--resume"])
    assert again.exit_code == 0, again.output
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 6


def test_ruler_niah_runs_offline_once_per_length(tmp_path):
    args = ["lm-eval", "--model", "tiny-rope", "--method", "vanilla,truncate", "--tasks", "niah_single_1"]
    args += ["--lengths", "512,1024", "--limit", "1", "--max-gen-toks", "4", "--log-samples"]
    res = runner.invoke(app, [*args, "--output-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output + "".join(traceback.format_exception(*res.exc_info))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "complete" and results["cells"]["planned"] == 4  # method x length
    table = results["tables"]["niah_single_1"]  # RULER's unasked default lengths (-1) are left out
    assert table["columns"] == ["512", "1024"] and table["index"] == ["vanilla", "truncate"]
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    _, tok = load_model("tiny-rope")
    for r in rows:
        n = r["cell"]["length"]
        assert 0 <= r["lm_eval"]["results"]["niah_single_1"][f"{n},none"] <= 1
        config = r["lm_eval"]["configs"]["niah_single_1"]
        assert config["metadata"]["max_seq_lengths"] == [n] and Path(config["metadata"]["tokenizer"]).is_dir()
        assert r["lm_eval"]["n-samples"]["niah_single_1"]["effective"] == 1  # --limit counts per length
        sample = lm_eval_samples(tmp_path, r["cell"]["method"], f"niah_single_1__{n}")[0]
        assert n // 2 < len(tok(requests(sample)[0][0]).input_ids) <= n  # sized with the model's tokenizer
    # `lminf-eval view` browses these samples (scored under their length) and draws a method x length heatmap
    run = view.load(tmp_path)
    browsed = view.samples(run)  # (--limit 1: one sample per cell)
    assert sorted((s.method, s.length) for s in browsed) == sorted(
        (r["cell"]["method"], r["cell"]["length"]) for r in rows
    )
    assert all(s.score.startswith(f"{s.length} ") and s.correct is not None for s in browsed)
    spec = view.heatmap(run.results.tables["niah_single_1"], "niah_single_1")
    assert spec["data"][0]["x"] == ["512", "1024"] and spec["data"][0]["y"] == ["vanilla", "truncate"]


def test_lm_eval_command_line_with_the_lminf_model_type(task_dir, tmp_path):
    """lm-eval's own `run` command (lm-eval-lminf), as a user of lm-eval would call it."""
    cmd = [str(Path(sys.executable).parent / "lm-eval-lminf"), "run", "--model", "lminf"]
    cmd += ["--model_args", "pretrained=tiny-rope,method=lm-infinite,n_global=4", "--tasks", "long_mc"]
    cmd += ["--include_path", str(task_dir), "--output_path", str(tmp_path), "--log_samples", "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    samples = [json.loads(line) for f in tmp_path.rglob("samples_long_mc_*.jsonl") for line in f.open()]
    samples.sort(key=lambda s: int(s["doc_id"]))
    assert len(samples) == 3
    assert loglikelihoods(samples) == pytest.approx(our_loglikelihoods("lm-infinite:n_global=4", samples), abs=2e-3)


def test_lminf_model_type_truncate_keeps_the_last_l_pre_tokens():
    from lminf_eval.harness.lmeval_model import LMInfLM

    lm = LMInfLM(pretrained="tiny-rope", method="truncate", device="cpu")
    assert lm.max_length == 256 and lm.settings is None
    lm = LMInfLM(pretrained="tiny-rope", method="lm-infinite", n_global=4, device="cpu", max_length=2048)
    assert lm.max_length == 2048 and lm.model.lm_infinite.settings.n_global == 4
    lm.remove()
    assert getattr(lm.model, "lm_infinite", None) is None


def test_without_lm_eval_one_line_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    monkeypatch.delitem(sys.modules, "lminf_eval.harness.lmeval_model", raising=False)
    res = runner.invoke(app, ["lm-eval", "--model", "tiny-rope", "--tasks", "x", "--output-dir", str(tmp_path)])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'lminf-eval[lm-eval]'" in lines[0]
