"""The docs stay true to the tree: every relative link in a Markdown file resolves inside the repository (and
to a heading, when it names one), and the README stays a front door."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def markdown_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / line for line in out.splitlines()] or sorted(ROOT.glob("*.md"))


def anchors(file: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for line in file.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
    return out


def test_every_relative_link_resolves_inside_the_repository():
    bad = []
    for file in markdown_files():
        for target in LINK.findall(file.read_text()):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, fragment = target.partition("#")
            dest = (file.parent / path).resolve() if path else file
            if not dest.is_relative_to(ROOT) or not dest.exists():
                bad.append(f"{file.relative_to(ROOT)}: {target}")
            elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
                bad.append(f"{file.relative_to(ROOT)}: {target} (no such heading)")
    assert not bad, bad


def test_the_readme_is_a_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert "make demo" in readme and "make test" in readme
    for doc in ("cli", "library", "method", "methods", "architecture", "results", "limits"):
        assert f"docs/{doc}.md" in readme
