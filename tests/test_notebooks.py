"""The notebooks in ``notebooks/`` are committed without outputs. They are executed once, by the
``notebooks`` nox session (``notebooks/execute.py``, on dict and tuple samples, failing on any
warning a cell shows), not here: the ``tests`` session has no kernel installed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def notebook_runner() -> ModuleType:
    """``notebooks/execute.py``, which runs the notebooks (it needs nbclient and nbformat)."""
    for name in ("nbclient", "nbformat"):
        pytest.importorskip(name)
    spec = importlib.util.spec_from_file_location("notebook_runner", ROOT / "notebooks" / "execute.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_notebooks_exist() -> None:
    assert {path.name for path in NOTEBOOKS} >= {"quickstart.ipynb", "explore_store.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.name for path in NOTEBOOKS])
def test_notebook_is_committed_with_outputs_stripped(path: Path) -> None:
    notebook = json.loads(path.read_text())
    assert notebook["nbformat"] == 4
    assert notebook["metadata"]["kernelspec"]["name"] == "python3"
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"{path.name}: strip the outputs of {cell['source'][:60]!r}"
            assert cell["execution_count"] is None


def test_the_runner_fails_on_any_warning_a_cell_shows() -> None:
    """The notebooks run once, in the ``notebooks`` nox session (``notebooks/execute.py``); its
    check is the one that sees tqdm's ``IProgress not found`` and any ``...Warning`` in a cell's
    output, not only warnings on stderr."""
    nbformat = pytest.importorskip("nbformat")
    runner = notebook_runner()
    notebook = nbformat.v4.new_notebook()
    quiet = nbformat.v4.new_code_cell("print(1)")
    quiet.outputs = [nbformat.v4.new_output("stream", name="stdout", text="1\n")]
    tqdm = nbformat.v4.new_code_cell("import tqdm.auto")
    tqdm.outputs = [nbformat.v4.new_output("stream", name="stdout", text="IProgress not found.\n")]
    shown = nbformat.v4.new_code_cell("warnings.warn('x')")
    shown.outputs = [nbformat.v4.new_output("display_data", data={"text/plain": "UserWarning: x"})]
    notebook.cells = [quiet, tqdm, shown]
    assert len(runner.warnings_printed(notebook)) == 2
    notebook.cells = [quiet]
    assert runner.warnings_printed(notebook) == []
