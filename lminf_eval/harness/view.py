"""`lminf-eval view`: one self-contained HTML page for one or more results folders (or a profile folder), to look
at rather than read: provenance, every table with its intervals (sortable), interactive plots and a samples
browser. Plotly's JavaScript is inlined once and every figure is a JSON spec beside its div, so the page needs no
server and no network; long curves are averaged down to a few hundred points so a whole profile stays small."""

from __future__ import annotations

import html
import json
import math
import os
import shlex
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from .report import corpus, documents, load_run
from .results import RunDir
from .schema import Results, Table, as_typed, format_cell, format_number

MAX_POINTS = 300  # points per curve: a bin of positions averaged per point
DOC_POINTS = 150  # per document curve in the samples browser
TEXT_CHARS = 800  # characters of a generated text or prompt end kept per sample
PAGE_NAME = "view.html"


@dataclass
class Run:
    """One results folder: its typed results.json and its finished cells (samples.jsonl, one row per cell)."""

    path: Path
    name: str
    results: Results
    rows: list[dict]

    @property
    def l_pre(self) -> int | None:
        return self.results.resolved.pretraining_length

    @property
    def labels(self) -> list[str]:
        """The methods in run order (folders written before `resolved` was kept: in the order their cells ran)."""
        resolved = [m.label for m in self.results.resolved.methods]
        return list(dict.fromkeys([*resolved, *(r["cell"]["method"] for r in self.rows)]))


def result_folders(paths: list[Path]) -> list[Path]:
    """The results folders the arguments name: a folder with results.json (or the file itself); a profile folder
    (no results.json, steps inside) stands for its steps. Plain files other than results.json are passed over,
    since a shell glob over a profile folder also names its TABLES.md and PNGs."""
    out = []
    for path in paths:
        if path.is_file() and path.name != "results.json":
            continue
        steps = sorted(p.parent for p in path.glob("*/results.json")) if path.is_dir() else []
        if path.is_dir() and not (path / "results.json").exists() and steps:
            out += [p for p in steps if ".before-" not in p.name]  # (earlier runs a changed profile kept aside)
        else:
            out.append(path)
    if not out:
        raise UserError("no results folder among the arguments: pass folders written by an lminf-eval command")
    return out


def load(path: Path) -> Run:
    """A results folder through the same typed schema as `report`; a folder that is not one is a UserError."""
    results = load_run(path)
    folder = path if path.is_dir() else path.parent
    rows = [r for r in RunDir(folder).read_samples() if r["status"] == "ok"]
    return Run(folder, folder.name, results, rows)


def default_output(paths: list[Path]) -> Path:
    """view.html in the one folder given, or in the common parent of several."""
    if len(paths) == 1 and paths[0].is_dir():
        return paths[0] / PAGE_NAME
    folders = [p if p.is_dir() else p.parent for p in paths]
    common = Path(os.path.commonpath([str(p.resolve()) for p in folders]))
    return (common.relative_to(Path.cwd()) if common.is_relative_to(Path.cwd()) else common) / PAGE_NAME


def write_page(paths: list[Path], output: Path | None = None) -> Path:
    """Build the page for the given folders and write it; returns where."""
    runs = [load(p) for p in result_folders(paths)]
    output = output or default_output(paths)
    text = build_page(runs)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text, encoding="utf-8")
    except OSError as err:
        raise UserError(f"cannot write {output} ({err.strerror}): pass another --output") from None
    return output


# --- numbers and figures ----------------------------------------------------------------------------


def _r(x) -> float | None:
    """A number as JSON keeps it, 4 significant digits (the page's size); None for NaN/inf (a gap)."""
    if x is None:
        return None
    x = float(x)
    return float(f"{x:.4g}") if math.isfinite(x) else None


def _rs(values) -> list[float | None]:
    return [_r(v) for v in values]


def binned(y: np.ndarray, max_points: int, first: int = 1, reduce=np.nanmean) -> tuple[list, list]:
    """(x, y) of a curve over positions first, first+1, ... averaged in equal bins down to `max_points` points;
    x is each bin's middle position."""
    n = len(y)
    width = max(1, math.ceil(n / max_points))
    pad = np.full(math.ceil(n / width) * width, np.nan)
    pad[:n] = y
    bins = pad.reshape(-1, width)
    with warnings.catch_warnings():  # (an all-NaN bin is a gap, not news)
        warnings.simplefilter("ignore", RuntimeWarning)
        values = reduce(bins, axis=1)
    counts = np.minimum(width, n - np.arange(len(bins)) * width)
    x = first + np.arange(len(bins)) * width + (counts - 1) / 2
    return [round(float(v), 1) for v in x], _rs(values)


