"""`ppl` reads a length-dependent RoPE (dynamic NTK) once per milestone: its in-window columns are vanilla's,
past L_pre each column comes from a forward of that length, and every other method's numbers are one forward's."""

import json

import pytest
import torch
from fixtures import run
from lminf_eval.tasks.ppl import bucket_span, forward_lengths, token_nll

from lminf_eval.harness.data import load_documents
from lminf_eval.harness.models import load_model
from lminf_eval.methods import applied, parse_method

L_PRE, LENGTHS, BUCKET = 32, [16, 32, 64, 128], 4  # the tiny checkpoint's L_pre; 0.5x..4x; L_pre/8


def rows_of(out):
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return {(r["cell"]["method"], r["cell"]["doc"]): r for r in rows}


@pytest.fixture(scope="module")
def one_forward(tiny):
    """spec -> each document's NLL from one forward of the whole of it, the method on: what `ppl` computed for
    every method before per-length reading existed (rounded as it stores them)."""
    model, tokenizer = load_model(str(tiny.model))
    docs = load_documents(str(tiny.data), tokenizer, 2, max(LENGTHS), max(LENGTHS))

    def read(spec: str) -> dict[str, list]:
        out = {}
        with applied(model, parse_method(spec).settings(L_PRE, max(LENGTHS), {"n_global": 4}), L_PRE):
            for doc in docs:
                out[doc.id] = [round(x, 4) for x in token_nll(model, torch.tensor([doc.ids])).tolist()]
        return out

    return read


def test_forward_lengths_merge_the_milestones_inside_l_pre():
    assert forward_lengths(LENGTHS, 128, L_PRE) == [32, 64, 128]  # 16 and 32 from one forward of 32
    assert forward_lengths([16, 64, 128], 100, L_PRE) == [16, 64, 100]  # 128 not reached; the document itself
    assert forward_lengths([8, 16], 20, L_PRE) == [20]  # all inside L_pre: the document's one forward


@pytest.fixture(scope="module")
def per_length_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("per-length")
    args = ["--lengths", "0.5x,1x,2x,4x", "--num-docs", "2", "--method", "vanilla,dynamic-ntk,yarn,lm-infinite"]
    res = run(tiny, "ppl", *args, out=out)
    assert res.exit_code == 0, res.output
    return out


def test_dynamic_ntk_in_window_is_vanilla_and_past_it_its_own_length(per_length_run, one_forward):
    rows = rows_of(per_length_run)
    whole = one_forward("dynamic-ntk")  # the base of 128 tokens at every position
    for doc in ("doc0", "doc1"):  # (doc1's forward of 32 follows doc0's of 128: the base must not carry over)
        vanilla, dynamic = rows[("vanilla", doc)]["nll"], rows[("dynamic-ntk", doc)]
        assert dynamic["forwards"] == [32, 64, 128] and dynamic["nll"] == whole[doc]
        for length in LENGTHS:
            lo, hi = bucket_span(length, BUCKET)
            own = dynamic["per_length"][str(length)]
            if length <= L_PRE:
                assert own == vanilla[lo:hi]  # exactly vanilla's numbers
            elif length < max(LENGTHS):
                assert own != pytest.approx(whole[doc][lo:hi], abs=1e-3)  # not the one-forward reading
            else:
                assert own == whole[doc][lo:hi]  # the longest milestone is the whole document
    results = json.loads((per_length_run / "results.json").read_text())
    ppl = results["tables"]["ppl"]
    row = {label: values for label, values in zip(ppl["index"], ppl["data"], strict=True)}
    assert row["dynamic-ntk"][:2] == row["vanilla"][:2] and row["dynamic-ntk"][2] != row["vanilla"][2]
    assert results["metrics"]["per_length"] == ["dynamic-ntk"]
    assert json.loads((per_length_run / "run.json").read_text())["fingerprint"]["per_length"] == ["dynamic-ntk"]


@pytest.mark.parametrize("spec", ["vanilla", "yarn", "lm-infinite"])
def test_other_methods_keep_their_one_forward_numbers(per_length_run, one_forward, spec):
    rows = rows_of(per_length_run)
    for doc, nll in one_forward(spec).items():
        assert rows[(spec, doc)]["nll"] == nll and "per_length" not in rows[(spec, doc)]


def test_a_run_from_before_per_length_reading_is_not_resumed_into(tiny, per_length_run, tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    for name in ("samples.jsonl", "run.json"):
        (out / name).write_text((per_length_run / name).read_text())
    recorded = json.loads((out / "run.json").read_text())
    del recorded["fingerprint"]["per_length"]  # as an older version recorded it
    (out / "run.json").write_text(json.dumps(recorded))
    args = ["--lengths", "0.5x,1x,2x,4x", "--num-docs", "2", "--method", "vanilla,dynamic-ntk,yarn,lm-infinite"]
    res = run(tiny, "ppl", *args, "--resume", out=out)
    assert res.exit_code == 2 and "another per_length" in res.output, res.output
    # without a method read per length, the fingerprint is what it was: older runs still resume
    res = run(tiny, "ppl", "--lengths", "1x", "--num-docs", "1", "--method", "vanilla", out=tmp_path / "plain")
    assert res.exit_code == 0, res.output
    assert "per_length" not in json.loads((tmp_path / "plain" / "run.json").read_text())["fingerprint"]
