"""Shared test helpers: CLI processes, endpoints and ZeroMQ subscribers.

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
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import zmq

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


class CliProcess:
    """One ``python -m lhtstream.cli ...`` child whose stdout/stderr are collected by threads."""

    def __init__(self, args: Sequence[str], cwd: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        full_env = _child_env(env)
        self.args = [sys.executable, "-m", "lhtstream.cli", *map(str, args)]
        self.popen = subprocess.Popen(
            self.args, cwd=cwd, env=full_env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
        )
        self._lock = threading.Lock()
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self._threads = [
            threading.Thread(target=self._pump, args=(self.popen.stdout, self.stdout_lines),
                             daemon=True),
            threading.Thread(target=self._pump, args=(self.popen.stderr, self.stderr_lines),
                             daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _pump(self, stream: Any, lines: list[str]) -> None:
        for line in stream:
            with self._lock:
                lines.append(line.rstrip("\n"))
        stream.close()

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    @property
    def stdout(self) -> str:
        with self._lock:
            return "\n".join(self.stdout_lines)

    @property
    def stderr(self) -> str:
        with self._lock:
            return "\n".join(self.stderr_lines)

    def _wait_for(self, lines: list[str], pattern: str, timeout: float) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            with self._lock:
                new = lines[seen:]
            match = _first_match(regex, new)
            if match:
                return match
            seen += len(new)
            if self.popen.poll() is not None:
                self._drain()
                with self._lock:
                    rest = lines[seen:]
                match = _first_match(regex, rest)
                if match:
                    return match
                raise AssertionError(
                    f"process exited ({self.popen.returncode}) before printing /{pattern}/\n"
                    f"stderr:\n{self.stderr}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"/{pattern}/ not printed within {timeout} s\nstderr:\n{self.stderr}"
                )
            time.sleep(0.02)

    def wait_for_stderr(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        """Wait until a stderr line matches the regex ``pattern``; return the match."""
        return self._wait_for(self.stderr_lines, pattern, timeout)

    def wait_for_stdout(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        """Wait until a stdout line matches the regex ``pattern``; return the match."""
        return self._wait_for(self.stdout_lines, pattern, timeout)

    def _drain(self) -> None:
        for thread in self._threads:
            thread.join(timeout=5)

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for exit (output fully collected); kill and raise on timeout."""
        try:
            code = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._drain()
        return code

    def signal(self, signum: int = signal.SIGTERM) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signum)

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL. Returns the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._drain()
        return self.popen.returncode

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=10)


def _first_match(regex: re.Pattern[str], lines: list[str]) -> re.Match[str] | None:
    for line in lines:
        match = regex.search(line)
        if match:
            return match
    return None


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