def figure(data: list, layout: dict) -> dict:
    """A plotly figure as a JSON-able dict, checked by plotly's own validators (its template left out: the
    page's one script styles every figure alike)."""
    import plotly.graph_objects as go

    base = {"margin": {"l": 60, "r": 20, "t": 70, "b": 50}, "height": 400, "hovermode": "closest"}
    fig = go.Figure(data=data, layout={**base, **layout, "template": None})
    spec = json.loads(fig.to_json())
    spec["layout"].pop("template", None)
    return spec


def l_pre_marks(values: list[int]) -> dict:
    """Dashed vertical lines at each pretraining length, labelled."""
    shapes = []
    for v in sorted(set(values)):
        line = {"type": "line", "xref": "x", "yref": "paper", "x0": v, "x1": v, "y0": 0, "y1": 1}
        shapes.append({**line, "line": {"dash": "dash", "color": "#444", "width": 1}})
        shapes[-1]["label"] = {"text": f"L_pre = {v}", "textposition": "end", "font": {"size": 11}}
    return {"shapes": shapes}


AXIS_BUTTONS = [
    {
        "type": "buttons",
        "direction": "right",
        "x": 0,
        "xanchor": "left",
        "y": 1.01,
        "yanchor": "bottom",
        "pad": {"t": 0, "b": 0},
        "buttons": [
            {"label": "linear x", "method": "relayout", "args": [{"xaxis.type": "linear"}]},
            {"label": "log x", "method": "relayout", "args": [{"xaxis.type": "log"}]},
        ],
    }
]


# --- per task: curves, heatmaps, samples ---------------------------------------------------------------


def nll_curves(run: Run) -> dict[str, list[np.ndarray]]:
    """method -> the NLL of each document, target position p at index p-1 (ppl)."""
    out: dict[str, list[np.ndarray]] = {}
    for r in run.rows:
        if "nll" in r:
            out.setdefault(r["cell"]["method"], []).append(np.array(r["nll"], dtype=float))
    return out


def mean_curve(arrays: list[np.ndarray]) -> np.ndarray:
    """The mean over documents at each position, over the documents that reach it."""
    mat = np.full((len(arrays), max(map(len, arrays))), np.nan)
    for i, a in enumerate(arrays):
        mat[i, : len(a)] = a
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(mat, axis=0)


def nll_trace(name: str, y: np.ndarray, points: int = MAX_POINTS, **extra) -> dict:
    x, values = binned(y, points)
    ppl = [None if v is None else _r(math.exp(min(v, 700))) for v in values]
    return {
        "type": "scatter",
        "mode": "lines",
        "name": name,
        "x": x,
        "y": values,
        "customdata": ppl,
        "hovertemplate": "%{fullData.name}<br>position %{x:.0f}<br>NLL %{y:.3f} (perplexity %{customdata:.4g})"
        "<extra></extra>",
        **extra,
    }


def nll_figure(run: Run) -> dict | None:
    curves = nll_curves(run)
    if not curves:
        return None
    n = max(len(a) for arrays in curves.values() for a in arrays)
    width = max(1, math.ceil(n / MAX_POINTS))
    data = [nll_trace(label, mean_curve(arrays)) for label, arrays in curves.items()]
    docs = max(len(a) for a in curves.values())
    layout = {
        "title": {"text": f"NLL against position (mean over {docs} document(s), {width} positions per point)"},
        "xaxis": {"title": {"text": "token position"}},
        "yaxis": {"title": {"text": "NLL"}},
        "updatemenus": AXIS_BUTTONS,
        **(l_pre_marks([run.l_pre]) if run.l_pre else {}),
    }
    return figure(data, layout)


