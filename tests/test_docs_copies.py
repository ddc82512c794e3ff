"""The pages in docs/ are copies of README sections (until the docs site sources them): they
must not drift. Each page starts with the heading of the section(s) it copies."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs").glob("readme-*.md"))


def _sections() -> dict[str, str]:
    parts = re.split(r"(?m)^(?=## )", (ROOT / "README.md").read_text())
    return {part.splitlines()[0]: part for part in parts if part.startswith("## ")}


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_each_docs_page_is_the_readme_section_it_copies(page: Path) -> None:
    sections = _sections()
    text = page.read_text()
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    expected = "".join(sections[heading] for heading in headings)
    assert text.rstrip() == expected.rstrip(), (
        f"{page.name} differs from the README's {headings}: copy the README section(s) over it"
    )
