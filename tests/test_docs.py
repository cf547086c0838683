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


ROW = re.compile(
    r"^\| (\d+\.\d+\.\d+)\S* \| .*? \| (\d+) passed, (\d+) failed, \d+ skipped \| (\w+)", flags=re.M
)


def test_the_side_environment_row_is_what_the_range_check_reads():
    """tools/test_torch.py prints the rows of docs/versions.md; the check below parses them."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("test_torch_tool", ROOT / "tools" / "test_torch.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    versions = {"torch": "2.11.0+cu130", "triton": "3.6.0", "numpy": "2.4.6", "python": "3.11.7"}
    suite = {"passed": 814, "failures": 0, "errors": 1, "skipped": 149}
    row = tool.table_row(
        {"versions": versions, "suite": suite, "dry_run_rc": 0, "date": "2026-12-07", "commit": "abc"}
    )
    assert ROW.findall(row) == [("2.11.0", "814", "1", "passed")], row


def test_declared_torch_range_is_the_tested_range():
    """pyproject's torch requirement spans the releases docs/versions.md records: its floor is the
    oldest that passes, its cap the minor release after the newest tested, and every tested
    release with failures has a note that names them."""
    spec = re.search(r'"torch>=([\d.]+),<([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    assert spec, "pyproject.toml: expected a dependency torch>=A,<B"
    floor, cap = (tuple(int(x) for x in v.split(".")) for v in spec.groups())
    text = (ROOT / "docs" / "versions.md").read_text()
    rows = ROW.findall(text)
    tested = sorted(tuple(int(x) for x in v.split(".")) for v, *_ in rows)
    passing = sorted(
        tuple(int(x) for x in v.split(".")) for v, _, failed, dry in rows if failed == "0" and dry == "passed"
    )
    assert passing, "docs/versions.md: no passing row"
    assert passing[0][:2] == floor[:2], (passing, floor)
    assert cap[:2] == (tested[-1][0], tested[-1][1] + 1), (tested, cap)
    for v, _, failed, dry in rows:
        if failed != "0" or dry != "passed":
            major_minor = ".".join(v.split(".")[:2])
            note = re.search(
                rf"^- \*\*torch {re.escape(major_minor)}\*\*(.*?)(?=^- |\Z)", text, flags=re.M | re.S
            )
            assert note and "fail" in note.group(1), f"docs/versions.md: no note naming torch {v}'s failures"