def overlay_figures(runs: list[Run]) -> list[tuple[str, dict]]:
    """NLL against position of the perplexity runs of one model and corpus overlaid, one line per (run, method)."""
    by_corpus: dict[str, list[Run]] = {}
    for run in runs:
        if nll_curves(run):
            by_corpus.setdefault(f"{run.results.model} on {corpus(run.results)}", []).append(run)
    out = []
    for name, group in by_corpus.items():
        if len(group) < 2:
            continue
        colors = _colors(list(dict.fromkeys(label for run in group for label in nll_curves(run))))
        data = [  # a method keeps its colour across runs, a run its dash
            nll_trace(
                f"{run.name} · {label}",
                mean_curve(arrays),
                legendgroup=run.name,
                line={"color": colors[label], "dash": DASHES[i % len(DASHES)], "width": 1.5},
            )
            for i, run in enumerate(group)
            for label, arrays in nll_curves(run).items()
        ]
        layout = {
            "title": {"text": f"NLL against position, {name}: {len(group)} runs overlaid"},
            "xaxis": {"title": {"text": "token position"}},
            "yaxis": {"title": {"text": "NLL"}},
            "height": 520,
            "updatemenus": AXIS_BUTTONS,
            **l_pre_marks([r.l_pre for r in group if r.l_pre]),
        }
        out.append((name, figure(data, layout)))
    return out


def doc_figure(run: Run) -> dict | None:
    """Per-document NLL curves, one document shown at a time (a dropdown picks it)."""
    by_doc: dict[str, dict[str, np.ndarray]] = {}
    for r in run.rows:
        if "nll" in r:
            by_doc.setdefault(str(r["cell"]["doc"]), {})[r["cell"]["method"]] = np.array(r["nll"], dtype=float)
    if not by_doc:
        return None
    data, owner = [], []
    for doc, curves in by_doc.items():
        for label, y in curves.items():
            data.append(nll_trace(label, y, DOC_POINTS, visible=not owner or owner[0] == doc, legendgroup=label))
            owner.append(doc)
    buttons = [{"label": doc, "method": "update", "args": [{"visible": [o == doc for o in owner]}]} for doc in by_doc]
    layout = {
        "title": {"text": "NLL against position, per document"},
        "xaxis": {"title": {"text": "token position"}},
        "yaxis": {"title": {"text": "NLL"}},
        "updatemenus": [{"buttons": buttons, "x": 0, "xanchor": "left", "y": 1.01, "yanchor": "bottom", "active": 0}],
        **(l_pre_marks([run.l_pre]) if run.l_pre else {}),
    }
    return figure(data, layout)


def passkey_variants(rows: list[dict]) -> set[str]:
    """The needle variants a passkey run swept (folders written before --variants hold single ones only)."""
    return {r["cell"]["variant"] if "variant" in r["cell"] else "single" for r in rows}


def passkey_label(cell: dict, variants: set[str]) -> str:
    """The table's row name of a passkey cell: the method, and the variant when several were swept."""
    return cell["method"] + (f" [{cell['variant']}]" if len(variants) > 1 else "")


def depth_of(row: dict) -> str:
    """A passkey cell's depth: the one asked, else (random depth) the one drawn, in fifths."""
    depth = row["cell"]["depth"]
    if depth is not None:
        return f"{depth:g}"
    fifth = min(4, int(row["depth_used"] * 5))
    return f"{fifth / 5:.1f}-{(fifth + 1) / 5:.1f}"


def passkey_figure(run: Run) -> dict | None:
    """Accuracy over length x depth, one heatmap per method (random depths binned in fifths)."""
    from plotly.subplots import make_subplots

    rows = [r for r in run.rows if "correct" in r]
    if not rows:
        return None
    variants = passkey_variants(rows)
    hits: dict[tuple, list[bool]] = {}
    for r in rows:
        key = (passkey_label(r["cell"], variants), depth_of(r), r["cell"]["length"])
        hits.setdefault(key, []).append(bool(r["correct"]))
    labels = list(dict.fromkeys(k[0] for k in hits))
    depths = sorted({k[1] for k in hits})
    lengths = sorted({k[2] for k in hits})
    cols = min(4, len(labels))
    grid = make_subplots(rows=math.ceil(len(labels) / cols), cols=cols, subplot_titles=labels)
    for i, label in enumerate(labels):
        z = [[_r(100 * np.mean(hits[label, d, n])) if (label, d, n) in hits else None for n in lengths] for d in depths]
        text = [
            [f"{sum(hits[label, d, n])} of {len(hits[label, d, n])}" if (label, d, n) in hits else "" for n in lengths]
            for d in depths
        ]
        grid.add_trace(
            {
                "type": "heatmap",
                "x": [str(n) for n in lengths],
                "y": depths,
                "z": z,
                "text": text,
                "zmin": 0,
                "zmax": 100,
                "coloraxis": "coloraxis",
                "hovertemplate": f"{label}<br>length %{{x}}, depth %{{y}}<br>accuracy %{{z:.0f}}% "
                "(%{text} correct)<extra></extra>",
            },
            row=i // cols + 1,
            col=i % cols + 1,
        )
    grid.update_xaxes(type="category", title_text="length")
    grid.update_yaxes(type="category", title_text="depth")
    layout = json.loads(grid.layout.to_json())
    layout.pop("template", None)
    layout.update(
        title={
            "text": "Passkey accuracy (%) over length x depth"
            + ("" if rows[0]["cell"]["depth"] is not None else " (drawn depths in fifths)")
        },
        coloraxis={"cmin": 0, "cmax": 100, "colorscale": "Viridis", "colorbar": {"title": {"text": "%"}}},
        height=max(300, 260 * math.ceil(len(labels) / cols)),
    )
    return figure(list(grid.data), layout)


