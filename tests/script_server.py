"""New Python processes for test scripts without importing torch again for each one.

A script server is a Python that has imported what the scripts import (NumPy, torch,
cachedfeatures, s3fs) and run nothing else. For each request it forks a child that runs the
script as ``python -c SCRIPT ARGS`` would: its own ``__main__``, argv, working directory,
environment and standard streams, a fresh NumPy seed, and the interpreter's normal exit (exit
hooks run; an uncaught exception prints its traceback and exits 1). The child is a new process
with nothing of the tests' in it; only the imports are shared. A new interpreter costs about 3 s
of CPU on these machines, and the suite starts about a hundred of them.

``SCRIPTS.run`` runs a script to its end (as ``subprocess.run``); ``SCRIPTS.start`` starts one
and returns a :class:`Child` to wait for, poll or kill (as ``subprocess.Popen``), so several can
run at once. Three servers with different hash seeds take the requests in turn, so two runs in a
row (a first process and a second one on the same store) never share a hash seed. A request
whose environment differs from the servers' in anything the imports could have read (thread-pool,
interpreter, loader, CUDA and ``TORCH_*`` variables: ``IMPORT_TIME``) runs in a new interpreter
instead, as does any request that sets ``PYTHONHASHSEED``.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

SERVER = """
import builtins, gc, json, os, select, signal, sys, types
import numpy, torch, cachedfeatures  # imported once; nothing is run, so no thread of a store's
try:
    import s3fs  # the object-store tests' children
except ImportError:
    pass
