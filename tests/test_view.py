"""`lminf-eval view`: the page of a tiny run of each task holds its tables (with intervals), plot specs whose
numbers are the run's own (recomputed here from samples.jsonl) and its samples; nothing is fetched from the
network; a folder that is not a result is one line, exit 2. In headless Chromium (skipped without it): no
console error, every plot drawn, a samples filter works. (lm-eval's samples: tests/test_harness.py's RULER run.)"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from fixtures import run
from typer.testing import CliRunner

from lminf_eval.harness.cli import app

runner = CliRunner()


RUNS = {  # folder -> the command's arguments (tiny: L_pre 32, a byte-level tokenizer)
    "ppl": ["ppl", "--lengths", "1x,2x,16x", "--num-docs", "2"],
    "passkey": ["passkey", "--lengths", "32x", "--depths", "0,1", "--num-samples", "1", "--method", "vanilla,truncate"],
    "generate": ["generate", "--lengths", "1x,2x", "--new-tokens", "4", "--num-docs", "1"],
    "timing": ["timing", "--lengths", "1x,2x", "--new-tokens", "2"],
    "stream": ["stream", "--stream-tokens", "200", "--chunk-size", "32", "--method", "lm-infinite"],
    "diagnose": ["diagnose", "--lengths", "4x", "--method", "vanilla"],
}


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """One tiny run of each task in one profile-like folder."""
    root = tmp_path_factory.mktemp("view")
    profile = root / "profile"
    for name, args in RUNS.items():
        res = run(tiny, *args, out=profile / name)
        assert res.exit_code == 0, res.output
    return profile


class Page(HTMLParser):
    """What a test reads of a page: tables (by data-table), plot specs, sample rows, every script/link source."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.specs: list[dict] = []
        self.samples: list[dict] = []  # one per browser row: its data-* and cell texts
        self.sources: list[str] = []
        self.plot_divs = 0
        self._table, self._row, self._cell, self._spec, self._sample = None, None, None, None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("script", "link", "img", "iframe") and (a.get("src") or a.get("href")):
            self.sources.append(a.get("src") or a.get("href"))
        if tag == "script" and "spec" in (a.get("class") or ""):
            self._spec = []
        if tag == "div" and a.get("class") == "plot":
            self.plot_divs += 1
        if tag == "table" and "data-table" in a:
            self._table = self.tables.setdefault(a["data-table"], [])
        if tag == "tr":
            self._row = []
            self._sample = {k[5:]: v for k, v in a.items() if k.startswith("data-")} if "data-method" in a else None
        if tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_data(self, data):
        if self._spec is not None:
            self._spec.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag):
        if tag == "script" and self._spec is not None:
            self.specs.append(json.loads("".join(self._spec)))
            self._spec = None
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell))
            self._cell = None
        if tag == "tr" and self._row is not None:
            if self._sample is not None:
                self.samples.append({**self._sample, "cells": self._row})
            elif self._table is not None:
                self._table.append(self._row)
            self._row = None
        if tag == "table":
            self._table = None


def page_of(folder: Path, tmp_path: Path) -> Page:
    out = tmp_path / f"{folder.name}.html"
    res = runner.invoke(app, ["view", str(folder), "--output", str(out)])
    assert res.exit_code == 0, res.output
    return Page(out.read_text())


def rows_of(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]


def traces(page: Page, kind: str) -> list[dict]:
    return [t for spec in page.specs for t in spec["data"] if t["type"] == kind]


def close(a, b) -> bool:
    return a is None and b is None or (a is not None and b is not None and math.isclose(a, b, rel_tol=1e-3))