def heatmap(table: Table, title: str) -> dict | None:
    """A table whose columns are lengths (RULER scores) as a method x length heatmap."""
    at = [j for j, c in enumerate(table.columns) if c.isdigit()]
    if not at:
        return None
    z = [[_r(row[j]) if isinstance(row[j], (int, float)) else None for j in at] for row in table.data]
    top = max((v for row in z for v in row if v is not None), default=1)
    trace = {
        "type": "heatmap",
        "x": [table.columns[j] for j in at],
        "y": table.index,
        "z": z,
        "colorscale": "Viridis",
        "zmin": 0,
        "zmax": 1 if top <= 1 else 100 if top <= 100 else top,  # (lm-eval scores: shares, or percentages)
        "hovertemplate": "%{y}<br>length %{x}<br>%{z:.3g}<extra></extra>",
    }
    layout = {
        "title": {"text": title},
        "xaxis": {"title": {"text": "length"}, "type": "category"},
        "yaxis": {"autorange": "reversed"},
        "height": max(260, 60 + 40 * len(table.index)),
        "margin": {"l": 200, "r": 20, "t": 40, "b": 50},
    }
    return figure([trace], layout)


def timing_figure(run: Run) -> dict | None:
    """Encoding time, decoding time per token and peak memory against context length, one line per method."""
    from plotly.subplots import make_subplots

    names = {"encode_s": "encode (s)", "decode_s_per_token": "decode (s / token)", "peak_mem_mb": "peak memory (MB)"}
    names = {k: v for k, v in names.items() if k in run.results.tables}
    if not names:
        return None
    grid = make_subplots(rows=1, cols=len(names), subplot_titles=list(names.values()))
    colors = _colors(run.results.tables[next(iter(names))].index)
    for j, key in enumerate(names):
        table = run.results.tables[key]
        x = [int(c) for c in table.columns]
        for i, label in enumerate(table.index):
            y = [v if isinstance(v, (int, float)) else None for v in table.data[i]]
            grid.add_trace(
                {
                    "type": "scatter",
                    "mode": "lines+markers",
                    "name": label,
                    "x": x,
                    "y": _rs(y),
                    "legendgroup": label,
                    "showlegend": j == 0,
                    "line": {"color": colors[label]},
                    "hovertemplate": f"{label}<br>context %{{x}}<br>{names[key]} %{{y:.4g}}<extra></extra>",
                },
                row=1,
                col=j + 1,
            )
        grid.update_xaxes(title_text="context (tokens)", row=1, col=j + 1)
        grid.update_yaxes(rangemode="tozero", row=1, col=j + 1)
    layout = json.loads(grid.layout.to_json())
    layout.pop("template", None)
    layout["title"] = {"text": "Speed and memory against context"}
    return figure(list(grid.data), layout)


