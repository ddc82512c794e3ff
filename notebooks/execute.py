"""Execute the notebooks in this directory, as CI does: ``python notebooks/execute.py``.

Each notebook runs in a fresh kernel (the ``python3`` kernel of the running interpreter) from
its own directory, and builds its own small store, so nothing outside it is needed. Any cell
that raises fails the run, and so does a warning a cell shows (``warnings_printed``: tqdm's
``IProgress not found`` in a kernel without ipywidgets among them). Each notebook runs once on
a dataset of dict samples and once on one of tuple samples, so the notebooks need no dict key
of the samples (``--samples`` picks one; the kernel reads it from
``CACHEDFEATURES_NOTEBOOK_SAMPLES`` in the notebook's parameters cell). This is the one run of
the notebooks in CI (the ``notebooks`` nox session); the test suite checks only that they are
committed without outputs. With
``--out DIR`` the executed notebooks and every figure they draw (as
``<notebook>-<samples>-<cell>-<n>.png``) are written to ``DIR`` for a look.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent


SAMPLES_ENV = "CACHEDFEATURES_NOTEBOOK_SAMPLES"
SAMPLES = ("dict", "tuple")


def run(path: Path, samples: str, timeout: int) -> nbformat.NotebookNode:
    """Run one notebook on ``samples`` ("dict" or "tuple") samples; return it executed."""
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    previous = os.environ.get(SAMPLES_ENV)
    os.environ[SAMPLES_ENV] = samples  # the kernel inherits it
    try:
        client.execute()
    finally:
        if previous is None:
            os.environ.pop(SAMPLES_ENV, None)
        else:
            os.environ[SAMPLES_ENV] = previous
    return notebook


def warnings_printed(notebook: nbformat.NotebookNode) -> list[str]:
    """Every cell output that reads like a warning: stderr text mentioning one, or any output
    (text, display data, an error) naming a ``...Warning`` or tqdm's ``IProgress not found``."""
    found = []
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        for output in cell.outputs:
            text = json.dumps(output)
            stderr = output.get("name") == "stderr" and "warn" in output.get("text", "").lower()
            if stderr or "Warning" in text or "IProgress" in text:
                found.append(output.get("text") or text)
    return found


def execute(path: Path, samples: str, out: Path | None, timeout: int) -> float:
    """Run one notebook and check it printed no warning; return its wall time in seconds."""
    start = time.perf_counter()
    notebook = run(path, samples, timeout)
    seconds = time.perf_counter() - start
    printed = warnings_printed(notebook)
    if printed:
        raise RuntimeError(f"{path.name} ({samples} samples) printed warnings:\n" + "\n".join(printed))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        nbformat.write(notebook, out / f"{path.stem}-{samples}.ipynb")
        for number, cell in enumerate(notebook.cells):
            images = [
                o["data"]["image/png"] for o in cell.get("outputs", []) if "image/png" in o.get("data", {})
            ]
            for n, image in enumerate(images):
                (out / f"{path.stem}-{samples}-{number}-{n}.png").write_bytes(base64.b64decode(image))
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="notebooks to run (default: all here)")
    parser.add_argument("--out", type=Path, default=None, help="write executed notebooks and figures here")
    parser.add_argument("--timeout", type=int, default=300, help="seconds allowed per cell")
    parser.add_argument(
        "--samples", choices=[*SAMPLES, "both"], default="both", help="samples to run on (default: both)"
    )
    args = parser.parse_args(argv)
    # The kernel imports cachedfeatures from this checkout even when it is not installed.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))
    for path in args.notebooks or sorted(HERE.glob("*.ipynb")):
        path = path if path.exists() else HERE / path
        for samples in SAMPLES if args.samples == "both" else (args.samples,):
            seconds = execute(path.resolve(), samples, args.out, args.timeout)
            print(f"{path.name} ({samples} samples): ran in {seconds:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
