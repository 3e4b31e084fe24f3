"""Resolve a `--dataset` value (registry name, hub id, or local .jsonl/.txt/directory) to tokenized documents."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .models import hub_reachable, shipped


@dataclass(frozen=True)
class DatasetEntry:
    kind: str  # "hub" | "local"
    target: str  # hub id, or a path under the repo
    split: str = "test"
    text_field: str = "text"
    subset: str | None = None
    note: str = ""
    revision: str | None = None  # "refs/convert/parquet": the hub's own parquet export of a script dataset


# The paper's corpora as maintained parquet datasets on the hub, streamed (a run reads its first documents,
# never a whole corpus); no loading scripts, which `datasets` no longer runs.
DATASETS: dict[str, DatasetEntry] = {
    "pg19": DatasetEntry("hub", "emozilla/pg19", "test", "text", note="PG-19 books (Project Gutenberg)"),
    "arxiv": DatasetEntry(
        "hub", "ccdv/arxiv-summarization", "test", "article", "document", note="ArXiv papers (paper: Pile ArXiv)"
    ),
    "openwebtext2": DatasetEntry(
        "hub",
        "Skylion007/openwebtext",
        "train",
        "text",
        "plain_text",
        "OpenWebText (paper: Pile OWT2)",
        "refs/convert/parquet",
    ),
    "proof-pile": DatasetEntry(
        "hub",
        "hoskinson-center/proof-pile",
        "test",
        "text",
        note="math papers and formal proofs",
        revision="refs/convert/parquet",
    ),
    # shipped offline stand-ins (scripts/build_samples.py); documents never seen by the tiny models
    "arxiv-sample": DatasetEntry("local", "data/arxiv-sample/eval", note="LaTeX manuals and papers (TeX Live docs)"),
    "web-sample": DatasetEntry("local", "data/web-sample/eval", note="technical prose (Debian, GNU, Jargon File)"),
}


@dataclass
class Document:
    id: str
    ids: list[int]  # token ids, truncated to the longest length the run needs


def _local_texts(path: Path, text_field: str):
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl")) if path.is_dir() else [path]
    for file in files:
        if file.suffix == ".jsonl":
            with file.open(encoding="utf-8") as fh:
                for n, line in enumerate(fh):
                    if line.strip():
                        try:
                            record = json.loads(line)
                        except json.JSONDecodeError:
                            raise UserError(f"{file}:{n + 1} is not valid JSON: fix or remove that line") from None
                        if not isinstance(record, dict) or text_field not in record:
                            raise UserError(f"{file}:{n + 1} has no field {text_field!r}: pass --text-field")
                        if not isinstance(record[text_field], str):
                            raise UserError(f"{file}:{n + 1}: field {text_field!r} is not text")
                        yield f"{file.stem}:{n}", record[text_field]
        else:
            yield file.stem, file.read_text(encoding="utf-8", errors="replace")


def _require_hub(name: str) -> None:
    if not hub_reachable():
        raise UserError(
            f"dataset {name!r} needs the Hugging Face hub, which this machine cannot reach: "
            "pass a local .jsonl/.txt file or directory (or a shipped sample: arxiv-sample, web-sample)"
        )


def _hub_texts(entry: DatasetEntry, name: str):
    _require_hub(name)
    import datasets

    try:
        stream = datasets.load_dataset(
            entry.target, entry.subset, split=entry.split, streaming=True, revision=entry.revision
        )
    except Exception as err:  # the hub answers in many ways; all mean the same to the user
        raise UserError(
            f"cannot open hub dataset {entry.target!r}: {type(err).__name__}: {err}".splitlines()[0]
        ) from None
    for n, record in enumerate(stream):
        if entry.text_field not in record:
            raise UserError(f"hub dataset {entry.target!r} has no field {entry.text_field!r}: pass --text-field")
        yield f"{n}", record[entry.text_field]


def resolve_dataset(name: str, text_field: str | None = None, split: str | None = None) -> DatasetEntry:
    entry = DATASETS.get(name)
    if entry is None:
        path = Path(name)
        if path.exists():
            entry = DatasetEntry("local", str(path.resolve()))
        elif "/" in name and not name.startswith((".", "/")) and not path.suffix:
            entry = DatasetEntry("hub", name, split or "test")
        else:
            raise UserError(
                f"unknown dataset {name!r}: use a registry name ({', '.join(DATASETS)}), "
                "a local .jsonl/.txt file or directory, or a hub id like org/name"
            )
    overrides = {k: v for k, v in (("text_field", text_field), ("split", split)) if v}
    return DatasetEntry(**{**entry.__dict__, **overrides})


def check_dataset(name: str, text_field: str | None = None, split: str | None = None) -> None:
    """Fail before a model loads: unknown names, unbuilt samples, or a hub dataset on an offline machine."""
    entry = resolve_dataset(name, text_field, split)
    if entry.kind == "hub":
        _require_hub(name)
    else:
        iter_texts(name, entry)


def iter_texts(name: str, entry: DatasetEntry):
    if entry.kind == "hub":
        return _hub_texts(entry, name)
    path = Path(entry.target)
    path = path if path.is_absolute() else shipped(str(path))
    if not path.exists():
        raise UserError(f"dataset {name!r} is not built: run `make data` (expected {path})")
    return _local_texts(path, entry.text_field)


def load_documents(
    name: str,
    tokenizer,
    num_docs: int | None,
    min_tokens: int,
    max_tokens: int,
    text_field: str | None = None,
    split: str | None = None,
) -> list[Document]:
    """The first `num_docs` documents (None: all) with at least `min_tokens` tokens, truncated to `max_tokens`;
    fewer than asked is an error, so a run never reports a number of documents it did not read."""
    entry = resolve_dataset(name, text_field, split)
    tokenizer.model_max_length = 1 << 30  # documents are long on purpose
    docs, longest, seen = [], 0, 0
    for doc_id, text in iter_texts(name, entry):
        seen += 1
        ids = tokenizer(text, add_special_tokens=True).input_ids
        longest = max(longest, len(ids))
        if len(ids) >= min_tokens:
            docs.append(Document(doc_id, ids[:max_tokens]))
            if num_docs is not None and len(docs) >= num_docs:
                break
    if not docs:
        raise UserError(
            f"no document in {name!r} reaches {min_tokens} tokens (longest of {seen}: {longest}): "
            "lower --lengths or --min-tokens"
        )
    if num_docs is not None and len(docs) < num_docs:
        raise UserError(
            f"--num-docs {num_docs}: only {len(docs)} of the {seen} documents in {name!r} reach {min_tokens} "
            f"tokens: pass --num-docs {len(docs)} or lower --lengths"
        )
    return docs
