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
import threading
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
        self.replays: list[ReplayThread] = []

    def cli(self, *args: Any, cwd: Path | None = None,
            env: dict[str, str] | None = None) -> CliProcess:
        process = CliProcess([str(a) for a in args], cwd=cwd, env=env)
        self.processes.append(process)
        return process

    def replay_thread(self, data: Any, endpoint: str, **kw: Any) -> ReplayThread:
        """A `ReplayThread`, stopped when the block exits."""
        replay = ReplayThread(data, endpoint, **kw)
        self.replays.append(replay)
        return replay

    def close(self) -> None:
        for replay in self.replays:
            replay.__exit__()
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


class LiveMonitor:
    """The production `Monitor` in this process, wired as `launch.serve` wires it (its
    pipeline factory, a `Journal`, a bound PUB, a SUB connected to ``frames_ep`` and
    subscribed by `protocol.configure_subscriber`), its loop on a thread: for tests that
    inject into it what no command-line option offers (a journal of limited size, a
    pipeline that records its rows). ``wrap(pipeline)`` may extend each pipeline made.
    A context manager; `stop` ends the loop as SIGTERM does (a last, final status)."""

    def __init__(self, frames_ep: str, pub_ep: str, journal: Any, *,
                 calibration_seconds: float | None = None, status_interval: float = 0.2,
                 wrap: Callable[[Any], Any] | None = None) -> None:
        from lhtstream.io import protocol
        from lhtstream.service.launch import _pipeline_factory
        from lhtstream.service.monitor import Monitor

        make, note, _model = _pipeline_factory(None, calibration_seconds)
        ctx = zmq.Context.instance()
        self.journal = journal
        self.pub = ctx.socket(zmq.PUB)
        self.sub = ctx.socket(zmq.SUB)
        protocol.claim_ipc(pub_ep)
        self.pub.bind(pub_ep)
        self.monitor = Monitor(
            make_pipeline=make if wrap is None else (lambda name: wrap(make(name))),
            journal=journal, publish=self.pub, subscribe=self.sub,
            status_interval=status_interval, model_note=note)
        protocol.configure_subscriber(self.sub, ["frame", "video"], self.monitor.selection)
        self.sub.connect(frames_ep)
        self.monitor.watch_connections([frames_ep])
        self.thread = threading.Thread(target=self.monitor.run, name="monitor", daemon=True)

    def __enter__(self) -> LiveMonitor:
        self.thread.start()
        return self

    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the loop (what SIGTERM does: a last status marked final) and wait for it."""
        self.monitor.stop_requested = True
        self.thread.join(timeout=timeout)
        assert not self.thread.is_alive(), "the monitor loop did not stop"

    def __exit__(self, *exc: object) -> None:
        from lhtstream.service.training import cancel_background_fits

        self.monitor.stop_requested = True
        self.thread.join(timeout=15)
        if self.monitor.connections is not None:
            self.monitor.connections.close()
        self.sub.close(0)
        self.pub.close(0)
        cancel_background_fits()


class ReplayThread:
    """`lhtstream.service.replay.replay` on a thread of this process, publishing on a real
    socket: for tests that inject what no command-line option offers (``skip``: seqs not
    to send, i.e. lost frames). ``wait`` returns its `ReplayStats` or raises its error;
    `stop` ends it as SIGTERM ends ``lhtstream replay``. A context manager."""

    def __init__(self, data: Any, endpoint: str, **kw: Any) -> None:
        from lhtstream.service.replay import replay

        self.stop_event = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.result = replay(data, endpoint, stop=self.stop_event, log=None, **kw)
            except BaseException as exc:  # handed to `wait`
                self.error = exc

        self.thread = threading.Thread(target=run, name="replay", daemon=True)
        self.thread.start()

    def wait(self, timeout: float) -> Any:
        self.thread.join(timeout=timeout)
        if self.thread.is_alive():
            raise TimeoutError(f"replay still running after {timeout} s")
        if self.error is not None:
            raise self.error
        return self.result

    def stop(self, timeout: float) -> Any:
        self.stop_event.set()
        return self.wait(timeout)

    def __enter__(self) -> ReplayThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(timeout=15)
