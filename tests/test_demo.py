"""The README's promises: `lhtstream demo` works and cleans up, the subscriber example
works against a real PUB, the Quick start and the option reference match the CLI."""

from __future__ import annotations

import argparse
import os
import re
import signal
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
    assert re.search(r"Type1/0002\s+power_drop \(\d+\)\s+intensity_low after \d+ frames",
                     out), out
    assert re.search(r"Type1/0001\s+none\s+-\s+none\s+normal", out), out
    assert re.search(r"frames handled: [\d,]+, lost: 0;", out), out
    assert "alarms on normal footage" not in out
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


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    """The demo's data and model, prepared once in-process (what the first run does)."""
    from lhtstream.cli.demo import prepare

    cache = tmp_path_factory.mktemp("demo-cache")
    prepare(cache, quiet=True)
    return cache


@pytest.mark.slow
def test_demo_ctrl_c_stops_children_and_exits_130(demo_cache):
    proc = subprocess.Popen(
        [sys.executable, "-m", "lhtstream.cli", "demo", "--cache", str(demo_cache)],
        env=_child_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180
        while not any("frames are flowing" in line for line in lines):
            assert proc.poll() is None, "".join(lines) + proc.stderr.read()
            assert time.monotonic() < deadline, "demo never started streaming:\n" + "".join(lines)
            time.sleep(0.05)
        time.sleep(1.0)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        t0 = time.monotonic()
        proc.wait(timeout=15)
        elapsed = time.monotonic() - t0
        reader.join(timeout=5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    out = "".join(lines)
    assert proc.returncode == 130, out + proc.stderr.read()
    assert elapsed < 8.0, f"demo took {elapsed:.1f} s to stop after SIGINT"
    assert "partial summary" in out, out
    handled = re.search(r"frames handled: ([\d,]+)", out)
    assert handled and int(handled[1].replace(",", "")) > 0, out
    assert re.search(r"Type1/0001\s+none", out), out  # the first video was summarised
    pids = {name: int(pid) for name, pid in re.findall(r"demo: (monitor|replay) pid (\d+)", out)}
    assert set(pids) == {"monitor", "replay"}, out
    assert not [p for p in pids.values() if _alive(p)], f"children left running: {pids}"
    folder = Path(re.search(r"over ipc://(\S+)/frames", out)[1])
    assert not folder.exists() or not any(p.is_socket() for p in folder.iterdir()), \
        f"ipc sockets left in {folder}"


def test_demo_cache_is_rebuilt_when_stale(tmp_path, monkeypatch):
    from lhtstream.cli import demo
    from lhtstream.io.simulate import params
    from lhtstream.model.normality import NormalityModel

    # a smaller set keeps this fast; changing SETTINGS is itself a cache change
    monkeypatch.setitem(demo.SETTINGS, "train_videos_per_type", 3)
    monkeypatch.setitem(demo.SETTINGS, "train_frames", 1500)
    monkeypatch.setitem(demo.SETTINGS, "live_videos_per_type", 1)
    monkeypatch.setitem(demo.SETTINGS, "live_frames", 600)
    monkeypatch.setitem(demo.SETTINGS, "types", [1])
    cache = tmp_path / "cache"
    assert not demo.prepare(cache, quiet=True).reused
    video = cache / "live" / "Type1" / "0001.npz"
    first = video.read_bytes()
    assert demo.prepare(cache, quiet=True).reused

    # a model that no longer loads (e.g. an older format) is retrained, data kept
    (cache / "model.npz").write_bytes(b"not a model")
    mtime = video.stat().st_mtime_ns
    assert not demo.prepare(cache, quiet=True).reused
    assert video.stat().st_mtime_ns == mtime
    NormalityModel.load(cache / "model.npz")  # the retrained one loads
    assert demo.prepare(cache, quiet=True).reused

    # a recalibrated simulator parameter makes the cached videos stale
    monkeypatch.setattr(params, "VIDEO_AMPLITUDE_REL", params.VIDEO_AMPLITUDE_REL * 1.5)
    assert not demo.prepare(cache, quiet=True).reused
    assert video.read_bytes() != first
    assert demo.prepare(cache, quiet=True).reused


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
    from lhtstream.io.protocol import encode

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
