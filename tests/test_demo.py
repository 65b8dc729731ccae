"""The README's promises: `lhtstream demo` works and cleans up, the subscriber example
works against a real PUB, the Quick start and the option reference match the CLI."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq

from tests.processes import REPO_ROOT, _child_env, free_tcp_port

README = REPO_ROOT / "README.md"


def _alive(pid: int) -> bool:
    """True while /proc/pid exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.slow
def test_demo_reports_injected_faults_and_leaves_no_process(tmp_path):
    cache = tmp_path / "cache"
    proc = subprocess.run(
        [sys.executable, "-m", "lhtstream.cli", "demo", "--cache", str(cache), "--seconds", "5"],
        env=_child_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
    )
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:] + out[-3000:]
    # 5 s of footage: Type1/0001 (normal) and Type1/0002 with its power drop at frame ~1560
    assert re.search(r"Type1/0002\s+power_drop \(frame \d+\)\s+intensity_low after \d+ frames",
                     out), out
    assert re.search(r"Type1/0001\s+none", out), out
    assert re.search(r"frames handled: [\d,]+, lost: 0;", out), out
    assert (cache / "model.npz").is_file()
    pids = [int(p) for p in re.findall(r"pid (\d+)", out)]
    assert len(pids) == 2, out
    assert not [p for p in pids if _alive(p)], "demo left child processes running"
    # second run reuses the cache
    again = subprocess.run(
        [sys.executable, "-m", "lhtstream.cli", "demo", "--cache", str(cache), "--seconds", "1"],
        env=_child_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reused from" in again.stdout


def _section(title: str) -> str:
    text = README.read_text()
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"README has no '## {title}' section"
    return m.group(1)


def test_quick_start_is_the_two_commands():
    blocks = re.findall(r"```(?:bash)?\n(.*?)```", _section("Quick start"), re.S)
    assert len(blocks) == 1
    assert blocks[0].strip().splitlines() == [
        "pip install . && lhtstream demo",
        "pip install -e '.[test]' && pytest",
    ]


def test_readme_subscriber_example_receives_an_alarm(tmp_path):
    from lhtstream.protocol import encode

    code = re.search(r"```python\n(.*?)```", _section("Subscribing to alarms"), re.S).group(1)
    assert "lhtstream" not in code  # only pyzmq and msgpack
    script = tmp_path / "subscriber.py"
    script.write_text(code)
    endpoint = f"tcp://127.0.0.1:{free_tcp_port()}"
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(endpoint)
    child = subprocess.Popen([sys.executable, str(script), endpoint], env=_child_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(child.stdout), daemon=True)
        reader.start()
        deadline = time.monotonic() + 20
        while not lines and time.monotonic() < deadline and child.poll() is None:
            now = time.monotonic_ns()
            pub.send_multipart(encode("status", {
                "stream": "*", "t_ns": now, "frames": 1, "dropped": 0, "malformed": 0,
                "latency_us": {"p50": 1, "p99": 1, "p999": 1, "max": 1}, "uptime_s": 1.0}))
            pub.send_multipart(encode("alarm", {
                "stream": "ws1", "video": "0001", "type": 1, "frame": 42, "seq": 1,
                "t_frame_ns": now - 250_000, "t_alarm_ns": now, "kind": "stall",
                "state": "raise", "score": 5.5, "threshold": 4.0, "features": {"x": 1.0}}))
            time.sleep(0.1)
        assert child.poll() is None, child.stderr.read()
        assert lines, "the README subscriber printed nothing within 20 s"
        line = lines[0]
        assert line.startswith("raise stall ws1 Type1/0001 frame 42 score 5.50 (")
        late = float(re.search(r"\((\d+) us after the frame\)", line).group(1))
        assert late >= 250  # the alarm's frame was stamped 250 us before sending
    finally:
        child.kill()
        child.wait(timeout=10)
        pub.close(0)


def test_configuration_reference_lists_every_option():
    from lhtstream.cli import build_parser

    reference = _section("Configuration reference")
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, sp in sub.choices.items():
        if f"`{name}" not in reference:
            missing.append(name)
        for action in sp._actions:
            if action.help == argparse.SUPPRESS or action.dest == "help":
                continue
            for opt in action.option_strings:
                if f"`{opt}" not in reference:
                    missing.append(f"{name} {opt}")
    assert not missing, f"README configuration reference lacks: {missing}"