def test_ppl_page_holds_tables_with_intervals_and_the_runs_own_curves(runs, tmp_path):
    page = page_of(runs / "ppl", tmp_path)
    results = json.loads((runs / "ppl" / "results.json").read_text())
    assert set(page.tables) == {"ppl", "nll"}
    header, *body = page.tables["ppl"]
    assert header == ["method", *results["tables"]["ppl"]["columns"]] and [r[0] for r in body] == [
        "vanilla",
        "lm-infinite",
    ]
    assert all("[" in cell for row in body for cell in row[1:])  # two documents: a bootstrap interval per cell
    mean, per_doc = page.specs[0], page.specs[1]
    assert [t["name"] for t in mean["data"]] == ["vanilla", "lm-infinite"]
    assert [s["x0"] for s in mean["layout"]["shapes"]] == [32]  # L_pre marked
    # the plotted curve is the mean over documents of samples.jsonl's NLL, averaged per bin of positions
    for trace in mean["data"]:
        docs = [np.array(r["nll"], float) for r in rows_of(runs / "ppl") if r["cell"]["method"] == trace["name"]]
        curve = np.mean(docs, axis=0)  # (both documents reach every position)
        width = math.ceil(len(curve) / 300)
        assert len(trace["y"]) == math.ceil(len(curve) / width)
        for i in (0, len(trace["y"]) // 2, len(trace["y"]) - 1):
            assert close(trace["y"][i], float(curve[i * width : (i + 1) * width].mean()))
            assert close(trace["customdata"][i], math.exp(trace["y"][i]))
    # per-document curves: one trace per (document, method), one document visible at a time
    assert len(per_doc["data"]) == 2 * 2 and [t["visible"] for t in per_doc["data"]] == [True, True, False, False]
    assert not page.samples


def test_passkey_page_holds_heatmaps_and_every_answer(runs, tmp_path):
    page = page_of(runs / "passkey", tmp_path)
    rows = rows_of(runs / "passkey")
    assert {"passkey_accuracy", "passkey_by_depth"} <= set(page.tables)
    heatmaps = traces(page, "heatmap")
    assert len(heatmaps) == 2  # one per method, over depth x length
    for h, method in zip(heatmaps, ("vanilla", "truncate"), strict=True):
        for i, depth in enumerate(h["y"]):
            hits = [r["correct"] for r in rows if r["cell"]["method"] == method and f"{r['cell']['depth']:g}" == depth]
            assert close(h["z"][i][0], 100 * sum(hits) / len(hits)) and h["text"][i][0] == f"{sum(hits)} of {len(hits)}"
    assert len(page.samples) == len(rows) == 2 * 2
    by_key = {(r["cell"]["method"], r["key"]): r for r in rows}
    for s in page.samples:
        length, prompt, expected, method, output, mark = s["cells"]
        r = by_key[method, expected]
        assert (int(length), output, s["correct"]) == (
            r["cell"]["length"],
            r["answer"],
            "yes" if r["correct"] else "no",
        )
        assert mark.startswith("✓" if r["correct"] else "✗") and s["method"] == method


def test_generate_timing_stream_diagnose_pages(runs, tmp_path):
    page = page_of(runs / "generate", tmp_path)
    assert set(page.tables) == {"bleu", "rouge1", "rouge2", "rougeL"}
    rows = rows_of(runs / "generate")
    assert sorted((s["cells"][2], s["cells"][4]) for s in page.samples) == sorted(
        (r["reference"], r["hypothesis"]) for r in rows
    )
    assert {s["length"] for s in page.samples} == {"32", "64"} and all(s["correct"] == "" for s in page.samples)

    page = page_of(runs / "timing", tmp_path)
    assert {"encode_s", "decode_s_per_token", "peak_mem_mb"} <= set(page.tables)
    lines = traces(page, "scatter")
    assert len(lines) == 3 * 2 and all(t["x"] == [32, 64] for t in lines)  # 3 panels x 2 methods, against context
    rows = {(r["cell"]["method"], r["cell"]["length"]): r for r in rows_of(runs / "timing")}
    encode = [t for t in lines if t["xaxis"] == "x"]
    assert all(close(t["y"][j], rows[t["name"], n]["encode_s"]) for t in encode for j, n in enumerate(t["x"]))

    page = page_of(runs / "stream", tmp_path)
    assert set(page.tables) == {"stream_nll", "stream_rss"}
    (row,) = rows_of(runs / "stream")
    nll, memory = traces(page, "scatter")
    assert nll["y"] == [float(f"{v:.4g}") for v in row["window_nll"]] and memory["x"][-1] == 200

    page = page_of(runs / "diagnose", tmp_path)
    assert set(page.tables) == {"diagnose_max_logit", "diagnose_entropy", "diagnose_sink"} and not page.samples


def test_profile_page_has_every_run_overlays_and_no_network(runs, tmp_path):
    (runs / "TABLES.md").write_text("a shell glob over a profile also names its files\n")
    res = runner.invoke(app, ["view", *map(str, sorted(runs.iterdir()))])  # as `view results/paper/default/*`
    assert res.exit_code == 0, res.output
    out = runs / "view.html"  # the default: next to the runs
    assert res.output.strip().startswith(f"view: {out}")
    text = out.read_text()
    page = Page(text)
    index = [t for t in page.tables.values()]  # (the runs' own tables; the index table has no data-table)
    assert len(index) == sum(len(json.loads((runs / n / "results.json").read_text())["tables"]) for n in RUNS)
    assert text.count('<section class="run"') == len(RUNS) and page.plot_divs == len(page.specs)
    assert page.sources == []  # no script, stylesheet or image fetched from anywhere
    assert text.count("<script>") == 2  # plotly.js inlined once, then the page's own script
    # the profile folder stands for its runs
    res = runner.invoke(app, ["view", str(runs), "--output", str(tmp_path / "p.html")])
    assert res.exit_code == 0 and (tmp_path / "p.html").read_text().count('<section class="run"') == len(RUNS)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.mkdir(), "holds no results.json"),
        (lambda p: (p.mkdir(), (p / "results.json").write_text('{"command": ')), "is not a complete results.json"),
        (lambda p: p.write_text("not a folder"), "no results folder among the arguments"),
    ],
)
def test_a_folder_that_is_not_a_result_is_one_line_exit_2(tmp_path, make, message):
    make(tmp_path / "bad")
    res = runner.invoke(app, ["view", str(tmp_path / "bad")])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1 and message in res.output


