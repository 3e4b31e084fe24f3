"""Honest intervals: Wilson for accuracies, a seeded bootstrap over documents for perplexity, lm-eval's standard
errors; in results.json, the CSV beside each table, the Markdown tables and `report`."""

from __future__ import annotations

import json

import pytest
from lminf_eval.tasks.base import method_table
from lminf_eval.tasks.lmeval import _with_stderr

from lminf_eval.harness.intervals import Estimate, accuracy, bootstrap_mean, wilson
from lminf_eval.harness.report import build_report
from lminf_eval.harness.schema import Results, Table


def test_wilson_known_values():
    # (successes, trials) -> interval, to 4 decimals (Wilson 1927; e.g. Newcombe 1998, Table I)
    known = {(2, 2): (0.3424, 1.0), (0, 10): (0.0, 0.2775), (5, 10): (0.2366, 0.7634), (81, 263): (0.2553, 0.3662)}
    for (k, n), (lo, hi) in known.items():
        assert wilson(k, n) == pytest.approx((lo, hi), abs=1e-4), (k, n)
    est = accuracy(2, 2)
    assert float(est) == 100.0 and est.lo == pytest.approx(34.24, abs=0.01) and est.hi == 100.0


def test_bootstrap_is_seeded_and_spans_the_documents():
    sums, counts = [2.0, 8.0], [2, 2]  # two documents: mean NLL 1 and 4
    lo, hi = bootstrap_mean(sums, counts, seed=3)
    assert (lo, hi) == bootstrap_mean(sums, counts, seed=3)  # deterministic
    # a resample is {a, a}, {a, b} or {b, b}, each drawn 1000 times with probability 1/4, 1/2, 1/4
    assert lo == pytest.approx(1.0) and hi == pytest.approx(4.0)
    assert bootstrap_mean([5.0], [2]) is None  # one document: no interval
    same = bootstrap_mean([3.0, 3.0, 3.0], [1, 1, 1])
    assert same == pytest.approx((3.0, 3.0))
    # unequal counts: the ratio of sums, not the mean of means
    lo, hi = bootstrap_mean([1.0, 30.0], [1, 10], seed=0)
    assert lo == pytest.approx(1.0) and hi == pytest.approx(3.0)


def test_estimate_is_its_number():
    e = Estimate(12.5, 10.0, 15.0)
    assert e == 12.5 and isinstance(e, float) and e + 1 == 13.5 and type(e + 1) is float
    assert json.loads(json.dumps({"x": e})) == {"x": 12.5} and str(e) == "12.5"
    assert e.scaled(2).lo == 20.0


def test_tables_carry_intervals_to_json_csv_markdown_and_report(tmp_path):
    df = method_table(
        {("vanilla", 4): accuracy(2, 2), ("vanilla", 8): accuracy(0, 10), ("lm-infinite", 4): 50.0},
        ["vanilla", "lm-infinite"],
        [4, 8],
        oom={("lm-infinite", 8)},
    )
    table = Table.from_frame(df)
    assert table.data == [[100.0, 0.0], [50.0, "OOM"]] and table.stderr is None
    assert table.lo[0][0] == pytest.approx(34.24, abs=0.01) and table.lo[1] == [None, None]
    md = table.markdown()
    assert "| vanilla | 100.00 [34.24, 100.00] | 0.00 [0.00, 27.75] |" in md and "| lm-infinite | 50.00 | OOM |" in md
    intervals = table.interval_frame()
    assert list(intervals.columns) == ["4 lo", "4 hi", "8 lo", "8 hi"] and intervals.loc["vanilla", "8 hi"] > 27
    # through results.json and back, then `report`
    results = Results("passkey", "complete", {"model": "m", "dataset": None}, {}, {"passkey_accuracy": table})
    (tmp_path / "results.json").write_text(results.to_json())
    assert Results.from_json((tmp_path / "results.json").read_text()).tables["passkey_accuracy"] == table
    report = build_report([tmp_path])
    assert "### passkey: passkey_accuracy\n" in report and "100.00 [34.24, 100.00]" in report
    # lm-eval's standard error where it gives one; RULER's "N/A" leaves the number alone
    se = _with_stderr("acc,none", 0.5, {"acc,none": 0.5, "acc_stderr,none": 0.05})
    assert Table.from_frame(method_table({("m", "acc"): se}, ["m"], ["acc"])).markdown().endswith("| m | 0.50 ± 0.05 |")
    assert type(_with_stderr("4096,none", 1.0, {"4096_stderr,none": "N/A"})) is float


def test_folders_written_before_intervals_still_read():
    old = {  # results.json as runs before this schema wrote it: tables in pandas' split form, no argv or cells
        "command": "ppl",
        "status": "complete",
        "config": {"model": "tiny-rope", "dataset": "arxiv-sample"},
        "metrics": {"vanilla": {"128": {"ppl": 70.5, "nll": 4.26, "docs": 4}}},
        "tables": {"ppl": {"columns": ["128"], "index": ["vanilla"], "data": [[70.5]]}},
    }
    run = Results.from_dict(old)
    assert run.argv == [] and run.cells.total is None and run.tables["ppl"].lo is None
    assert run.tables["ppl"].markdown() == "| method | 128 |\n|---|---|\n| vanilla | 70.50 |"
    assert run.tables["ppl"].frame().loc["vanilla", "128"] == 70.5
