"""The tests' script servers are used: a script from this process runs in a server's child.

The suite starts about a hundred scripts; each in a new interpreter would import torch again
(about 3 s of CPU each). Importing a test module may set environment variables
(sentence-transformers imports scikit-learn, which sets ``KMP_*`` defaults): the servers take
the environment of the first request, so such a variable does not turn every script away.
"""

from __future__ import annotations

import os

import pytest

from tests.script_server import SCRIPTS, _script_env


def test_a_script_runs_in_a_child_of_a_script_server() -> None:
    assert SCRIPTS.usable(_script_env()), "this process's environment turns every script away"
    result = SCRIPTS.run("import os; print(os.getppid())")
    assert result.returncode == 0, result.stderr
    servers = {server.process.pid for server in SCRIPTS.servers if server.process is not None}
    assert int(result.stdout) in servers


def test_a_variable_set_after_the_first_script_sends_scripts_to_a_new_interpreter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    SCRIPTS.run("pass")  # the servers' environment is fixed by now
    threads = str((os.cpu_count() or 1) + 13)  # a value no environment here has
    monkeypatch.setenv("OMP_NUM_THREADS", threads)  # read when NumPy and torch are imported
    assert not SCRIPTS.usable(_script_env())
    result = SCRIPTS.run("import os; print(os.getppid(), os.environ['OMP_NUM_THREADS'])")
    assert result.returncode == 0, result.stderr
    parent, seen = result.stdout.split()
    assert int(parent) == os.getpid() and seen == threads  # a new interpreter, started from here
