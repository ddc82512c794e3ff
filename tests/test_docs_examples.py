"""The Python examples in README.md and docs/ run, so the documentation cannot drift from the code.

Each page's fenced ``python`` blocks run in order, as one script, in a fresh temporary directory
(a page reads like a notebook: later blocks use what earlier ones defined). A block is skipped when
the line before it is ``<!-- no-run -->`` or ``<!-- no-run: why -->`` (it needs a GPU, a network, a
model download); other info strings (``bash``, ``text``, ``console``) never run. Hidden set-up code
a reader does not need to see goes in an HTML comment that starts with ``<!-- setup:``. The script
keeps each line at its line number in the page, so a traceback points into the markdown file. A
page that needs an optional package says so with ``<!-- requires: datasets -->`` and is skipped
where it is not installed.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import run_process

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])

FENCE = re.compile(r"^(`{3,}|~{3,})\s*([\w+-]*)")
NO_RUN = re.compile(r"^<!--\s*no-run\b.*-->\s*$")
SETUP = "<!-- setup:"
REQUIRES = re.compile(r"^<!--\s*requires:\s*([\w., ]+?)\s*-->\s*$", re.MULTILINE)
PRELUDE = (
    "import warnings; import cachedfeatures.errors; "
    "warnings.simplefilter('error', cachedfeatures.errors.CacheWarning)"
)


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line number of the block's first code line in the page
    code: str
    runs: bool


def blocks(text: str) -> list[Block]:
    """The ``python`` blocks and hidden set-up comments of a page, in order."""
    lines = text.splitlines()
    found: list[Block] = []
    previous = ""  # the last non-blank line outside a block
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith(SETUP):
            end = next(j for j in range(i, len(lines)) if lines[j].rstrip().endswith("-->"))
            body = [line[len(SETUP) :], *lines[i + 1 : end + 1]] if end > i else [line[len(SETUP) :]]
            body[0] = body[0].strip()
            body[-1] = body[-1].rstrip().removesuffix("-->")
            found.append(Block(i + 1, "\n".join(body), runs=True))
            previous, i = lines[end], end + 1
            continue
        match = FENCE.match(line)
        if match:
            fence, info = match.groups()
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith(fence)), len(lines))
            if info == "python":
                found.append(Block(i + 2, "\n".join(lines[i + 1 : end]), runs=not NO_RUN.match(previous)))
            previous, i = "", end + 1
            continue
        if line.strip():
            previous = line.strip()
        i += 1
    return found


def script(text: str) -> str:
    """The page's runnable code as one script, each line at its line number in the page.

    Line 1 of a page is its title, never code: it turns the package's own warnings into errors, so
    an example that triggers one (a fingerprint that cannot see something, a paused cache) fails.
    """
    out = [""] * (len(text.splitlines()) + 1)
    out[0] = PRELUDE
    for block in blocks(text):
        if block.runs:
            for offset, code in enumerate(block.code.splitlines()):
                out[block.line - 1 + offset] = code
    return "\n".join(out)


def run_file(path: Path) -> subprocess.CompletedProcess[str]:
    """Run ``python PATH`` in PATH's directory, in a new process (a child of a script server, which
    has imported torch already: see ``tests.helpers.run_process``)."""
    runner = (
        f"import runpy, sys; sys.argv = [{str(path)!r}]; runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    return run_process(runner, cwd=path.parent, timeout=600)


RUNNABLE = [page for page in PAGES if any(b.runs for b in blocks(page.read_text()))]


@pytest.mark.slow
@pytest.mark.parametrize("page", RUNNABLE, ids=[str(p.relative_to(ROOT)) for p in RUNNABLE])
def test_page_examples_run(page: Path, tmp_path: Path) -> None:
    for found in REQUIRES.findall(page.read_text()):
        missing = [name for name in found.replace(",", " ").split() if importlib.util.find_spec(name) is None]
        if missing:
            pytest.skip(f"{page.name} needs {', '.join(missing)}")
    path = tmp_path / f"{page.stem}.py"
    path.write_text(script(page.read_text()))
    done = run_file(path)
    # The script's lines are the page's lines: point the traceback at the markdown file.
    output = (done.stdout + done.stderr).replace(str(path), str(page.relative_to(ROOT)))
    assert done.returncode == 0, f"an example in {page.relative_to(ROOT)} failed:\n{output[-6000:]}"


def test_blocks_are_found_and_no_run_is_honoured() -> None:
    text = "\n".join(
        [
            "# Page",
            "<!-- setup:",
            "x = 1",
            "-->",
            "```python",
            "y = x + 1",
            "```",
            "<!-- no-run: needs a GPU -->",
            "```python",
            "z = torch.cuda",
            "```",
            "```bash",
            "echo no",
            "```",
            "<!-- setup: w = 2 -->",
        ]
    )
    found = blocks(text)
    assert [(b.line, b.code.strip(), b.runs) for b in found] == [
        (2, "x = 1", True),
        (6, "y = x + 1", True),
        (10, "z = torch.cuda", False),
        (15, "w = 2", True),
    ]
    lines = script(text).splitlines()
    assert lines[2] == "x = 1" and lines[5] == "y = x + 1" and "torch.cuda" not in script(text)


@pytest.mark.slow
def test_a_failing_example_fails(tmp_path: Path) -> None:
    """The runner can fail: a block that raises (here: warns one of ours) fails at the page's line."""
    page = "# P\n\n```python\nimport warnings\nwarnings.warn('x', cachedfeatures.CacheWarning)\n```\n"
    path = tmp_path / "p.py"
    path.write_text(script(page))
    done = run_file(path)
    assert done.returncode != 0 and "line 5" in done.stderr and "CacheWarning: x" in done.stderr
