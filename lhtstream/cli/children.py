"""Child processes for the demo and the benchmarks: start, watch output, stop in order.

Also the replay's summary reader and the endpoints both use (ipc in a short
temp folder, or free loopback TCP ports).
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lhtstream.base.errors import LhtstreamError

LAT_QS = (("p50", 50.0), ("p99", 99.0), ("p999", 99.9))
DELIVERY_QS = (("p50", 50.0), ("p99", 99.0))


class ChildError(LhtstreamError):
    """A child process exited early, printed something unexpected or timed out."""


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM the child when the parent dies (Linux), so nothing is left behind."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # not Linux: the parent's finally-blocks still clean up
        pass


class Child:
    """A ``python -m ...`` child with its stderr/stdout lines collected by threads."""

    def __init__(self, args: Sequence[str], name: str, echo: bool = False) -> None:
        self.name = name
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # Own session: a terminal Ctrl-C reaches only the parent, which stops the
        # children in order (monitor after replay) instead of all at once.
        self.popen = subprocess.Popen(
            [sys.executable, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, bufsize=1, env=env, start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        self.lines: list[str] = []
        self.echo = echo
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._pump, args=(s,), daemon=True)
                         for s in (self.popen.stdout, self.popen.stderr)]
        for t in self._threads:
            t.start()

    def _pump(self, stream: Any) -> None:
        for line in stream:
            with self._lock:
                self.lines.append(line.rstrip("\n"))
            if self.echo:
                print(f"[{self.name}] {line}", end="", file=sys.stderr)
        stream.close()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def text(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """Wait for an output line matching ``pattern``; ChildError if it exits or times out."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            with self._lock:
                new = self.lines[seen:]
            m = _first_match(regex, new)
            if m:
                return m
            seen += len(new)
            if self.popen.poll() is not None and seen >= len(self.lines):
                for t in self._threads:
                    t.join(timeout=2)
                with self._lock:
                    rest = self.lines[seen:]
                m = _first_match(regex, rest)
                if m:
                    return m
                raise ChildError(f"{self.name} exited ({self.popen.returncode}) before "
                                 f"/{pattern}/:\n{self.text()[-2000:]}")
            if time.monotonic() > deadline:
                raise ChildError(f"{self.name}: /{pattern}/ not seen within {timeout:.0f} s:\n"
                                 f"{self.text()[-2000:]}")
            time.sleep(0.02)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait, SIGKILL if needed; output fully collected. Returns the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)
        for t in self._threads:
            t.join(timeout=5)
        return self.popen.returncode


def _first_match(regex: re.Pattern[str], lines: Sequence[str]) -> re.Match[str] | None:
    for line in lines:
        m = regex.search(line)
        if m:
            return m
    return None


def free_tcp_port() -> int:
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
    args = ["-m", "lhtstream.cli", "monitor", "--publish", publish, "--journal", str(journal),
            "--status-interval", str(status_interval)]
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
