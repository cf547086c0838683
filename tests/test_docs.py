"""The documentation the code cites is in the repository: every "docs/design.md §n" names a
section that exists, no citation points outside the repository, and the README's links resolve."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXT = (".py", ".md", ".h", ".cpp", ".cu", ".cuh", ".toml", ".cfg", ".txt")


def _tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        names = out.splitlines()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    files = [ROOT / n for n in names if n.endswith(TEXT) or Path(n).name in ("Makefile",)]
    return [f for f in files if f.is_file()] + [ROOT / "tests" / "test_docs.py"]


def _design_sections() -> set[int]:
    text = (ROOT / "docs" / "design.md").read_text()
    return {int(m) for m in re.findall(r"^## (\d+)\. ", text, flags=re.M)}


def test_every_design_citation_names_an_existing_section():
    sections = _design_sections()
    assert sections == set(range(1, max(sections) + 1)), sections
    cited = 0
    for path in _tracked_text_files():
        text = path.read_text(errors="replace")
        for m in re.finditer(r"docs/design\.md(?:#[\w-]+)?\)?\s*§(\d+)(?:\s*[–-]\s*§(\d+))?", text):
            for n in filter(None, m.groups()):
                cited += 1
                assert int(n) in sections, f"{path.relative_to(ROOT)} cites docs/design.md §{n}"
    assert cited >= 20  # the code, tests and README cite the design throughout


def test_no_citation_of_a_document_outside_the_repository():
    pattern = re.compile(r"DESIGN(\.md)? ?§|shared/DESIGN|STYLE\.md")
    offenders = [
        str(p.relative_to(ROOT))
        for p in _tracked_text_files()
        if p.name != "test_docs.py" and pattern.search(p.read_text(errors="replace"))
    ]
    assert offenders == []


def test_readme_is_the_front_door_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for heading in ("## Quick start", "## API", "## Backends", "## On a GPU machine", "## Benchmarks"):
        assert heading in readme, heading
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), target
