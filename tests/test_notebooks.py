"""The notebooks in ``notebooks/`` are committed without outputs (the ``notebooks`` nox
session executes them; see ``notebooks/execute.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


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
