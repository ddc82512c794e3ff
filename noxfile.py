"""Sessions: tests, lint, typecheck, notebooks, docs, demo and bench.

Torch is installed first from ``CACHEDFEATURES_TORCH_SPEC`` (default ``torch==2.13.0``, a
CPU wheel), so the package's own ``torch>=2.2`` range never pulls a multi-GB CUDA build.
"""

from __future__ import annotations

import os
import tomllib

import nox

nox.options.sessions = ["tests", "lint", "typecheck", "notebooks", "docs"]
nox.options.reuse_existing_virtualenvs = True
# Two sessions at a time (each in its own environment and process): while the tests run, about
# 15 minutes, lint, typecheck, notebooks and docs run one after another beside them, about 4
# minutes that CI would otherwise add to the tests'. Each session's output is printed as it ends.
nox.options.parallel = 2
nox.options.allow_parallel = True

TORCH = os.environ.get("CACHEDFEATURES_TORCH_SPEC", "torch==2.13.0")
# mkdocs-material prints a banner about MkDocs 2 on every build; it is not about this site.
QUIET = {"NO_MKDOCS_2_WARNING": "1"}


def install(session: nox.Session, *extras: str) -> None:
    session.install(TORCH)
    session.install("-e", f".[{','.join(extras)}]" if extras else ".")


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite, slow tests included."""
    install(session, "test", "text")
    session.run("pytest", *(session.posargs or ["-q", "--durations=30"]))


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6")
    paths = [
        p
        for p in ("cachedfeatures", "tests", "benchmarks", "notebooks", "docs/griffe_roles.py", "noxfile.py")
        if os.path.exists(p)
    ]
    session.run("ruff", "check", *paths)
    session.run("ruff", "format", "--check", *paths)
    # The layers contract in pyproject.toml: no import cycles, no import from a higher layer.
    session.install("import-linter>=2.1")
    session.run("lint-imports", env={"PYTHONPATH": os.getcwd()})


@nox.session
def typecheck(session: nox.Session) -> None:
    install(session)
    session.install("mypy>=1.11")
    session.run("mypy")


@nox.session
def demo(session: nox.Session) -> None:
    """Train a linear head on cached features of a small conv backbone, on a local store."""
    install(session)
    session.run("python", "-m", "cachedfeatures.demo", *session.posargs)


@nox.session
def notebooks(session: nox.Session) -> None:
    """Execute every notebook in notebooks/ (each builds its own small store); any error fails.

    ``nox -s notebooks -- --out build/notebooks`` also keeps the executed notebooks and their
    figures as PNG files.
    """
    install(session, "notebooks")
    session.run("python", "notebooks/execute.py", *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site into ``site/``; any warning (a broken link, a missing reference,
    a docstring griffe cannot parse) fails.

    Only the ``docs`` extra is installed, not the package or torch: mkdocstrings reads the docstrings
    from the source without importing it. ``nox -s docs -- serve`` serves the site while editing.
    """
    with open("pyproject.toml", "rb") as file:
        extra = tomllib.load(file)["project"]["optional-dependencies"]["docs"]
    session.install(*extra)
    if session.posargs[:1] == ["serve"]:
        session.run("mkdocs", "serve", *session.posargs[1:], env=QUIET)
    else:
        session.run("mkdocs", "build", "--strict", *session.posargs, env=QUIET)


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmarks, each printing ratios against baselines measured in the same run.

    Read path against a NumPy memmap, no cache and torchcache; hit epochs against Hugging Face
    ``datasets`` and litdata; the pipeline's filling epoch against no cache; ``cached_module``
    against torchcache; fingerprinting a 100M-parameter model against one copy of its weights; K
    cached augmentation views against no augmentation and on-the-fly augmentation (test accuracy,
    fill and hit epochs). ``-- --quick``: about a minute each.
    """
    install(session, "test")  # the test extra brings torchcache and datasets, the prior art
    # litdata without its dependencies: its metadata asks for torchvision, which pip would
    # resolve to a CUDA build; bench_peers.py needs only lightning-utilities of the rest.
    session.install("--no-deps", "litdata>=0.2.76,<0.3", "lightning-utilities>=0.11")
    quick = ["--quick"] if "--quick" in session.posargs else []
    session.run("python", "benchmarks/bench_read.py", *session.posargs)
    session.run("python", "benchmarks/bench_peers.py", *quick)
    session.run("python", "benchmarks/bench_pipeline.py", *quick)
    session.run("python", "benchmarks/bench_module_cache.py", *quick)
    session.run("python", "benchmarks/bench_fingerprint.py", *quick)
    session.run("python", "benchmarks/bench_views.py", *quick)
