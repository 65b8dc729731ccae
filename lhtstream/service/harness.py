"""Child processes of lhtstream, for the benchmarks, the demo and the tests: start one,
watch its output, stop it; and what they share (endpoints, a monitor's argv, the
replay's summary file).

One harness: `lhtstream bench`, `lhtstream demo`, tools/ and tests/processes.py all
start their ``python -m lhtstream.cli ...`` children through `Child`.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lhtstream.base.errors import LhtstreamError

LAT_QS = (("p50", 50.0), ("p99", 99.0), ("p999", 99.9))
"""Latency percentiles the benchmarks and the demo report (name, percent)."""
DELIVERY_QS = (("p50", 50.0), ("p99", 99.0))
"""Alarm-delivery percentiles the benchmarks report."""


class ChildError(LhtstreamError):
    """A child process exited early, printed something unexpected or timed out."""


class ChildTimeout(ChildError, TimeoutError):
    """A child did not print the awaited line in time (still running)."""


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM the child when the parent dies (Linux), so nothing is left behind."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # not Linux: the parent's finally-blocks still clean up
        pass


def cli(*args: Any) -> list[str]:
    """argv (after the interpreter) of ``lhtstream ARGS``."""
    return ["-m", "lhtstream.cli", *map(str, args)]


class Child:
    """A ``python ARGS`` child whose stdout and stderr lines are collected by threads.

    In a session of its own, so a terminal's Ctrl-C reaches only the parent, which stops
    its children in order (monitor after replay) instead of all at once; and (Linux) it
    gets SIGTERM if the parent dies. ``env`` entries are added to this process's.
    """

    def __init__(self, args: Sequence[str], name: str = "child", echo: bool = False,
                 env: Mapping[str, str] | None = None, cwd: Path | None = None) -> None:
        self.name = name
        self.args = [sys.executable, *map(str, args)]
        full_env = dict(os.environ, PYTHONUNBUFFERED="1")
        full_env.update(env or {})
        self.popen = subprocess.Popen(
            self.args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, bufsize=1, env=full_env, cwd=cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        self.echo = echo
        self.lines: list[str] = []  # stdout and stderr, in the order they came
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._pump, args=(self.popen.stdout, self.stdout_lines),
                             daemon=True),
            threading.Thread(target=self._pump, args=(self.popen.stderr, self.stderr_lines),
                             daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _pump(self, stream: Any, lines: list[str]) -> None:
        for line in stream:
            with self._lock:
                lines.append(line.rstrip("\n"))
                self.lines.append(line.rstrip("\n"))
            if self.echo:
                print(f"[{self.name}] {line}", end="", file=sys.stderr)
        stream.close()

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        """The exit code, None while it runs."""
        return self.popen.poll()

    @property
    def stdout(self) -> str:
        with self._lock:
            return "\n".join(self.stdout_lines)

    @property
    def stderr(self) -> str:
        with self._lock:
            return "\n".join(self.stderr_lines)

    def text(self) -> str:
        """Everything it printed so far, both streams."""
        with self._lock:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float, stream: str = "both") -> re.Match[str]:
        """The first line (of ``stream``: both, stdout or stderr) matching ``pattern``.
        `ChildError` if it exits first, `ChildTimeout` after ``timeout`` s."""
        lines = {"both": self.lines, "stdout": self.stdout_lines,
                 "stderr": self.stderr_lines}[stream]
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            with self._lock:
                new = lines[seen:]
            m = _first_match(regex, new)
            if m:
                return m
            seen += len(new)
            if self.popen.poll() is not None:
                self._drain()
                with self._lock:
                    rest = lines[seen:]
                m = _first_match(regex, rest)
                if m:
                    return m
                raise ChildError(f"{self.name} exited ({self.popen.returncode}) before "
                                 f"/{pattern}/:\n{self.text()[-2000:]}")
            if time.monotonic() > deadline:
                raise ChildTimeout(f"{self.name}: /{pattern}/ not seen within {timeout:.0f} s:"
                                   f"\n{self.text()[-2000:]}")
            time.sleep(0.02)

    def _drain(self) -> None:
        for t in self._threads:
            t.join(timeout=5)

    def signal(self, signum: int = signal.SIGTERM) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for its exit (output fully collected); on timeout kill it and raise
        ``subprocess.TimeoutExpired``."""
        try:
            code = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._drain()
        return code

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL; output fully collected.
        Returns the exit code."""
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


def _first_match(regex: re.Pattern[str], lines: Sequence[str]) -> re.Match[str] | None:
    for line in lines:
        m = regex.search(line)
        if m:
            return m
    return None


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def endpoints(transport: str, folder: Path) -> tuple[str, str]:
    """(frames, publish) endpoints: ipc sockets in ``folder`` or two free local TCP ports."""
    if transport == "ipc":
        return f"ipc://{folder}/frames", f"ipc://{folder}/out"
    if transport == "tcp":
        a = free_tcp_port()
        b = free_tcp_port()
        while b == a:
            b = free_tcp_port()
        return f"tcp://127.0.0.1:{a}", f"tcp://127.0.0.1:{b}"
    raise ChildError(f"unknown transport {transport!r}: ipc or tcp")


def short_tempdir(prefix: str) -> Path:
    """A temp folder with a short path (AF_UNIX socket paths are limited to ~107 bytes)."""
    base = "/tmp" if os.path.isdir("/tmp") else None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def monitor_args(frames: str | Sequence[str], publish: str, model: Path | None, journal: Path,
                 latency_log: Path | None, status_interval: float = 0.5) -> list[str]:
    """argv (after the interpreter) of a monitor child, with the latency log when asked."""
    args = cli("monitor", "--publish", publish, "--journal", journal,
               "--status-interval", status_interval)
    if latency_log is not None:
        args += ["--latency-log", str(latency_log)]
    for f in [frames] if isinstance(frames, str) else frames:
        args += ["--frames", f]
    if model is not None:
        args += ["--model", str(model)]
    return args


def read_replay_summary(path: Path) -> dict[str, Any]:
    """The summary a replay child wrote with ``--summary-json`` (`ReplayStats` fields:
    frames_sent, jitter_us {n, p50, p99, p999, max} or None, seconds, stopped, ...)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ChildError(f"replay wrote no summary to {path}: {exc}") from None