def stream_figure(run: Run) -> dict | None:
    """The stream's NLL per window and resident memory against tokens read, one line per method."""
    from plotly.subplots import make_subplots

    rows = [r for r in run.rows if "window_nll" in r]
    if not rows:
        return None
    grid = make_subplots(rows=1, cols=2, subplot_titles=["NLL per window", "resident memory (MB)"])
    colors = _colors([r["cell"]["method"] for r in rows])
    for r in rows:
        label, step = r["cell"]["method"], r["window_tokens"]
        y = np.array([np.nan if v is None else v for v in r["window_nll"]], dtype=float)
        x, values = binned(y, MAX_POINTS, first=0)
        x = [round(step * (v + 0.5), 1) for v in x]  # (window i covers tokens i*step .. (i+1)*step)
        style = {"legendgroup": label, "line": {"color": colors[label]}, "mode": "lines", "type": "scatter"}
        grid.add_trace(
            {
                **style,
                "name": label,
                "x": x,
                "y": values,
                "hovertemplate": f"{label}<br>tokens %{{x:,.0f}}<br>NLL %{{y:.3f}}<extra></extra>",
            },
            row=1,
            col=1,
        )
        mem = np.array([m for _, m in r["rss_mb"]], dtype=float)
        _, peak = binned(mem, MAX_POINTS, reduce=np.nanmax)  # (the most each bin of readings held)
        width = math.ceil(len(mem) / len(peak))
        at = [r["rss_mb"][min(len(mem), (k + 1) * width) - 1][0] for k in range(len(peak))]  # (its last token)
        grid.add_trace(
            {
                **style,
                "name": label,
                "x": at,
                "y": peak,
                "showlegend": False,
                "hovertemplate": f"{label}<br>tokens %{{x:,.0f}}<br>%{{y:.1f}} MB<extra></extra>",
            },
            row=1,
            col=2,
        )
    for j in (1, 2):
        grid.update_xaxes(title_text="tokens into the stream", row=1, col=j)
    grid.update_yaxes(rangemode="tozero", row=1, col=2)
    layout = json.loads(grid.layout.to_json())
    layout.pop("template", None)
    layout["title"] = {"text": "The stream: NLL and memory against tokens"}
    return figure(list(grid.data), layout)


DASHES = ["solid", "dot", "dash", "dashdot", "longdash"]
PALETTE = [  # (D3's category20: twenty methods before a colour comes back)
    *("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"),
    *("#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5"),
]


def _colors(labels: list[str]) -> dict[str, str]:
    return {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(labels)}


@dataclass
class Sample:
    """One row of the samples browser: a prompt (or document position) and one method's output."""

    method: str
    length: int
    prompt: str  # what identifies the prompt: depth, sample number, document
    expected: str
    output: str
    correct: bool | None = None  # None where the task has no right answer (generate)
    score: str = ""


def samples(run: Run) -> list[Sample]:
    """The browser's rows, by what the cells hold: passkey answers, generated continuations, lm-eval's records."""
    return passkey_samples(run) + generate_samples(run) + lm_eval_samples(run)


def passkey_samples(run: Run) -> list[Sample]:
    """Each prompt (length, depth, sample) with its expected value(s), then each method's answer to it."""
    order = {label: i for i, label in enumerate(run.labels)}
    rows = [r for r in run.rows if "answer" in r and "correct" in r]
    rows.sort(key=lambda r: (r["cell"]["length"], r["depth_used"], r["cell"]["sample"], order[r["cell"]["method"]]))
    variants = passkey_variants(rows)
    out = []
    for r in rows:
        c, key = r["cell"], r["key"]
        prompt = f"depth {r['depth_used']:.0%} · sample {c['sample']}"
        prompt += f" · {c['variant']}" if len(variants) > 1 else ""
        several = isinstance(key, list)
        score = f"recall {r['recall']:.0%}" if several else ""
        expected = ", ".join(key) if several else str(key)
        out.append(Sample(passkey_label(c, variants), c["length"], prompt, expected, r["answer"], r["correct"], score))
    return out


def generate_samples(run: Run) -> list[Sample]:
    """Each (document, position): the document's own continuation, then each method's."""
    out = []
    for r in run.rows:
        if "hypothesis" in r:
            c = r["cell"]
            where = f"{c['doc']} from token {c['position']}"
            out.append(
                Sample(c["method"], c["position"], where, r["reference"][:TEXT_CHARS], r["hypothesis"][:TEXT_CHARS])
            )
    return sorted(out, key=lambda s: (s.length, s.prompt))


