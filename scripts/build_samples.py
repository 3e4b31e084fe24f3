"""Rebuild the shipped corpora `arxiv-sample` and `web-sample` from Debian packages (provenance reproducible).

    python scripts/build_samples.py [--debs DIR] [--out data]

- arxiv-sample: LaTeX sources of manuals and papers in TeX Live doc packages and pari-doc (mostly LPPL).
- web-sample: technical prose: the Jargon File (public domain), Debian Reference (GPL-2+), the Debian
  Administrator's Handbook (GPL-2+ or CC-BY-SA-3.0), Python 3.11 library docs (PSF), Bash manual (GFDL/GPL).
Each eval document is the first EVAL_TOKENS SmolLM2 tokens of one source document (10 per corpus, from at
least 4 packages); the train split (for the tiny models) holds other documents only. Every file's package,
version, original path and licence go into SOURCES.md beside it.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html.parser
import re
import shutil
import subprocess
import sys
import tempfile
from itertools import zip_longest
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LATEX_DEBS = [
    "texlive-latex-base-doc",
    "texlive-latex-recommended-doc",
    "texlive-science-doc",
    "texlive-humanities-doc",
    "pari-doc",
]
WEB_DEBS = ["jargon-text", "debian-reference-en", "debian-handbook", "python3.11-doc", "bash-doc"]
EVAL_TOKENS = 33_000  # 32k for perplexity, plus room for a 100-token continuation after 16k+ prefixes
EVAL_DOCS = 10
TRAIN_BYTES = 2_400_000  # per corpus


class TextOfHtml(html.parser.HTMLParser):
    """Visible text of an HTML page, one line per block element."""

    BLOCK = {"p", "div", "br", "li", "tr", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "dt", "dd", "table", "section"}
    SKIP = {"script", "style", "head", "nav"}

    def __init__(self):
        super().__init__()
        self.parts, self.skip = [], 0

    def handle_starttag(self, tag, attrs):
        self.skip += tag in self.SKIP
        if tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        self.skip -= tag in self.SKIP and self.skip > 0
        if tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)

    def text(self) -> str:
        lines = (re.sub(r"[ \t\r\f\v]+", " ", line).strip() for line in "".join(self.parts).split("\n"))
        return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def html_text(raw: str) -> str:
    parser = TextOfHtml()
    parser.feed(raw)
    return parser.text()


def read(path: Path) -> str:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return data.decode("utf-8", errors="replace")


def fetch(debs: list[str], cache: Path) -> dict[str, tuple[str, Path]]:
    """deb name -> (version, extracted root); downloads with apt-get only what the cache lacks."""
    cache.mkdir(parents=True, exist_ok=True)
    missing = [d for d in debs if not list(cache.glob(f"{d}_*.deb"))]
    if missing:
        subprocess.run(["apt-get", "download", *missing], cwd=cache, check=True)
    out = {}
    for deb in debs:
        file = sorted(cache.glob(f"{deb}_*.deb"))[-1]
        root = cache / "x" / deb
        if not root.exists():
            subprocess.run(["dpkg", "-x", str(file), str(root)], check=True)
        out[deb] = (file.name.split("_")[1], root)
    return out


def texlive_licences(roots: dict) -> dict[str, str]:
    """TeX Live package -> licence, from the Licenses files Debian ships with each doc package."""
    lic = {}
    for _, root in roots.values():
        for file in root.glob("usr/share/doc/*/Licenses.gz"):
            for line in read(file).splitlines():
                m = re.match(r"^([A-Za-z0-9_.-]+): (.+)$", line)
                if m:
                    lic[m.group(1)] = m.group(2).strip()
    return lic


def latex_documents(roots: dict) -> list[dict]:
    lic = texlive_licences(roots)
    docs = []
    for deb, (version, root) in roots.items():
        for path in sorted(root.rglob("*")):
            name = path.name.removesuffix(".gz")
            if not path.is_file() or not name.endswith((".tex", ".dtx", ".ltx")):
                continue
            rel = path.relative_to(root)
            if deb == "pari-doc":
                package, licence = "pari", "GPL-2+ (pari-doc copyright)"
            else:
                parts = rel.parts
                package = parts[parts.index("texlive-doc") + 2] if "texlive-doc" in parts else rel.parts[-2]
                licence = lic.get(package, "see the package's Licenses file (TeX Live: mostly LPPL)")
            docs.append(
                {
                    "deb": deb,
                    "version": version,
                    "path": "/" + str(rel),
                    "package": package,
                    "licence": licence,
                    "text": read(path),
                }
            )
    return docs


def web_documents(roots: dict) -> list[dict]:
    """One long text per source (pages concatenated in order), to be cut into documents."""

    def pages(deb, pattern):
        version, root = roots[deb]
        return version, sorted(root.glob(pattern))

    sources = [
        ("jargon-text", "usr/share/doc/jargon-text/jargon.txt.gz", "public domain", False),
        ("debian-reference-en", "usr/share/debian-reference/*.en.html", "GPL-2+", True),
        ("debian-handbook", "usr/share/doc/debian-handbook/html/en-US/*.html", "GPL-2.0+ or CC-BY-SA-3.0", True),
        ("python3.11-doc", "usr/share/doc/python3.11/html/library/*.html", "PSF-2.0", True),
        ("bash-doc", "usr/share/doc/bash-doc/bashref.html", "GFDL-1.3+ (manual), GPL-3+", True),
    ]
    docs = []
    for deb, pattern, licence, is_html in sources:
        version, files = pages(deb, pattern)
        text = "\n\n".join(html_text(read(f)) if is_html else read(f) for f in files)
        root = roots[deb][1]
        where = "/" + str(Path(pattern)) if len(files) != 1 else "/" + str(files[0].relative_to(root))
        docs.append({"deb": deb, "version": version, "path": where, "package": deb, "licence": licence, "text": text})
    return docs


def tokenizer():
    from lminf_eval.harness.models import load_model

    return load_model("smollm2-135m")[1]


def cut(tok, text: str, n_tokens: int) -> list[str]:
    """Split text into pieces of n_tokens tokens (the last, shorter piece dropped)."""
    ids = tok(text, add_special_tokens=False).input_ids
    return [tok.decode(ids[i : i + n_tokens]) for i in range(0, len(ids) - n_tokens + 1, n_tokens)]


def write_corpus(out: Path, title: str, eval_docs: list[dict], train_docs: list[dict]) -> None:
    if out.exists():
        shutil.rmtree(out)
    rows = []
    for split, docs in (("eval", eval_docs), ("train", train_docs)):
        (out / split).mkdir(parents=True)
        for i, d in enumerate(docs):
            name = f"{i:02d}-{re.sub(r'[^A-Za-z0-9]+', '-', d['package']).strip('-')}.txt"
            (out / split / name).write_text(d["text"])
            rows.append(
                f"| {split}/{name} | {d['deb']} {d['version']} | {d['path']} | {d['licence']} | "
                f"{hashlib.sha256(d['text'].encode()).hexdigest()[:12]} |"
            )
    (out / "SOURCES.md").write_text(
        f"# {title}\n\nBuilt by `python scripts/build_samples.py` from Debian bookworm packages. "
        f"Eval documents are the first {EVAL_TOKENS} SmolLM2 tokens of one source document each; the train "
        "split holds other documents only.\n\n| file | Debian package | original path | licence | sha256 |\n"
        "|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--debs", type=Path, default=Path(tempfile.gettempdir()) / "lminf-eval-debs")
    parser.add_argument("--out", type=Path, default=ROOT / "data")
    args = parser.parse_args()
    tok = tokenizer()
    tok.model_max_length = 1 << 30

    roots = fetch(LATEX_DEBS, args.debs)
    latex = sorted(latex_documents(roots), key=lambda d: -len(d["text"]))
    eval_docs, used, rest = [], set(), []
    for d in latex:  # the longest document of each package, until EVAL_DOCS
        pieces = cut(tok, d["text"], EVAL_TOKENS)[:1] if len(eval_docs) < EVAL_DOCS and d["package"] not in used else []
        if pieces:
            eval_docs.append({**d, "text": pieces[0]})
            used.add(d["package"])
        else:
            rest.append(d)
    train, size = [], 0
    for d in sorted(rest, key=lambda d: d["path"]):
        if d["package"] not in used and size + len(d["text"]) <= TRAIN_BYTES and len(d["text"]) > 2000:
            train.append(d)
            size += len(d["text"])
    write_corpus(args.out / "arxiv-sample", "arxiv-sample: LaTeX manuals and papers", eval_docs, train)

    roots = fetch(WEB_DEBS, args.debs)
    eval_docs, spare = [], []
    for d in web_documents(roots):  # two eval pieces per source; later pieces (other text) may train
        pieces = cut(tok, d["text"], EVAL_TOKENS)
        eval_docs += [{**d, "text": p} for p in pieces[:2]]
        spare.append([{**d, "text": p} for p in pieces[2:]])
    train, size = [], 0
    for group in zip_longest(*spare):  # round-robin over sources
        for d in filter(None, group):
            if size + len(d["text"]) <= TRAIN_BYTES:
                train.append(d)
                size += len(d["text"])
    write_corpus(args.out / "web-sample", "web-sample: technical prose", eval_docs, train)


if __name__ == "__main__":
    main()
