"""Every CLI option is validated: one line on stderr, exit code 2, never a traceback."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from pathlib import Path

import pytest

from lhtstream.cli.parser import main
from tests.processes import run_cli

BAD = [
    (["demo", "--seconds", "0"], "--seconds"),
    (["demo", "--seconds", "inf"], "finite"),
    (["synth", "out", "--videos-per-type", "0"], "--videos-per-type"),
    (["synth", "out", "--frames", "-3"], "--frames"),
    (["synth", "out", "--frames", "1e9"], "not an integer"),
    (["synth", "out", "--anomaly-rate", "1.5"], "--anomaly-rate"),
    (["synth", "out", "--seed", "-1"], "--seed"),
    (["synth", "out", "--types", "0"], "types are 1..36"),
    (["synth", "out", "--types", "1-99999999999"], "types are 1..36"),
    (["replay", "data", "--rate", "0"], "--rate"),
    (["replay", "data", "--rate", "fast"], "not a number"),
    (["replay", "data", "--streams", "0"], "--streams"),
    (["replay", "data", "--streams", "100000"], "--streams"),
    (["replay", "data", "--wait-subscribers", "-1"], "--wait-subscribers"),
    (["replay", "data", "--endpoint", "localhost:5555"], "not a ZeroMQ endpoint"),
    (["monitor", "--calibration-seconds", "0"], "--calibration-seconds"),
    (["monitor", "--calibration-seconds", "nan"], "finite"),
    (["monitor", "--status-interval", "0"], "--status-interval"),
    (["monitor", "--status-interval", "1e9"], "--status-interval"),
    (["monitor", "--max-streams", "0"], "--max-streams"),
    (["monitor", "--idle-seconds", "0.1"], "--idle-seconds"),
    (["monitor", "--streams", "a b"], "stream name 'a b'"),
    (["monitor", "--streams", ","], "names no stream"),
    (["monitor", "--frames", "tcp//x"], "not a ZeroMQ endpoint"),
    (["monitor", "--publish", ""], "not a ZeroMQ endpoint"),
    (["tap", "--count", "0"], "--count"),
    (["tap", "--timeout", "-1"], "--timeout"),
    (["alarms", "--count", "x"], "not an integer"),
    (["alarms", "--timeout", "0"], "--timeout"),
    (["train", "data", "-o", "m.npz", "--types", "37"], "types are 1..36"),
    (["evaluate", "data", "--model", "m.npz", "--types", "x"], "bad type selection"),
    (["bench", "--seconds", "-5"], "--seconds"),
    (["view", "--port", "70000"], "--port"),
    (["view", "--monitor", "localhost:5556"], "not a ZeroMQ endpoint"),
    (["view", "--frames", "5555"], "not a ZeroMQ endpoint"),
    (["demo", "--view-port", "-1"], "--view-port"),
]


@contextmanager
def _refused_within(seconds: int):
    """An option the parser wrongly accepts starts the command (a monitor serves forever):
    fail the test after ``seconds`` instead of hanging the suite."""

    def expired(signum, frame):
        raise AssertionError(f"not refused: the command was still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("argv,reason", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_option_gives_one_line_and_exit_2(argv, reason, capsys):
    with _refused_within(20), pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lhtstream {argv[0]}: error:"), err
    assert reason in lines[0]
    assert "Traceback" not in err


def test_bad_option_as_a_real_process():
    """The hostile input from issue 11: before, a ZeroDivisionError traceback."""
    done = run_cli("monitor", "--calibration-seconds", "0", timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "lhtstream monitor: error: argument --calibration-seconds: 0 is out of range "
        "(allowed: 0.2..120) (see lhtstream monitor --help)"
    ]


@pytest.mark.parametrize("command, delay, launcher", [
    ("monitor", 0.15, "module"), ("monitor", 0.15, "script"), ("monitor", 0.3, "module"),
    ("monitor", 0.8, "module"), ("view", 0.3, "module")])
def test_sigterm_during_start_up_exits_0_with_a_line(tmp_path, command, delay, launcher):
    """`python -m lhtstream.cli` and the `lhtstream` script stop on SIGTERM at any moment of
    their start-up (imports of numpy, ZeroMQ, Numba: before a service has its own handler)
    with exit 0 and a line, not killed without a word (issue 20 item 6). At 0.15 s the
    command is still importing the parser: the handler must come before that."""
    import shutil
    import subprocess
    import sys
    import time

    from tests.processes import _child_env, ipc_endpoint

    args = {"monitor": ["monitor", "--frames", ipc_endpoint(tmp_path), "--publish",
                        ipc_endpoint(tmp_path, "pub"), "--journal", str(tmp_path / "j.sqlite")],
            "view": ["view", "--monitor", ipc_endpoint(tmp_path, "pub"), "--port", "0"]}
    script = shutil.which("lhtstream", path=str(Path(sys.executable).parent))
    if launcher == "script" and script is None:
        pytest.skip("no `lhtstream` script beside this interpreter (package not installed)")
    start = [script] if launcher == "script" else [sys.executable, "-m", "lhtstream.cli"]
    child = subprocess.Popen([*start, *args[command]],
                             cwd=tmp_path, env=_child_env(), stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    assert "stop" in err and "Traceback" not in err


def test_the_command_package_imports_nothing_heavy_before_its_signal_handler():
    """The console script and `python -m lhtstream.cli` import `lhtstream.cli` before any
    handler can be installed: it must not pull in numpy, ZeroMQ or Numba (0.1-1 s during
    which a SIGTERM killed the process without a word). A fresh interpreter shows it."""
    import subprocess
    import sys

    from tests.processes import _child_env

    probe = ("import sys, lhtstream.cli; "
             "print(sorted(m for m in ('numpy', 'zmq', 'numba', 'msgpack') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], env=_child_env(), capture_output=True,
                         text=True, timeout=60, check=True).stdout.strip()
    assert out == "[]"
