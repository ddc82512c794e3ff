"""Execute the notebooks in this directory, as CI does: ``python notebooks/execute.py``.

Each notebook runs in a fresh kernel (the ``python3`` kernel of the running interpreter) from
its own directory, and builds its own small store, so nothing outside it is needed. Any cell
that raises fails the run. With ``--out DIR`` the executed notebooks and every figure they
draw (as ``<notebook>-<cell>-<n>.png``) are written to ``DIR`` for a look.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent


def execute(path: Path, out: Path | None, timeout: int) -> float:
    """Run one notebook; return its wall time in seconds."""
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        nbformat.write(notebook, out / path.name)
        for number, cell in enumerate(notebook.cells):
            images = [
                o["data"]["image/png"] for o in cell.get("outputs", []) if "image/png" in o.get("data", {})
            ]
            for n, image in enumerate(images):
                (out / f"{path.stem}-{number}-{n}.png").write_bytes(base64.b64decode(image))
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="notebooks to run (default: all here)")
    parser.add_argument("--out", type=Path, default=None, help="write executed notebooks and figures here")
    parser.add_argument("--timeout", type=int, default=300, help="seconds allowed per cell")
    args = parser.parse_args(argv)
    # The kernel imports cachedfeatures from this checkout even when it is not installed.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))
    for path in args.notebooks or sorted(HERE.glob("*.ipynb")):
        path = path if path.exists() else HERE / path
        seconds = execute(path.resolve(), args.out, args.timeout)
        print(f"{path.name}: ran in {seconds:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