def lm_eval_samples(run: Run) -> list[Sample]:
    """lm-eval's own per-sample records (lm-eval-samples/METHOD__TASK[__LENGTH].jsonl, kept by --log-samples):
    the end of the prompt (the question), the target, the filtered answer and the sample's score (correct when
    it is full marks; RULER scores a sample under its length)."""
    from ..tasks.base import slug

    by_slug = {slug(label): label for label in run.labels}
    out = []
    for file in sorted((run.path / "lm-eval-samples").glob("*.jsonl")):
        method, task, *rest = file.stem.split("__")
        length = int(rest[0]) if rest and rest[0].isdigit() else 0
        for line in file.read_text().splitlines():
            record = json.loads(line)
            names = [m for m in record["metrics"] if isinstance(record[m], (int, float))]
            names = [str(length)] if str(length) in names else names
            score = float(record[names[0]]) if names else None
            target = record["target"]
            expected = ", ".join(map(str, target)) if isinstance(target, list) else str(target)
            answer = record["filtered_resps"][0] if record["filtered_resps"] else ""
            question = str(record["arguments"][0][0])[-TEXT_CHARS // 4 :]
            out.append(
                Sample(
                    by_slug[method],
                    length,
                    f"{task} #{record['doc_id']}: …{question}",
                    expected[:TEXT_CHARS],
                    str(answer)[:TEXT_CHARS],
                    None if score is None else score >= 1,
                    "" if score is None else f"{names[0]} {format_number(score)}",
                )
            )
    order = {label: i for i, label in enumerate(run.labels)}
    return sorted(out, key=lambda s: (s.length, s.prompt, order[s.method]))


# --- HTML ---------------------------------------------------------------------------------------------

e = html.escape


class Page:
    """Figures get ids in page order; each is a div and a JSON spec the page's script draws."""

    def __init__(self):
        self.count = 0

    def plot(self, spec: dict | None) -> str:
        """A figure's div and its spec ("" for no figure)."""
        if spec is None:
            return ""
        self.count += 1
        data = json.dumps(spec, separators=(",", ":")).replace("</", "<\\/")
        pid = f"plot{self.count}"
        spec_tag = f'<script type="application/json" class="spec" data-for="{pid}">{data}</script>'
        return f'<div class="plot" id="{pid}"></div>{spec_tag}'


def table_html(name: str, table: Table, caption: str) -> str:
    head = "".join(f"<th>{e(c)}</th>" for c in [table.index_name or "", *table.columns])
    body = []
    for i, label in enumerate(table.index):
        cells = [f'<th scope="row" data-v="{e(label)}">{e(label)}</th>']
        for j in range(len(table.columns)):
            v = table.data[i][j]
            sort = f' data-v="{v}"' if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
            cells.append(f"<td{sort}>{e(format_cell(*table.cell(i, j)))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f'<table class="sortable" data-table="{e(name)}"><caption>{e(caption)}</caption>'
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    )


def command_line(results: Results) -> str:
    """The command as a user would type it (without where it wrote); older folders kept no argv."""
    if not results.argv:
        return f"lminf-eval {results.command} … (command line not recorded in this folder; flags below)"
    return shlex.join(as_typed(results.argv))


def provenance(run: Run) -> str:
    res = run.results
    cells = res.cells
    planned = f" of {cells.planned}" if cells.planned is not None else ""
    wall = "-" if res.wall_seconds is None else f"{res.wall_seconds:,.0f} s ({res.wall_seconds / 3600:.2f} h)"
    items = [
        ("command", f"<code>{e(command_line(res))}</code>"),
        ("model", e(res.model)),
        ("corpus", e(str(corpus(res) or "- (the task makes its own inputs)"))),
        ("L_pre", e(str(res.resolved.pretraining_length or "-"))),
        ("lengths", e(", ".join(map(str, res.resolved.lengths)) or "-")),
        ("status", e(f"{res.status}, {'?' if cells.total is None else cells.total}{planned} cells, {cells.oom} OOM")),
        ("device", e(res.device or "-")),
        ("wall time", e(wall)),
        ("git", f"<code>{e(res.git or '-')}</code>"),
        ("versions", e(", ".join(f"{k} {v}" for k, v in res.versions.items()) or "-")),
    ]
    dl = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in items)
    methods = "".join(
        f"<tr><th>{e(m.label)}</th><td>{e(_settings(m.settings))}</td></tr>" for m in res.resolved.methods
    )
    config = {k: v for k, v in res.config.items() if k not in ("argv", "output_dir") and v not in (None, [], {})}
    return (
        f'<dl class="prov">{dl}</dl>'
        f'<table class="methods"><caption>methods and their resolved settings</caption>{methods}</table>'
        "<details><summary>every flag (results.json config)</summary>"
        f"<pre>{e(json.dumps(config, indent=1))}</pre></details>"
    )