gc.collect()
gc.freeze()  # the imports' objects stay out of the children's collections (their exit: 3x faster)
children, pending = set(), b""
while True:
    if select.select([0], [], [], 0.01 if children else None)[0]:
        data = os.read(0, 1 << 16)
        if not data:  # the tests' process is gone: so are the children it left
            for pid in children:
                os.kill(pid, signal.SIGKILL)
            break
        pending += data
    while b"\\n" in pending:
        line, pending = pending.split(b"\\n", 1)
        request = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            for fd, name in ((1, "stdout"), (2, "stderr")):
                os.dup2(os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            numpy.random.seed()  # a new process draws its own seed; a fork would share this one
            sys.argv = ["-c", *request["args"]]
            main = types.ModuleType("__main__")
            main.__builtins__ = builtins
            sys.modules["__main__"] = main
            del children, pending, data, line
            exec(compile(request.pop("script"), "<string>", "exec"), vars(main))
            sys.exit(0)
        children.add(pid)
        print(json.dumps({"started": pid}), flush=True)
    for pid in list(children):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            children.discard(pid)
            print(json.dumps({"ended": pid, "code": os.waitstatus_to_exitcode(status)}), flush=True)
"""

# What importing NumPy, torch and the package can read: thread pools and their libraries, the
# interpreter, the loader, CUDA and torch's own switches (TORCHINDUCTOR_* and the rest of the
# environment, which tests and torch itself set as they go, are read when used).
IMPORT_TIME = ("OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_", "NUMPY_", "PYTHON", "LD_", "CUDA", "TORCH_")


def _script_env() -> dict[str, str]:
    """A script's environment: this process's, with the repository on the path."""
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _import_time(env: dict[str, str]) -> dict[str, str]:
    return {key: value for key, value in env.items() if key.startswith(IMPORT_TIME)}


class _Server:
    """One server process: started on first use, ended when the tests' process ends."""

    def __init__(self, base_env: dict[str, str]) -> None:
        self.env = {**base_env, "PYTHONHASHSEED": str(random.randrange(1, 2**32))}
        self.process: subprocess.Popen[bytes] | None = None
        self.pending = b""
        self.codes: dict[int, int] = {}  # exit codes of children that ended
        self.directory = Path(tempfile.mkdtemp(prefix="script-server-"))
        self.started = 0
        self.lock = threading.RLock()

    def _process(self) -> subprocess.Popen[bytes]:
        if self.process is None or self.process.poll() is not None:
            self.process = subprocess.Popen(
                [sys.executable, "-c", SERVER],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                cwd=ROOT,
                env=self.env,
            )
            self.pending = b""
        return self.process

    def _answer(self, deadline: float | None) -> dict[str, Any] | None:
        """The next answer line, or ``None`` once ``deadline`` passes (``None``: wait for it).
        Exit codes are recorded as they come."""
        assert self.process is not None and self.process.stdout is not None
        fd = self.process.stdout.fileno()
        while b"\n" not in self.pending:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([fd], [], [], wait)[0]:
                return None
            data = os.read(fd, 65536)
            if not data:
                raise AssertionError(f"the script server died (exit {self.process.wait(timeout=60)})")
            self.pending += data
        line, self.pending = self.pending.split(b"\n", 1)
        answer: dict[str, Any] = json.loads(line)
        if "ended" in answer:
            self.codes[int(answer["ended"])] = int(answer["code"])
        return answer

    def start(self, script: str, args: list[str], env: dict[str, str], cwd: Path) -> Child:
        with self.lock:
            process = self._process()
            assert process.stdin is not None
            out, err = self.output_files()
            request = {"script": script, "args": args, "env": env, "cwd": str(cwd)}
            process.stdin.write(
                (json.dumps(request | {"stdout": str(out), "stderr": str(err)}) + "\n").encode()
            )
            process.stdin.flush()
            while "started" not in (answer := self._answer(None) or {}):
                pass
            command = [sys.executable, "-c", script, *args]
            return _Forked(self, int(answer["started"]), command, out, err)

    def output_files(self) -> tuple[Path, Path]:
        """Two new files for a child's stdout and stderr."""
        with self.lock:
            self.started += 1
            return self.directory / f"{self.started}.stdout", self.directory / f"{self.started}.stderr"

    def exit_code(self, pid: int, deadline: float | None) -> int | None:
        """``pid``'s exit code once it has ended; ``None`` if it is still running at ``deadline``."""
        with self.lock:
            while pid not in self.codes:
                if self._answer(deadline) is None:
                    return None
            return self.codes[pid]

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            assert self.process.stdin is not None and self.process.stdout is not None
            self.process.stdin.close()
            self.process.wait(timeout=60)
            self.process.stdout.close()
        shutil.rmtree(self.directory, ignore_errors=True)


class Child:
    """A script's process, used as a ``subprocess.Popen`` with text pipes would be; its stdout
    and stderr go to files, so :meth:`output` reads what it has written so far."""

    def __init__(self, pid: int, args: list[str], out: Path, err: Path) -> None:
        self.pid, self.args, self.out, self.err = pid, args, out, err
        self.returncode: int | None = None

    def _exit_code(self, deadline: float | None) -> int | None:
        """Its exit code once it has ended; ``None`` if it still runs at ``deadline``."""
        raise NotImplementedError

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._exit_code(time.monotonic())
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = self._exit_code(None if timeout is None else time.monotonic() + timeout)
            if self.returncode is None:
                assert timeout is not None
                raise subprocess.TimeoutExpired(self.args, timeout, *self.output())
        return self.returncode

    def output(self) -> tuple[str, str]:
        """What it has written so far to stdout and to stderr."""
        return tuple(  # type: ignore[return-value]
            path.read_text(errors="replace") if path.exists() else "" for path in (self.out, self.err)
        )

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        return self.output()

    def kill(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)


class _Forked(Child):
    """A child of a script server."""

    def __init__(self, server: _Server, pid: int, args: list[str], out: Path, err: Path) -> None:
        super().__init__(pid, args, out, err)
        self.server = server

    def _exit_code(self, deadline: float | None) -> int | None:
        return self.server.exit_code(self.pid, deadline)


class _Spawned(Child):
    """A new interpreter, for a request the servers cannot take."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str], out: Path, err: Path) -> None:
        with out.open("w") as stdout, err.open("w") as stderr:
            self.process = subprocess.Popen(args, cwd=cwd, env=env, stdout=stdout, stderr=stderr)
        super().__init__(self.process.pid, args, out, err)

    def _exit_code(self, deadline: float | None) -> int | None:
        try:
            return self.process.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return None


class ScriptServers:
    """Three servers taking requests in turn (see the module docstring).

    Their environment is the tests' process's at the first request, not at this module's
    import: importing a test module can set variables (sentence-transformers imports
    scikit-learn and joblib, which set ``KMP_*`` defaults), and a server configured before
    that would have to turn every later request away to a new interpreter.
    """

    def __init__(self, count: int = 3) -> None:
        self.count = count
        self.base_env: dict[str, str] | None = None
        self.servers: list[_Server] = []
        self.turn = 0
        atexit.register(self.close)

    def _configured(self) -> dict[str, str]:
        """The servers' environment, fixed at the first request (without a hash seed: each
        server has its own)."""
        if self.base_env is None:
            self.base_env = {k: v for k, v in _script_env().items() if k != "PYTHONHASHSEED"}
            self.servers = [_Server(self.base_env) for _ in range(self.count)]
        return self.base_env

    def usable(self, env: dict[str, str]) -> bool:
        """Whether a server's imports are what a new interpreter with ``env`` would have made."""
        base = self._configured()
        return "PYTHONHASHSEED" not in env and _import_time(env) == _import_time(base)

    def run(
        self, script: str, *args: str, cwd: Path = ROOT, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """Run ``script`` as ``python -c SCRIPT ARGS`` in a new process (repo on the path)."""
        child = self.start(script, *args, cwd=cwd)
        try:
            stdout, stderr = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            raise
        return subprocess.CompletedProcess(child.args, child.wait(), stdout, stderr)

    def start(self, script: str, *args: str, cwd: Path = ROOT) -> Child:
        """Start ``script`` as ``python -c SCRIPT ARGS`` in a child of the next server (in a new
        interpreter where the servers cannot take it: :meth:`usable`)."""
        env = _script_env()
        usable = self.usable(env)  # fixes the servers' environment at the first request
        server = self.servers[self.turn % len(self.servers)]
        self.turn += 1
        if not usable:
            command = [sys.executable, "-c", textwrap.dedent(script), *args]
            return _Spawned(command, cwd, env, *server.output_files())
        return server.start(textwrap.dedent(script), list(args), env, cwd)

    def close(self) -> None:
        for server in self.servers:
            server.close()


SCRIPTS = ScriptServers()