# --- in a real browser ----------------------------------------------------------------------------------

HOOK = """<script>
window.__errors=[];
window.addEventListener('error',function(e){__errors.push('error: '+e.message);});
window.addEventListener('unhandledrejection',function(e){__errors.push('rejection: '+e.reason);});
(function(){var ce=console.error;console.error=function(){
  __errors.push('console: '+Array.prototype.join.call(arguments,' '));ce.apply(console,arguments);};})();
window.addEventListener('load',function(){setTimeout(function(){
  var plots=document.querySelectorAll('div.plot'),drawn=0,filters=[];
  plots.forEach(function(p){if(p.querySelector('svg.main-svg'))drawn++;});
  document.querySelectorAll('div.samples').forEach(function(box){
    var s=box.querySelector('select[data-filter=method]');s.selectedIndex=1;s.dispatchEvent(new Event('change'));
    var rows=Array.prototype.slice.call(box.querySelectorAll('tbody tr'));
    var shown=rows.filter(function(r){return r.style.display!=='none';});
    filters.push({method:s.value,shown:shown.length,rows:rows.length,text:box.querySelector('.shown').textContent,
      others:shown.filter(function(r){return r.dataset.method!==s.value;}).length});});
  var table=document.querySelector('table[data-table=ppl]'),heads=table.querySelectorAll('thead th');
  var col=heads.length-1,column=function(){return Array.prototype.map.call(table.tBodies[0].rows,
    function(r){return +r.cells[col].dataset.v;});};
  heads[col].click();var up=column();heads[col].click();var down=column();  // (the overall perplexity)
  var remote=performance.getEntriesByType('resource').map(function(r){return r.name;})
    .filter(function(n){return n.indexOf('file:')!==0&&n.indexOf('data:')!==0;});
  var out=document.createElement('pre');out.id='view-check';
  out.textContent=JSON.stringify({errors:__errors,plots:plots.length,drawn:drawn,filters:filters,remote:remote,
    up:up,down:down});
  document.body.appendChild(out);},200);});
</script>"""

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--proxy-server=127.0.0.1:9",  # (the network off: anything the page tried to fetch would fail and show)
]


def chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.mark.skipif(chromium() is None, reason="no Chromium here (Debian: apt-get install chromium, or make browser)")
def test_page_in_headless_chromium(runs, tmp_path):
    res = runner.invoke(app, ["view", str(runs), "--output", str(tmp_path / "page.html")])
    assert res.exit_code == 0, res.output
    checked = tmp_path / "checked.html"
    checked.write_text((tmp_path / "page.html").read_text().replace("<head>", "<head>" + HOOK, 1))
    cmd = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=30000"]
    dom = subprocess.run([*cmd, "--dump-dom", checked.as_uri()], capture_output=True, text=True, timeout=180).stdout
    start = dom.find('<pre id="view-check">')
    assert start >= 0, "the page's load handler never ran: " + dom[-500:]
    check = json.loads(dom[start + 21 : dom.index("</pre>", start)].replace("&quot;", '"').replace("&amp;", "&"))
    assert check["errors"] == [] and check["remote"] == []
    assert check["plots"] == check["drawn"] > 0  # every plot drawn as an SVG
    up, down = check["up"], check["down"]  # a click sorts a column up, the next one down
    assert len(up) == 2 and up == sorted(up) and down == up[::-1] and up[0] < up[1]
    assert len(check["filters"]) == 2  # passkey and generate browsers
    for f in check["filters"]:  # filtering by the first method shows its rows only
        assert 0 < f["shown"] < f["rows"] and f["others"] == 0 and f["text"] == f"{f['shown']} of {f['rows']} shown"