def _settings(settings: dict | None) -> str:
    if settings is None:
        return "unmodified model"
    return " ".join(f"{k}={v}" for k, v in settings.items()) or "defaults"


def browser(rows: list[Sample], key: str) -> str:
    """The samples table with filters (method, length, correctness) the page's script applies."""
    methods = list(dict.fromkeys(s.method for s in rows))
    lengths = sorted({s.length for s in rows})
    graded = any(s.correct is not None for s in rows)

    def select(name: str, options: list[tuple[str, str]]) -> str:
        opts = "".join(f'<option value="{e(v)}">{e(t)}</option>' for v, t in [("", f"every {name}"), *options])
        return f'<label>{name} <select data-filter="{name}">{opts}</select></label>'

    filters = select("method", [(m, m) for m in methods]) + select("length", [(str(n), str(n)) for n in lengths])
    if graded:
        filters += select("correct", [("yes", "correct"), ("no", "wrong")])
    body = []
    for s in rows:
        mark = {True: "✓", False: "✗", None: ""}[s.correct]
        flag = {True: "yes", False: "no", None: ""}[s.correct]
        body.append(
            f'<tr data-method="{e(s.method)}" data-length="{s.length}" data-correct="{flag}">'
            f"<td>{s.length}</td><td>{e(s.prompt)}</td><td class='text'>{e(s.expected)}</td><td>{e(s.method)}</td>"
            f"<td class='text'>{e(s.output)}</td><td class='mark {flag}'>{mark} {e(s.score)}</td></tr>"
        )
    head = "<th>length</th><th>prompt</th><th>expected</th><th>method</th><th>output</th><th>correct</th>"
    return (
        f'<div class="samples" id="samples-{key}"><div class="filters">{filters} '
        f'<span class="shown">{len(rows)} of {len(rows)} shown</span></div>'
        f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'
    )


def run_section(page: Page, run: Run, key: str) -> str:
    res = run.results
    parts = [f'<section class="run" id="run-{key}"><h2>{e(run.name)}</h2>', provenance(run)]
    source = f" ({corpus(res)})" if corpus(res) else ""
    tables = dict(res.tables)
    docs = documents(res)
    if docs is not None and len({n for row in docs.data for n in row}) > 1:
        tables["docs"] = docs
    parts.append("<h3>Tables</h3>")
    parts.append('<div class="tables">')
    parts += [table_html(name, t, f"{res.command}: {name}{source}") for name, t in tables.items()]
    parts.append("</div>")
    # (by what the folder holds, not by command: older folders ran the stream as `ppl`)
    plots = [page.plot(f(run)) for f in (nll_figure, passkey_figure, timing_figure, stream_figure)]
    if res.command == "lm-eval":
        plots += [page.plot(heatmap(t, f"{name}: score per method and length")) for name, t in res.tables.items()]
    plots = [p for p in plots if p]
    if plots:
        parts += ["<h3>Plots</h3>", *plots]
    curves = page.plot(doc_figure(run))
    if curves:
        parts += ["<h3>Samples: per-document NLL</h3>", curves]
    rows = samples(run)
    if rows:
        parts += [f"<h3>Samples ({len(rows)})</h3>", browser(rows, key)]
    elif res.command == "lm-eval":
        parts.append("<p class='note'>No per-sample records: run with --log-samples to browse lm-eval's samples.</p>")
    parts.append("</section>")
    return "\n".join(parts)


