"""The hub corpora offline: small parquet fixtures in each dataset's exact schema and repository layout, read
through the very `datasets.load_dataset(..., streaming=True)` call a user's run makes (only the path differs)."""

from __future__ import annotations

from dataclasses import replace

import fixtures
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from lminf_eval.harness import data
from lminf_eval.harness.cli import app

LONG = "The quick brown fox jumps over the lazy dog while the river keeps running to the sea. " * 40
SHORT = "Too short to keep."

# name -> (file in the repository, its columns, the README that declares configs, where there are any)
LAYOUTS = {
    "pg19": ("data/test-00000-of-00001.parquet", {"short_book_title": "s", "publication_date": 1, "url": "s"}, None),
    "arxiv": (
        "document/test-00000-of-00001.parquet",
        {"abstract": "s"},
        "configs:\n- config_name: document\n  data_files:\n  - split: test\n    path: document/test-*\n"
        "- config_name: section\n  data_files:\n  - split: test\n    path: section/test-*\n",
    ),
    # the hub's parquet export (refs/convert/parquet) is laid out config/split/NNNN.parquet; datasets finds its
    # configs from the hub, a local copy declares them
    "openwebtext2": (
        "plain_text/train/0000.parquet",
        {},
        "configs:\n- config_name: plain_text\n  data_files:\n  - split: train\n    path: plain_text/train/*\n",
    ),
    "proof-pile": (
        "default/test/0000.parquet",
        {"meta": "s"},
        "configs:\n- config_name: default\n  data_files:\n  - split: test\n    path: default/test/*\n",
    ),
}


def write_fixture(root, name: str) -> None:
    path, extra, readme = LAYOUTS[name]
    field = data.DATASETS[name].text_field
    texts = [SHORT, LONG, LONG.replace("fox", "cat")]
    columns = {field: texts} | {k: [v if v == 1 else f"{k}-{i}" for i in range(3)] for k, v in extra.items()}
    (root / path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), root / path)
    if readme:
        (root / "README.md").write_text(f"---\n{readme}---\n")


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_hub_corpora_stream_from_parquet_in_their_schema(name, tmp_path, monkeypatch):
    write_fixture(tmp_path, name)
    entry = data.DATASETS[name]
    monkeypatch.setitem(data.DATASETS, name, replace(entry, target=str(tmp_path)))
    monkeypatch.setattr(data, "hub_reachable", lambda: True)
    calls = []
    import datasets

    real = datasets.load_dataset

    def recorded(*args, **kwargs):
        calls.append((args, dict(kwargs)))
        kwargs.pop("revision")  # a hub ref; the local copy has none
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", recorded)
    docs = data.load_documents(name, fixtures.tokenizer(), num_docs=2, min_tokens=50, max_tokens=100)
    assert [len(d.ids) for d in docs] == [100, 100] and docs[0].ids != docs[1].ids  # the short one filtered out
    args, kwargs = calls[0]
    assert args == (str(tmp_path), entry.subset) and kwargs["split"] == entry.split and kwargs["streaming"]
    assert kwargs["revision"] == entry.revision


def test_hub_corpus_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lminf_eval.harness import models

    models.hub_reachable.cache_clear()
    res = CliRunner().invoke(app, ["ppl", "--dataset", "pg19", "--output-dir", str(tmp_path)])
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "cannot reach" in res.stderr and "Traceback" not in res.output
