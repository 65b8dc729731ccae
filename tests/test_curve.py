"""CURVE across hosts (issue 11, item 6): keys from `lhtstream keys`, replay -> monitor ->
tap all encrypted and authenticated; a client without an admitted key gets nothing."""

from __future__ import annotations

import json
import shutil
import signal

import pytest

from lhtstream.io.curve import has_curve
from tests.processes import run_cli, tcp_endpoint

pytestmark = pytest.mark.skipif(not has_curve(), reason="libzmq built without CURVE")


def test_keys_replay_monitor_tap_over_curve(procs, tiny_dataset, tmp_path):
    keys = tmp_path / "keys"
    for name in ("camera", "monitor", "operator", "intruder"):
        done = run_cli("keys", keys, "--name", name)
        assert done.returncode == 0, done.stderr
        assert (keys / f"{name}.key").exists() and (keys / f"{name}.key_secret").exists()
    again = run_cli("keys", keys, "--name", "camera")
    assert again.returncode == 2 and "never overwritten" in again.stderr
    admitted_by_camera, admitted_by_monitor = tmp_path / "cam-clients", tmp_path / "mon-clients"
    admitted_by_camera.mkdir()
    admitted_by_monitor.mkdir()
    shutil.copy(keys / "monitor.key", admitted_by_camera)
    shutil.copy(keys / "operator.key", admitted_by_monitor)
    frames_ep, pub_ep = tcp_endpoint(), tcp_endpoint()
    mon = procs.cli("monitor", "--frames", frames_ep, "--publish", pub_ep,
                    "--journal", tmp_path / "journal.sqlite", "--status-interval", "0.2",
                    "--calibration-seconds", "0.2",
                    "--curve-secret", keys / "monitor.key_secret",
                    "--curve-server-key", keys / "camera.key",
                    "--curve-clients", admitted_by_monitor)
    mon.wait_for_stderr(r"ready in", timeout=120)
    operator = procs.cli("tap", "--endpoint", pub_ep, "--topic", "status/*/", "--json",
                         "--count", "200", "--timeout", "60",
                         "--curve-secret", keys / "operator.key_secret",
                         "--curve-server-key", keys / "monitor.key")
    intruder = procs.cli("tap", "--endpoint", pub_ep, "--json", "--timeout", "8",
                         "--curve-secret", keys / "intruder.key_secret",
                         "--curve-server-key", keys / "monitor.key")
    plain = procs.cli("tap", "--endpoint", pub_ep, "--json", "--timeout", "8")
    replay = procs.cli("replay", tiny_dataset, "--endpoint", frames_ep,
                       "--curve-secret", keys / "camera.key_secret",
                       "--curve-clients", admitted_by_camera)
    assert replay.wait(timeout=60) == 0, replay.stderr  # waited for the admitted monitor
    operator.wait_for_stdout(r'"frames": 600', timeout=30)  # 2 videos x 300 frames
    assert intruder.wait(timeout=30) == 0 and intruder.stdout == ""
    assert plain.wait(timeout=30) == 0 and plain.stdout == ""
    statuses = [json.loads(line) for line in operator.stdout.splitlines()]
    assert statuses[-1]["dropped"] == 0 and statuses[-1]["malformed"] == 0


@pytest.mark.parametrize("argv,reason", [
    (["tap", "--curve-server-key", "x.key"], "need --curve-secret"),
    (["tap", "--curve-secret", "missing.key_secret"], "cannot read CURVE key"),
    (["keys", "out", "--name", "../evil"], "key name '../evil'"),
])
def test_bad_curve_options_are_one_line_errors(tmp_path, argv, reason):
    done = run_cli(*argv, cwd=tmp_path, timeout=60)
    assert done.returncode == 2 and reason in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_curve_handshake_failures_are_named_by_the_monitor(procs, tmp_path):
    """Issue 20 item 6: with the wrong server key nothing was said, and a monitor not
    admitted logged "part above the size bound?; reconnecting". Now the handshake events
    name each: the publisher did not admit the key, or closed the handshake (wrong key)."""
    import zmq
    import zmq.auth
    from zmq.auth.thread import ThreadAuthenticator

    keys, admitted, monitor_clients = tmp_path / "keys", tmp_path / "admitted", tmp_path / "mc"
    for folder in (keys, admitted, monitor_clients):
        folder.mkdir()
    for name in ("camera", "monitor", "someone", "operator"):
        zmq.auth.create_certificates(str(keys), name)
    shutil.copy(keys / "someone.key", admitted)  # the camera admits someone, not the monitor
    shutil.copy(keys / "operator.key", monitor_clients)
    ctx = zmq.Context.instance()
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(admitted))
    camera = ctx.socket(zmq.PUB)
    camera.setsockopt(zmq.LINGER, 0)
    public, secret = zmq.auth.load_certificate(str(keys / "camera.key_secret"))
    camera.curve_secretkey, camera.curve_publickey, camera.curve_server = secret, public, True
    frames_ep = tcp_endpoint()
    camera.bind(frames_ep)
    try:
        for server_key, expected in (("camera.key", "did not admit this monitor's CURVE key"),
                                     ("someone.key", "closed the handshake")):
            mon = procs.cli("monitor", "--frames", frames_ep, "--publish", tcp_endpoint(),
                            "--journal", tmp_path / f"{server_key}.sqlite",
                            "--curve-secret", keys / "monitor.key_secret",
                            "--curve-server-key", keys / server_key,
                            "--curve-clients", monitor_clients, cwd=tmp_path)
            mon.wait_for_stderr(expected, timeout=120)
            mon.signal(signal.SIGTERM)
            assert mon.wait(timeout=30) == 0, mon.stderr
            assert "size bound" not in mon.stderr
    finally:
        camera.close(0)
        auth.stop()
