"""Rebuild the shipped prose haystack `data/haystack/python-howto.txt` from a Debian package.

    python scripts/build_haystack.py [--deb python3.11-doc_*.deb] [--out data/haystack]

RULER's essay haystack (Paul Graham's essays) is not redistributable, so `lminf-eval passkey --haystack essay`
reads essay-like English prose instead: the paragraphs of the Python HOWTOs and tutorial (reST sources in
python3.11-doc, PSF License 2.0), with code blocks, directives, tables and headings removed. These are other
documents than the library pages the `web-sample` corpus holds. Without --deb the package is downloaded
with `apt-get download`.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "python3.11-doc"
SOURCES = "usr/share/doc/python3.11/html/_sources"
DOCS = [
    "howto/functional", "howto/unicode", "howto/sockets", "howto/sorting", "howto/regex", "howto/logging",
    "howto/descriptor", "howto/pyporting", "howto/urllib2", "howto/curses", "howto/argparse",
    "tutorial/appetite", "tutorial/interpreter", "tutorial/introduction", "tutorial/controlflow",
    "tutorial/datastructures", "tutorial/modules", "tutorial/inputoutput", "tutorial/errors",
    "tutorial/classes", "tutorial/stdlib", "tutorial/stdlib2", "tutorial/venv", "tutorial/whatnow",
    "tutorial/floatingpoint",
]  # fmt: skip
LICENCE = """The haystack python-howto.txt holds paragraphs of the Python {version} HOWTOs and tutorial, from the
Debian package {package} {version_deb} ({sources}/{{howto,tutorial}}/*.rst.txt), built by
`python scripts/build_haystack.py`. Copyright (c) 2001-2023 Python Software Foundation; All Rights Reserved.
Licensed under the PSF License Version 2 (https://docs.python.org/3/license.html), which permits
reproduction and derivative works provided this notice is retained. Changes: code blocks, reST directives,
tables and headings removed; inline markup simplified.
"""


def prose(rst: str) -> list[str]:
    """The plain paragraphs of a reST file: no indented blocks (code, directives' bodies), no directives,
    headings, tables or lists of links; inline roles reduced to their text."""
    paragraphs, current = [], []
    for line in rst.splitlines() + [""]:
        if not line.strip() or line.startswith((" ", "\t", "..", ">>>", "|", "+-", "=", "-", "*", "#", ":")):
            if current:
                paragraphs.append(" ".join(current))
            current = []
            continue
        current.append(line.strip())
    out = []
    for p in paragraphs:
        p = re.sub(r":[a-z:]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`", r"\1", p)  # :func:`name` -> name
        p = re.sub(r"`([^`<]*?)\s*<[^>]*>`_+", r"\1", p).replace("``", "").replace("**", "").replace("`", "")
        if len(p) > 80 and p[-1] in ".:?!)" and not p.endswith("::"):  # sentences, not captions or headings
            out.append(p)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deb", type=Path, help=f"{PACKAGE} .deb (default: apt-get download it)")
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "haystack")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        deb = args.deb
        if deb is None:
            subprocess.run(["apt-get", "download", PACKAGE], cwd=tmp, check=True, capture_output=True)
            deb = next(Path(tmp).glob(f"{PACKAGE}_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), f"{tmp}/x"], check=True)
        version_deb = deb.name.split("_")[1]
        text = []
        for doc in DOCS:
            text += prose((Path(tmp) / "x" / SOURCES / f"{doc}.rst.txt").read_text(encoding="utf-8"))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "python-howto.txt").write_text("\n\n".join(text) + "\n")
    (args.out / "LICENSE.md").write_text(
        LICENCE.format(version="3.11", package=PACKAGE, version_deb=version_deb, sources="/" + SOURCES)
    )
    print(f"{len(text)} paragraphs, {sum(map(len, text))} characters -> {args.out}")


if __name__ == "__main__":
    main()
