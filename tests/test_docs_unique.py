"""One source for every text: no paragraph of the README or the docs pages appears in two files.

The README keeps what a newcomer needs on the first screen and links into docs/; the docs pages
hold the manual. A paragraph, a list item or a table row copied from one file into another would
drift (the README once was ~1,200 lines with six pages that were byte copies of its sections).
Code blocks may repeat (the same command is worth showing twice); prose may not. Also checked
here: every public name has an API page in the site's navigation, and the README's links into
docs/ point at pages that exist.
"""

from __future__ import annotations

import importlib.util
import re
from collections import defaultdict
from pathlib import Path

import pytest

import cachedfeatures

ROOT = Path(__file__).resolve().parent.parent
FILES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
MIN_CHARS = 60  # shorter units ("This page is being written.", "| --- |") may repeat


def units(text: str) -> list[str]:
    """The prose of a markdown file: paragraphs, list items and table rows, whitespace-normalised.

    Fenced code blocks and HTML comments are left out; a unit is a run of lines up to a blank
    line, a heading, or the start of the next list item or table row.
    """
    text = re.sub(r"<!--.*?-->", "", text, flags=re.DOTALL)
    found: list[str] = []
    current: list[str] = []
    fence = ""

    def close() -> None:
        if current:
            found.append(" ".join(" ".join(current).split()))
            current.clear()

    for line in text.splitlines():
        stripped = line.strip()
        if fence:
            if stripped.startswith(fence):
                fence = ""
            continue
        opening = re.match(r"(`{3,}|~{3,})", stripped)
        if opening:
            close()
            fence = opening.group(1)
            continue
        if not stripped or stripped.startswith("#"):
            close()
            continue
        if re.match(r"([-*+]|\d+\.)\s|\|", stripped):
            close()
        current.append(stripped)
    close()
    return [unit for unit in found if len(unit) >= MIN_CHARS]


def test_no_paragraph_appears_in_two_files() -> None:
    where: dict[str, set[str]] = defaultdict(set)
    for path in FILES:
        for unit in units(path.read_text()):
            where[unit].add(str(path.relative_to(ROOT)))
    repeated = {unit: sorted(files) for unit, files in where.items() if len(files) > 1}
    assert not repeated, "text copied between files (keep it in one, link from the other):\n" + "\n".join(
        f"  {files}: {unit[:100]}" for unit, files in repeated.items()
    )


def test_units_split_paragraphs_items_and_rows_and_skip_code() -> None:
    text = (
        "# Title\n\nA first paragraph that is long enough to count as a unit of prose,\nover two lines.\n"
        "- an item of a list that is long enough to count as one unit of its own\n"
        "- a second item, also long enough to count as a unit of prose on its own\n\n"
        "```python\nthis_code_line_is_long_enough_to_count_but_it_is_code = 'and never compared'\n```\n"
        "<!-- a comment that is long enough to count but is hidden from the reader -->\n"
        "| a table row that is long enough to count as a unit of prose | yes |\n"
    )
    assert units(text) == [
        "A first paragraph that is long enough to count as a unit of prose, over two lines.",
        "- an item of a list that is long enough to count as one unit of its own",
        "- a second item, also long enough to count as a unit of prose on its own",
        "| a table row that is long enough to count as a unit of prose | yes |",
    ]


def test_every_public_name_has_an_api_page_in_the_navigation() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    for name in cachedfeatures.__all__:
        page = "version" if name == "__version__" else name
        path = ROOT / "docs" / "reference" / f"{page}.md"
        assert path.is_file(), f"no API page for {name}: add docs/reference/{page}.md"
        assert path.read_text().strip() == f"::: cachedfeatures.{name}", f"{path.name} documents another name"
        assert f"reference/{page}.md" in nav, f"reference/{page}.md is not in mkdocs.yml's nav"
    pages = {p.stem for p in (ROOT / "docs" / "reference").glob("*.md")} - {"index"}
    public = {"version" if name == "__version__" else name for name in cachedfeatures.__all__}
    assert pages == public, f"API pages for names that are not public: {sorted(pages - public)}"


def test_the_public_names_are_listed_sorted() -> None:
    assert cachedfeatures.__all__ == sorted(cachedfeatures.__all__)


def test_the_readme_links_point_at_pages_that_exist() -> None:
    # mkdocs build --strict checks the links between docs pages; the README is outside the site.
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\((?!https?://|#)([^)#\s]+)", readme)
    assert targets, "the README links into docs/"
    missing = [target for target in targets if not (ROOT / target).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_sphinx_roles_in_docstrings_read_as_code_in_the_api_reference() -> None:
    pytest.importorskip("griffe")
    spec = importlib.util.spec_from_file_location("griffe_roles", ROOT / "docs" / "griffe_roles.py")
    assert spec is not None and spec.loader is not None
    roles = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(roles)
    text = "See :class:`~cachedfeatures.Entry` and :func:`cachedfeatures.pipeline.prefill.prefill`."
    assert roles.plain(text) == "See `Entry` and `cachedfeatures.pipeline.prefill.prefill`."


def test_ci_runs_exactly_the_readme_test_command() -> None:
    command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    first_block = (ROOT / "README.md").read_text().split("```")[1]
    assert command in first_block.splitlines(), f"the README's first lines must show {command!r}"
    sessions = command.split("nox -s ", 1)[1].split()
    noxfile = (ROOT / "noxfile.py").read_text()
    assert f"nox.options.sessions = {sessions!r}".replace("'", '"') in noxfile
