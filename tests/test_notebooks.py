"""The notebooks in ``notebooks/`` are committed without outputs (the ``notebooks`` nox
session executes them; see ``notebooks/execute.py``)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def notebook_runner() -> ModuleType:
    """``notebooks/execute.py``, which runs the notebooks (the ``notebooks`` extra must be installed)."""
    for name in ("nbclient", "nbformat", "ipykernel", "matplotlib", "xarray"):
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


@pytest.mark.slow  # a kernel per notebook and sample shape, each training a small head
@pytest.mark.parametrize("samples", ["dict", "tuple"])
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.name for path in NOTEBOOKS])
def test_notebook_runs_on_dict_and_tuple_samples_without_warnings(
    path: Path, samples: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No ``TqdmWarning: IProgress not found`` on import in a kernel without ipywidgets, and the
    notebooks need no dict key of the samples: a store of tuple samples works as well."""
    runner = notebook_runner()
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the kernel imports this checkout
    monkeypatch.setenv("CACHEDFEATURES_LOCK_DIR", str(tmp_path / "locks"))
    notebook = runner.run(path, samples, timeout=600)
    assert runner.warnings_printed(notebook) == []
    text = json.dumps([cell.get("outputs", []) for cell in notebook.cells])
    assert "IProgress" not in text and "Warning" not in text
