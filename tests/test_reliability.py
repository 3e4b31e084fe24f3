"""No "complete" without the right numbers, and no traceback from any input (issue 20): each test here failed
before its fix. Runs on a tiny random Llama (L_pre 32) and a local corpus written by the test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures import run
from typer.testing import CliRunner

import lminf_eval
from lminf_eval.harness.cli import app
from models import L_PRE, tiny_model

runner = CliRunner()


def one_line(res, expected: str, mid_run: bool = False) -> None:
    """Exit 2 with one error line (after the progress bar's line when the error comes from a cell)."""
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    lines = lines[-1:] if mid_run else lines
    assert len(lines) == 1 and lines[0].startswith("lminf-eval: error:") and expected in lines[0], res.stderr


def samples(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


PPL = ("ppl", "--lengths", "1x,2x", "--num-docs", "2")


def test_resume_into_a_folder_without_its_fingerprint_is_refused(tiny, tmp_path):
    assert run(tiny, *PPL, out=tmp_path).exit_code == 0
    (tmp_path / "run.json").unlink()
    one_line(run(tiny, *PPL, "--n-global", "2", "--resume", out=tmp_path), "run.json")
    (tmp_path / "run.json").write_text("")  # an empty (damaged) fingerprint is refused the same way
    one_line(run(tiny, *PPL, "--resume", out=tmp_path), "run.json")


def test_rows_outside_the_plan_never_count(tiny, tmp_path):
    assert run(tiny, *PPL, out=tmp_path).exit_code == 0
    before = (tmp_path / "ppl.md").read_text()
    row = samples(tmp_path)[0]
    foreign = {**row, "cell": {**row["cell"], "doc": "another-corpus/doc9"}}
    with (tmp_path / "samples.jsonl").open("a") as fh:
        fh.write(json.dumps(foreign) + "\n")
    res = run(tiny, *PPL, "--resume", out=tmp_path)
    assert res.exit_code == 0, res.output
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "complete" and results["cells"]["total"] == results["cells"]["planned"]
    assert (tmp_path / "ppl.md").read_text() == before and "outside" in res.output


def test_an_ok_row_without_its_result_runs_again(tiny, tmp_path):
    assert run(tiny, *PPL, out=tmp_path).exit_code == 0
    before = (tmp_path / "ppl.md").read_text()
    rows = samples(tmp_path)
    del rows[0]["nll"]
    rows[1]["nll"] = "not a list"
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "results.json").unlink()
    assert run(tiny, *PPL, "--resume", out=tmp_path).exit_code == 0
    assert (tmp_path / "ppl.md").read_text() == before and "| - |" not in before


@pytest.mark.parametrize(
    "args, expected",
    [
        (("ppl", "--method", "vanilla,vanilla"), "given twice"),
        (("ppl", "--method", "lm-infinite:n_global=1:n_global=2"), "n_global given twice"),
        (("ppl", "--method", "streaming-llm:limit_distance=5"), "limit_distance"),
        (("ppl", "--method", "lm-infinite:top_k=5:top_k_from_layer=100"), "top_k_from_layer"),
        (("ppl", "--method", "lm-infinite:n_local=1e30"), "n_local"),
        (("ppl", "--method", "lm-infinite:n_global=1e20:n_local=inf"), "n_global"),
        (("ppl", "--method", "string:limit_distance=64:shift_local=64"), "shift_local"),
        (("ppl", "--method", "string:shift_local=-1"), "shift_local"),
        (("ppl", "--method", "string:shift_local=1.5"), "shift_local"),
        (("ppl", "--method", "dca:chunk_size=16:local_window=16"), "local_window"),
        (("ppl", "--method", "dca:local_window=-1"), "local_window"),
        (("ppl", "--method", "dca:chunk_size=0"), "chunk_size"),
        (("ppl", "--method", "dca:chunk_size=L_pre*3"), "chunk_size"),
        (("ppl", "--method", "dca:backend=flex"), "blocks kernel"),
        (("ppl", "--method", "lm-infinite:local_window=4"), "dual chunk attention only"),
        (("ppl", "--pretraining-length", "100000000000000000000"), "--pretraining-length"),
        (("ppl", "--seed", str(2**70)), "--seed"),
        (("ppl", "--num-docs", "50"), "--num-docs"),
        (("passkey", "--depths", "0,0.0"), "--depths"),
        (("passkey", "--variants", "single,single"), "--variants"),
        (("passkey", "--key-type", "word", "--distractors", "900"), "distinct words"),
    ],
)
def test_bad_values_are_one_line(tiny, tmp_path, args, expected):
    one_line(run(tiny, *args, "--lengths", "2x", out=tmp_path / "out"), expected)
    assert not (tmp_path / "out").exists()


def test_bad_config_files_are_one_short_line(tiny, tmp_path):
    laughs = tmp_path / "laughs.yaml"
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [
        f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    ]
    laughs.write_text("\n".join(lines) + "\nmethod: *i\n")
    res = run(tiny, "ppl", "--config", laughs, out=tmp_path / "out")
    one_line(res, "alias")
    assert len(res.stderr) < 500
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    one_line(run(tiny, "ppl", "--config", binary, out=tmp_path / "out"), "binary.yaml")
    empty = tmp_path / "empty-methods.yaml"
    empty.write_text("methods: []\n")
    one_line(run(tiny, "ppl", "--config", empty, out=tmp_path / "out"), "method")


def test_default_folders_of_two_runs_differ_even_in_the_same_second():
    import subprocess
    import sys

    code = "from lminf_eval.harness.results import default_output_dir as d; print(d('ppl', 'tiny-rope').name)"
    a, b = (subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout for _ in "ab")
    assert a.strip() and a != b and a.split("-")[:2] != a.split("-")  # a timestamp, then what keeps them apart


# --- the library ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "mpt", "gptj"])
def test_reapply_then_remove_gives_vanilla_bit_for_bit(family):
    model = tiny_model(family)
    ids = torch.randint(0, 90, (1, L_PRE))
    vanilla = model(ids).logits  # (with autograd on, as a notebook calls it)
    lminf_eval.apply_lm_infinite(model, n_global=1, n_local=4)
    first = model(ids).logits
    lminf_eval.apply_lm_infinite(model, n_global=2, n_local=4)  # a re-apply reconfigures...
    assert not torch.equal(model(ids).logits, first)
    lminf_eval.remove_lm_infinite(model)  # ...and one remove undoes everything
    assert model.config._attn_implementation != "lm_infinite" and torch.equal(model(ids).logits, vanilla)


@pytest.mark.parametrize(
    "model, settings, expected",
    [
        ("linear", {}, "unsupported architecture 'Linear'"),
        ("llama", {"n_local": 1e30}, "at most"),
        ("llama", {"top_k": 2, "top_k_from_layer": 99}, "top_k_from_layer"),
    ],
)
def test_the_library_refuses_in_one_line(model, settings, expected):
    target = torch.nn.Linear(2, 2) if model == "linear" else tiny_model(model)
    with pytest.raises(lminf_eval.LMInfiniteError, match=expected):
        lminf_eval.apply_lm_infinite(target, **settings)


# --- passkey prompts are what their label says ---------------------------------------------------------


def test_passkey_prompts_land_near_their_length_or_are_refused(tiny, tmp_path):
    import random

    from fixtures import tokenizer
    from lminf_eval.tasks.passkey import Needles, make_prompt

    from lminf_eval.errors import UserError

    tok = tokenizer()
    unpunctuated = tmp_path / "words.txt"
    unpunctuated.write_text(" ".join(["word"] * 20000))
    binary = tmp_path / "binary.txt"
    binary.write_bytes(bytes(range(256)) * 200)
    for haystack in ("repeat", str(unpunctuated), str(binary)):
        for length in (800, 1200, 3000):
            ids, _ = make_prompt(tok, length, 0.5, random.Random(0), Needles(), haystack)
            assert length - 8 <= len(ids) <= length, (haystack, length, len(ids))  # (TOLERANCE)
    with pytest.raises(UserError, match="cannot hold"):
        make_prompt(tok, 256, 0.5, random.Random(0), Needles(distractors=50, key_type="word"))
    one_line(run(tiny, "passkey", "--lengths", "16,32", out=tmp_path / "out"), "cannot hold")


def test_an_edited_haystack_is_another_run(tiny, tmp_path):
    hay = tmp_path / "hay.txt"
    hay.write_text("The river runs to the sea. " * 400)
    args = ("passkey", "--lengths", "32x", "--num-samples", "1", "--method", "vanilla", "--haystack", hay)
    assert run(tiny, *args, out=tmp_path / "out").exit_code == 0
    (tmp_path / "out" / "results.json").unlink()
    hay.write_text("The mountain stands by the lake. " * 400)
    one_line(run(tiny, *args, "--resume", out=tmp_path / "out"), "documents")


# --- diagnose and lm-eval ------------------------------------------------------------------------------


def test_diagnose_refuses_lengths_it_cannot_measure(tiny, tmp_path):
    one_line(run(tiny, "diagnose", "--lengths", "4", out=tmp_path / "out"), "--lengths above 64")


@pytest.fixture(scope="module")
def local_task(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lm_eval_local")
    data = root / "rows.jsonl"
    rows = [{"prompt": "the river runs", "choices": [" river", " lamp"], "label": i % 2} for i in range(2)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, file in (("tiny_mc", data), ("lost_mc", root / "no-such-rows.jsonl")):
        (root / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {file}\ntest_split: test\n"
            'output_type: multiple_choice\ndoc_to_text: "{{prompt}}"\ndoc_to_choice: "{{choices}}"\n'
            "doc_to_target: label\nmetric_list:\n  - metric: acc\n"
        )
    return root


@pytest.mark.parametrize(
    "extra, expected",
    [
        (("--tasks", "tiny_mc,tiny_mc"), "twice"),
        (("--tasks", "tiny_mc", "--max-length", "2"), "--max-length"),
        (("--tasks", "tiny_mc", "--max-gen-toks", "100000000"), "--max-gen-toks"),
        (("--tasks", "lost_mc"), "no-such-rows.jsonl"),
    ],
)
def test_lm_eval_bad_values_are_one_line(tiny, tmp_path, local_task, monkeypatch, extra, expected):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    args = ("lm-eval", "--method", "vanilla", "--include-path", local_task, *extra)
    one_line(run(tiny, *args, out=tmp_path / "out"), expected, mid_run="lost" in extra[1])


def test_an_edited_local_lm_eval_task_is_another_run(tiny, tmp_path, local_task, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    for file in local_task.iterdir():
        text = file.read_text().replace(str(local_task), str(task_dir))
        (task_dir / file.name).write_text(text)
    args = ("lm-eval", "--method", "vanilla", "--include-path", task_dir, "--tasks", "tiny_mc")
    assert run(tiny, *args, out=tmp_path / "out").exit_code == 0
    (tmp_path / "out" / "results.json").unlink()
    (task_dir / "rows.jsonl").write_text((task_dir / "rows.jsonl").read_text().replace("river runs", "lamp glows"))
    one_line(run(tiny, *args, "--resume", out=tmp_path / "out"), "documents")


# --- unreadable inputs ---------------------------------------------------------------------------------


def test_damaged_weights_and_an_impossible_stream_are_one_line(tiny, tmp_path):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny.model, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    one_line(
        run(tiny, "ppl", "--model", damaged, "--lengths", "2x", "--num-docs", "1", out=tmp_path / "out"), "damaged"
    )
    one_line(run(tiny, "stream", "--stream-tokens", "2000000000000", out=tmp_path / "out"), "--stream-tokens")
    assert not (tmp_path / "out").exists()


# --- write failures ------------------------------------------------------------------------------------


def test_a_failed_plot_or_summary_leaves_no_complete_folder(tiny, tmp_path, monkeypatch):
    import errno

    from lminf_eval.tasks.ppl import Perplexity

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Perplexity, "plots", full)
    one_line(run(tiny, *PPL, out=tmp_path), "No space left", mid_run=True)
    assert not (tmp_path / "results.json").exists() and len(samples(tmp_path)) == 4  # the cells are kept
    monkeypatch.undo()
    assert run(tiny, *PPL, "--resume", out=tmp_path).exit_code == 0
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "complete"


def test_an_unwritable_fingerprint_on_resume_is_one_line(tiny, tmp_path, monkeypatch):
    assert run(tiny, *PPL, out=tmp_path).exit_code == 0
    original = Path.write_text

    def read_only(self, *args, **kwargs):
        if self.name.startswith("run.json"):
            raise OSError(30, "Read-only file system")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", read_only)
    one_line(run(tiny, *PPL, "--resume", out=tmp_path), "Read-only file system")


# --- report on hand-edited results ---------------------------------------------------------------------

EDITS = {
    "no command": lambda d: d.pop("command"),
    "no config.model": lambda d: d["config"].pop("model"),
    "config a list": lambda d: d.__setitem__("config", [1, 2]),
    "tables a string": lambda d: d.__setitem__("tables", "x"),
    "cells a number": lambda d: d.__setitem__("cells", 3),
    "metrics a list": lambda d: d.__setitem__("metrics", [1]),
    "a table row too short": lambda d: next(iter(d["tables"].values()))["data"].append([1]),
    "a table not an object": lambda d: d["tables"].__setitem__("ppl", 5),
    "status missing": lambda d: d.pop("status"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_report_on_a_hand_edited_results_json_is_one_line(tiny, tmp_path_factory, edit):
    out = tmp_path_factory.getbasetemp() / "report-source"
    if not (out / "results.json").exists():
        assert run(tiny, *PPL, out=out).exit_code == 0
    data = json.loads((out / "results.json").read_text())
    EDITS[edit](data)
    folder = tmp_path_factory.mktemp("edited")
    (folder / "results.json").write_text(json.dumps(data))
    one_line(runner.invoke(app, ["report", str(folder)]), "results.json")