def index_table(runs: list[Run]) -> str:
    rows = []
    for i, run in enumerate(runs):
        res = run.results
        wall = f' data-v="{res.wall_seconds}"' if res.wall_seconds is not None else ""
        rows.append(
            f'<tr><th data-v="{e(run.name)}"><a href="#run-{i}">{e(run.name)}</a></th><td>{e(res.command)}</td>'
            f"<td>{e(res.model)}</td><td>{e(str(corpus(res) or '-'))}</td><td>{e(res.status)}</td>"
            f"<td{wall}>{'-' if res.wall_seconds is None else f'{res.wall_seconds:,.0f} s'}</td></tr>"
        )
    head = "<th>run</th><th>command</th><th>model</th><th>corpus</th><th>status</th><th>wall time</th>"
    return f'<table class="sortable index"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def build_page(runs: list[Run]) -> str:
    import plotly.offline

    page = Page()
    sections = [run_section(page, run, str(i)) for i, run in enumerate(runs)]
    top = ""
    if len(runs) > 1:
        overlays = [page.plot(spec) for _, spec in overlay_figures(runs)]
        top = f"<h2>Runs ({len(runs)})</h2>{index_table(runs)}"
        if overlays:
            top += "<h2>Across runs</h2>" + "".join(overlays)
    title = runs[0].name if len(runs) == 1 else f"{len(runs)} runs"
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>lminf-eval view: {e(title)}</title>'
        f"<style>{CSS}</style><script>{plotly.offline.get_plotlyjs()}</script></head><body>"
        f"<header><h1>lminf-eval view: {e(title)}</h1></header><main>{top}{''.join(sections)}</main>"
        f"<script>{SCRIPT}</script></body></html>"
    )


CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#223;color:#fff;padding:10px 24px}h1{font-size:20px;margin:0}
main{padding:0 24px 40px;max-width:1400px}section.run{border-top:2px solid #ccd;margin-top:28px}
h2{font-size:18px;margin:18px 0 8px}h3{font-size:15px;margin:16px 0 6px;color:#445}
dl.prov{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;margin:6px 0}dt{font-weight:600;color:#556}
dd{margin:0}code{background:#eef;padding:1px 4px;border-radius:3px;word-break:break-all}
table{border-collapse:collapse;margin:8px 0 14px;background:#fff}caption{text-align:left;font-weight:600;padding:4px 0}
th,td{border:1px solid #dde;padding:3px 8px;text-align:right;vertical-align:top}
table.methods td,table.methods th,table.index th,table.index td{text-align:left}
table.sortable thead th{cursor:pointer;background:#eef;user-select:none}
th.asc::after{content:" ▲"}th.desc::after{content:" ▼"}
.tables{display:flex;flex-wrap:wrap;gap:0 28px;align-items:flex-start}
.plot{background:#fff;border:1px solid #dde;margin:8px 0}
.samples td,.samples th{text-align:left}
.samples td.text{white-space:pre-wrap;max-width:420px;font-family:monospace;font-size:12px}
.samples td.text{max-height:8em;overflow:auto}.mark.yes{color:#070}.mark.no{color:#b00}
.filters{margin:6px 0}.filters label{margin-right:14px}.note{color:#666}pre{font-size:12px;background:#fff}
"""

SCRIPT = """
(function(){
  var cfg={responsive:true,displaylogo:false};
  document.querySelectorAll('script.spec').forEach(function(s){
    var spec=JSON.parse(s.textContent);
    Plotly.newPlot(document.getElementById(s.dataset.for),spec.data,spec.layout,cfg);
  });
  document.querySelectorAll('table.sortable thead th').forEach(function(th){
    th.addEventListener('click',function(){
      var table=th.closest('table'),body=table.tBodies[0],col=th.cellIndex;
      var asc=!th.classList.contains('asc');
      table.querySelectorAll('thead th').forEach(function(h){h.classList.remove('asc','desc');});
      th.classList.add(asc?'asc':'desc');
      var key=function(row){var c=row.cells[col];var v=c.dataset.v;
        if(v!==undefined&&v!==''&&!isNaN(+v))return +v;return c.textContent;};
      var rows=Array.prototype.slice.call(body.rows);
      rows.sort(function(a,b){var x=key(a),y=key(b);
        var o=(typeof x==='number'&&typeof y==='number')?x-y:
          String(x).localeCompare(String(y),undefined,{numeric:true});
        return asc?o:-o;});
      rows.forEach(function(r){body.appendChild(r);});
    });
  });
  document.querySelectorAll('div.samples').forEach(function(box){
    var selects=box.querySelectorAll('select[data-filter]'),shown=box.querySelector('.shown');
    var apply=function(){
      var rows=box.querySelectorAll('tbody tr'),n=0;
      rows.forEach(function(r){
        var ok=true;
        selects.forEach(function(s){if(s.value!==''&&r.dataset[s.dataset.filter]!==s.value)ok=false;});
        r.style.display=ok?'':'none';if(ok)n++;
      });
      shown.textContent=n+' of '+rows.length+' shown';
    };
    selects.forEach(function(s){s.addEventListener('change',apply);});
  });
})();
"""
