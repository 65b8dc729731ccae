"""Shared test helpers: CLI processes, endpoints and ZeroMQ subscribers.

The processes are the package's own harness (`lhtstream.service.harness`, which the
benchmarks and the demo use), run against this checkout.

Import with ``from tests.processes import ...``. Every process is started via
``ProcessGroup`` (a context manager) so a failing test still kills it::

    @pytest.fixture
    def procs():
        with ProcessGroup() as group:
            yield group

    def test_x(procs, tmp_path):
        replay = procs.cli("replay", str(data), "--endpoint", ipc_endpoint(tmp_path))
        replay.wait_for_stderr("jitter", timeout=10)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import zmq

from lhtstream.service.harness import Child, cli, free_tcp_port

REPO_ROOT = Path(__file__).resolve().parents[1]


def tcp_endpoint() -> str:
    """``tcp://127.0.0.1:<free port>``."""
    return f"tcp://127.0.0.1:{free_tcp_port()}"


def ipc_endpoint(tmp_path: Path, name: str = "frames") -> str:
    """``ipc://`` endpoint in ``tmp_path``, or in /tmp when that path is too long for a socket."""
    path = Path(tmp_path) / f"{name}.ipc"
    if len(str(path)) > 90:  # AF_UNIX paths are limited to ~107 bytes
        path = Path(tempfile.gettempdir()) / f"lht-{uuid.uuid4().hex[:12]}-{name}.ipc"
    return f"ipc://{path}"


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.02) -> Any:
    """Poll ``predicate`` until truthy (returned); TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s")
        time.sleep(interval)


class CliProcess(Child):
    """One ``python -m lhtstream.cli ...`` child of this checkout (the harness's `Child`)."""

    def __init__(self, args: Sequence[str], cwd: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        super().__init__(cli(*args), name=f"lhtstream {args[0] if args else ''}",
                         env=_child_env(env), cwd=cwd)

    def wait_for_stderr(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        """Wait until a stderr line matches the regex ``pattern``; return the match."""
        return self.wait_for(pattern, timeout, stream="stderr")

    def wait_for_stdout(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        """Wait until a stdout line matches the regex ``pattern``; return the match."""
        return self.wait_for(pattern, timeout, stream="stdout")

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL. Returns the exit code."""
        return self.stop(timeout)


class ProcessGroup:
    """Starts CLI processes and guarantees they are all gone when the block exits."""

    def __init__(self) -> None:
        self.processes: list[CliProcess] = []

    def cli(self, *args: Any, cwd: Path | None = None,
            env: dict[str, str] | None = None) -> CliProcess:
        process = CliProcess([str(a) for a in args], cwd=cwd, env=env)
        self.processes.append(process)
        return process

    def close(self) -> None:
        for process in self.processes:
            try:
                process.terminate(timeout=5)
            finally:
                process.kill()

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    # Run against this checkout even if the package was installed elsewhere.
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p]
    )
    env.update(extra or {})
    return env


def run_cli(
    *args: Any, timeout: float = 60.0, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """Run ``python -m lhtstream.cli ARGS`` to completion; output captured as text."""
    env = _child_env()
    return subprocess.run(
        [sys.executable, "-m", "lhtstream.cli", *map(str, args)], cwd=cwd, env=env,
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
    )


class Subscriber:
    """A SUB socket for tests: ``recv()`` returns multipart parts or raises TimeoutError."""

    def __init__(self, endpoint: str, topics: Sequence[str] = ("",), hwm: int = 100_000) -> None:
        self.context = zmq.Context.instance()
        self.socket = self.context.socket(zmq.SUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVHWM, hwm)
        for topic in topics:
            self.socket.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self.socket.connect(endpoint)

    def recv(self, timeout: float = 10.0) -> list[bytes]:
        if not self.socket.poll(int(timeout * 1000)):
            raise TimeoutError(f"no message within {timeout} s")
        return self.socket.recv_multipart()

    def close(self) -> None:
        self.socket.close(linger=0)

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
