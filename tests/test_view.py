"""`lhtstream view` against a live replay -> monitor: its state, /metrics, a real browser,
and that a stalled view costs the monitor and its other subscribers nothing.

One replay -> monitor -> view chain per module (the demo's data set and model, Type1
video 0002: a laser power drop from frame 1558, which must raise `intensity_low`).
The browser tests drive Debian's Chromium (`/usr/bin/chromium`, installed by
`.ci/run`) through Playwright; without a browser they skip and say why.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import signal
import socket
import time
import urllib.request

import msgpack
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.processes import ProcessGroup, Subscriber, ipc_endpoint, run_cli, wait_until

FAULT_TYPE, FAULT_VIDEO, FAULT_ALARM = 1, "0002", "intensity_low"
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
]


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def state(base: str) -> dict:
    return json.loads(get(base + "/api/state"))


@pytest.fixture(scope="module")
def bench_set(tmp_path_factory):
    from lhtstream.cli.bench import bench_data

    return bench_data(tmp_path_factory.mktemp("view-cache"))


@pytest.fixture(scope="module")
def live(bench_set, tmp_path_factory):
    """replay (looping the faulty video) -> monitor -> view; yields the endpoints and URL."""
    data, model = bench_set
    tmp = tmp_path_factory.mktemp("view")
    frames_ep, pub_ep = ipc_endpoint(tmp, "frames"), ipc_endpoint(tmp, "pub")
    journal = tmp / "journal.sqlite"
    with ProcessGroup() as procs:
        monitor = procs.cli("monitor", "--frames", frames_ep, "--publish", pub_ep,
                            "--model", model, "--journal", journal, "--status-interval", "0.5")
        monitor.wait_for_stderr(r"ready in", timeout=180)
        view = procs.cli("view", "--monitor", pub_ep, "--frames", frames_ep, "--model", model,
                         "--journal", journal, "--port", "0")
        port = int(view.wait_for_stderr(r"serving http://127\.0\.0\.1:(\d+)/", 60).group(1))
        # two frame subscribers: the monitor and the view
        replay = procs.cli("replay", data, "--endpoint", frames_ep, "--types", str(FAULT_TYPE),
                           "--videos", FAULT_VIDEO, "--loop", "--wait-subscribers", "2")
        base = f"http://127.0.0.1:{port}"
        yield {"base": base, "pub": pub_ep, "view": view, "monitor": monitor,
               "replay": replay, "model": str(model)}


def wait_for_alarm(base: str, kind: str, timeout: float = 30.0) -> dict:
    def found():
        s = state(base)
        return s if any(e.get("topic") == "alarm" and e.get("kind") == kind
                        for e in s["events"]) else None
    return wait_until(found, timeout, interval=0.2)


def test_state_shows_the_stream_its_path_evidence_and_the_faults_alarm(live):
    s = wait_for_alarm(live["base"], FAULT_ALARM)
    (ws1,) = [x for x in s["streams"] if x["name"] == "ws1"]
    assert ws1["type"] == FAULT_TYPE and ws1["video"] == FAULT_VIDEO
    assert ws1["state"] in ("normal", "alarm") and ws1["frames"] > 1000
    assert s["monitors"][0]["up"] is True
    # the spot path: 200 measured positions inside the 32x32 frame, and the model's curve
    path = wait_until(lambda: state(live["base"])["streams"][0]["path"], 10)
    xs = [x for x in path["x"] if x is not None]
    assert len(xs) > 150 and all(0 <= x < 32 for x in xs)
    assert path["normal"] is not None and len(path["normal"]["x"]) > 10
    # evidence: one series per alarm kind, one value per status (0.5 s) over ~10 s
    ev = wait_until(lambda: (e := state(live["base"])["streams"][0]["evidence"])["t"]
                    and len(e["t"]) >= 4 and e, 15)
    assert set(ev["kinds"]) == set(s["kinds"]) and FAULT_ALARM in ev["kinds"]
    assert all(-11 <= t <= 0 for t in ev["t"])
    assert all(len(v) == len(ev["t"]) for v in ev["kinds"].values())
    verdict_or_alarm = {e["topic"] for e in s["events"]}
    assert "alarm" in verdict_or_alarm


def test_responses_name_files_not_paths_on_the_views_host(live):
    """The model and the journal are named by file name only (no directory of the host)."""
    s = state(live["base"])
    assert s["model"] == live["model"].rsplit("/", 1)[1] and "/" not in s["model"]
    history = json.loads(get(live["base"] + "/api/history"))
    assert history["journal"] == "journal.sqlite"
    assert live["model"].rsplit("/", 1)[0] not in json.dumps(history)


def test_metrics_are_prometheus_text_with_the_monitors_own_counts(live):
    wait_for_alarm(live["base"], FAULT_ALARM)
    text = None
    with Subscriber(live["pub"], ["status"]) as sub:
        seen_frames = []  # ws1's frame count in its statuses around the scrape
        while len(seen_frames) < 6:
            header = msgpack.unpackb(sub.recv(timeout=5)[1])
            if header["stream"] == "ws1":  # the stream's own status (topic status/ws1/)
                seen_frames.append(header["frames"])
            if len(seen_frames) == 3:
                text = get(live["base"] + "/metrics").decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}

    def samples(name):
        return {tuple(sorted(s.labels.items())): s.value for s in families[name].samples
                if s.name == name or s.name == name + "_total"}

    assert families["lhtstream_frames"].type == "counter"
    frames = samples("lhtstream_frames")[(("stream", "ws1"),)]
    assert frames in seen_frames  # the monitor's own count, from one of its statuses
    assert samples("lhtstream_lost_frames")[(("stream", "ws1"),)] == 0
    assert samples("lhtstream_malformed_messages")[(("stream", "ws1"),)] == 0
    assert samples("lhtstream_alarms")[(("kind", FAULT_ALARM), ("stream", "ws1"))] >= 1
    latency = samples("lhtstream_handling_latency_seconds")
    p50 = latency[(("quantile", "0.5"), ("stream", "ws1"))]
    p99 = latency[(("quantile", "0.99"), ("stream", "ws1"))]
    assert 1e-6 < p50 <= p99 < 1.0  # seconds, not microseconds
    mode = samples("lhtstream_model_state")
    assert mode[(("state", "scoring"), ("stream", "ws1"))] == 1
    assert mode[(("state", "calibrating"), ("stream", "ws1"))] == 0
    assert list(samples("lhtstream_monitor_up").values()) == [1]


def test_a_stalled_view_costs_the_monitor_and_other_subscribers_nothing(live):
    """SIGSTOP the view for 3 s (it reads nothing: its queues fill, ZeroMQ drops for it):
    the monitor loses no frame, another subscriber gets every status on time, and the
    view catches up by itself afterwards."""
    view = live["view"]
    wait_for_alarm(live["base"], FAULT_ALARM)
    with Subscriber(live["pub"], ["status"]) as sub:
        first = msgpack.unpackb(sub.recv(timeout=5)[1])
        view.signal(signal.SIGSTOP)
        try:
            arrivals, statuses = [], []
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:
                try:
                    header = msgpack.unpackb(sub.recv(timeout=1.0)[1])
                except TimeoutError:
                    continue
                arrivals.append(time.monotonic())
                statuses.append(header)
        finally:
            view.signal(signal.SIGCONT)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    assert len(statuses) >= 5 and max(gaps) < 1.0  # every 0.5 s, none held back
    last = statuses[-1]
    assert last["dropped"] == first["dropped"] == 0
    assert last["frames"] - first["frames"] > 2500  # ~1000 frames/s went on being handled
    # the view is back: its copy of the monitor's status is fresh again
    wait_until(lambda: state(live["base"])["monitors"][0]["age_s"] < 1.0, 10, interval=0.2)


# ---------------------------------------------------------------- in a real browser


@pytest.fixture(scope="module")
def browser():
    path = chromium_path()
    if path is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium; CI installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=CHROMIUM_FLAGS)
        yield b
        b.close()


PAGE_STATS = """async (src) => {
  const img = new Image();
  img.src = src;
  await img.decode();
  const c = document.createElement("canvas");
  c.width = img.width; c.height = img.height;
  const ctx = c.getContext("2d");
  ctx.drawImage(img, 0, 0);
  const d = ctx.getImageData(0, 0, c.width, c.height).data;
  const colours = new Set();
  let differing = 0;
  for (let i = 0; i < d.length; i += 4 * 7) {
    colours.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
    if (d[i] !== d[0] || d[i + 1] !== d[1] || d[i + 2] !== d[2]) differing++;
  }
  return { colours: colours.size, differing: differing / (d.length / 28),
           width: c.width, height: c.height };
}"""


def test_the_page_in_chromium_shows_the_streams_heat_map_path_and_the_faults_alarm(
        live, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    failed: list[str] = []
    page.on("requestfailed", lambda req: failed.append(req.url))
    page.goto(live["base"] + "/")
    # the injected fault's alarm kind appears in the stream's alarm log
    page.wait_for_selector(f".alarm-log tr.raise td.kind:text-is('{FAULT_ALARM}')",
                           timeout=30_000)
    row = page.locator("#overview tr[data-stream='ws1']")
    # the faulty video raises image evidence a frame after intensity_low (offline too)
    badge = row.locator(".badge").inner_text()
    assert badge == "normal" or (badge.startswith("ALARM ")
                                 and FAULT_ALARM in badge[6:].split(", ")), badge
    assert "T1/0002" in row.inner_text()
    # the heat map is drawn: the canvas has dark and bright pixels
    heat = page.evaluate("""() => {
      const c = document.querySelector('#stream-ws1 canvas.heat');
      const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
      let bright = 0, dark = 0;
      for (let i = 0; i < d.length; i += 4) {
        const v = d[i] + d[i + 1] + d[i + 2];
        if (v > 300) bright++; else if (v < 30) dark++;
      }
      return { bright, dark, w: c.width, h: c.height };
    }""")
    assert heat["bright"] > 0 and heat["dark"] > 0 and heat["w"] > 1
    # the path chart has both traces: the model's normal path and the measured spot
    page.wait_for_function("document.querySelectorAll('#stream-ws1 .path .trace').length >= 2",
                           timeout=10_000)
    shot = tmp_path / "view.png"
    page.screenshot(path=str(shot), full_page=True)
    src = "data:image/png;base64," + base64.b64encode(shot.read_bytes()).decode()
    stats = page.evaluate(PAGE_STATS, src)
    assert stats["width"] == 1280 and stats["height"] >= 900
    assert stats["colours"] > 50 and stats["differing"] > 0.05, stats  # not a blank page
    assert errors == [] and failed == []  # no script error, nothing fetched from elsewhere
    # the history view (from the journal): a chart for ws1 once an alarm was journaled
    page.click("#tab-history")
    page.wait_for_selector("#history-charts .hchart[data-stream='ws1'] .trace",
                           timeout=15_000)
    assert "per " in page.inner_text("#history-note")
    page.close()


def test_every_request_of_the_page_stays_on_the_view(live, browser):
    """No CDN: every URL the page loads is the view's own; and the page works under the
    view's Content-Security-Policy (Chromium reports no violation)."""
    page = browser.new_page()
    urls: list[str] = []
    page.on("request", lambda req: urls.append(req.url))
    violations: list[str] = []
    page.on("console", lambda msg: violations.append(msg.text)
            if "Content Security Policy" in msg.text else None)
    page.goto(live["base"] + "/")
    page.wait_for_selector("#overview tr[data-stream='ws1']", timeout=20_000)
    page.wait_for_function("document.querySelectorAll('#stream-ws1 .path .trace').length >= 2",
                           timeout=10_000)
    page.close()
    assert violations == []
    assert urls and all(re.match(re.escape(live["base"]) + r"/|ws://127\.0\.0\.1", u)
                        or u.startswith("data:") for u in urls), urls


def test_view_refuses_a_bad_model_and_a_busy_port_with_one_line(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a model")
    out = run_cli("view", "--model", bad, "--port", "0", timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "bad.npz" in out.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = run_cli("view", "--port", port, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"127.0.0.1:{port}" in out.stderr


def test_demo_prints_the_views_address_and_serves_it_while_it_runs(bench_set):
    cache = bench_set[0].parent  # the demo's own cache layout (live/, model.npz)
    with ProcessGroup() as procs:
        demo = procs.cli("demo", "--cache", cache, "--seconds", "6", "--view-port", "0")
        url = demo.wait_for_stdout(r"live view at (http://127\.0\.0\.1:\d+/)", 120).group(1)
        assert b"lhtstream view" in get(url)
        streams = wait_until(lambda: state(url.rstrip("/"))["streams"], 30, interval=0.2)
        assert streams[0]["name"] == "ws1"
        assert demo.wait(timeout=120) == 0
    with pytest.raises(OSError):  # stopped with the demo
        get(url, timeout=2)


def _stalled_page(port: int) -> socket.socket:
    """A WebSocket page that completes the handshake and then never reads again."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(b"0123456789abcdef").decode()
    sock.sendall(f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                 "Sec-WebSocket-Version: 13\r\n\r\n".encode())
    assert sock.recv(12).startswith(b"HTTP/1.1 101")
    return sock


def test_a_page_that_stops_reading_drops_pictures_and_holds_up_no_other_page(live):
    from lhtstream.cli.bench import PageReader

    base = live["base"]
    port = int(base.rsplit(":", 1)[1])
    stalled = _stalled_page(port)
    reader = PageReader(base + "/ws")
    try:
        wait_until(lambda: reader.pictures > 0, 10)
        pictures, t0 = reader.pictures, time.monotonic()
        time.sleep(10.0)  # the stalled page's buffers (~200 KB at ~35 KB/s) fill meanwhile
        rate = (reader.pictures - pictures) / (time.monotonic() - t0)
        pages = state(base)["pages"]
    finally:
        reader.stop()
        stalled.close()
    assert reader.error is None
    assert rate >= 15, f"a reading page got {rate:.1f} pictures/s beside a stalled one"
    assert len(pages) == 2
    assert max(p["pictures_dropped"] for p in pages) > 25  # the stalled page is skipped ...
    assert min(p["pictures_dropped"] for p in pages) < 10  # ... the reading one is not


def test_bad_messages_from_a_monitor_are_counted_and_the_view_keeps_serving(tmp_path):
    """A peer on the monitor endpoint sends garbage, and valid messages with fields of
    the wrong type or size: the view counts what it cannot use and keeps serving."""
    import zmq

    from lhtstream.io.protocol import encode

    endpoint = ipc_endpoint(tmp_path, "fake-monitor")
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.bind(endpoint)
    status = {"stream": "*", "t_ns": 1, "frames": 10, "dropped": 0, "malformed": 0,
              "latency_us": {"p50": 1.0, "p99": 2.0, "p999": 3.0, "max": 4.0}, "uptime_s": 1.0,
              "model": "x" * 5000,
              "streams": {"ws9": {"frames": "many", "video": 7, "latency_us": [],
                                  "pipeline": {"mode": "scoring", "alarms_active": ["k"] * 500,
                                               "evidence": {"stall": "high", "sensor": 0.5,
                                                            "made_up": 2.0}}}}}
    alarm = {"stream": "ws9", "video": "0001", "type": 1, "frame": 5, "seq": 1,
             "t_frame_ns": 1, "t_alarm_ns": 2, "kind": "no_such_kind", "state": "raise",
             "score": float("nan"), "threshold": 1.0, "features": {}}
    try:
        with ProcessGroup() as procs:
            view = procs.cli("view", "--monitor", endpoint, "--port", "0")
            port = int(view.wait_for_stderr(r"serving http://127\.0\.0\.1:(\d+)/", 60).group(1))
            base = f"http://127.0.0.1:{port}"

            def send_all():
                pub.send_multipart([b"status/*/", b"\xc1not msgpack"])
                pub.send_multipart([b"status/ws9/", b"\x80"])  # an empty map: no field
                pub.send_multipart(encode("status", status))
                pub.send_multipart(encode("alarm", alarm))
                # a video name beyond the protocol's bound: rejected by decode, counted
                pub.send_multipart([b"alarm/ws9/", msgpack.packb({**alarm, "v": 2,
                                                                  "video": "v" * 3000})])
                # Rounds until one got through whole: the subscription may reach the
                # publisher mid-round (the round's first messages then never leave it),
                # and the view may not have read the round's last message yet.
                now = state(base)
                return now["streams"] if now["malformed"] >= 3 else None

            streams = wait_until(send_all, 20, interval=0.3)
            s = state(base)
            assert s["malformed"] >= 3 and view.returncode is None
            (ws9,) = streams
            assert ws9["frames"] is None and ws9["video"] is None  # wrong types: not shown
            assert ws9["word"] == "ALARM other"  # an unknown kind, kept as "other"
            assert len(s["monitors"][0]["model"]) <= 200
            e = wait_until(lambda: [x for x in state(base)["events"] if x["topic"] == "alarm"], 5)
            assert e[0]["kind"] == "other" and e[0]["score"] is None
            assert all(x["video"] == "0001" for x in e)  # the oversized one never got in
            ev = state(base)["streams"][0]["evidence"]["kinds"]
            assert "made_up" not in ev and ev["sensor"][-1] == 0.5 and ev["stall"][-1] is None
            text = get(base + "/metrics").decode()
            assert 'lhtstream_monitor_up{monitor="' in text
            assert 'lhtstream_frames_total{stream="ws9"}' not in text  # "many" is no count
            # the monitor evicts the silent stream: the view forgets it
            last = {**status, "stream": "ws9", "evicted": True, "model": "m"}
            del last["streams"]
            wait_until(lambda: pub.send_multipart(encode("status", last))
                       or not state(base)["streams"], 10, interval=0.3)
    finally:
        pub.close(0)


# ---------------------------------------------------------------- the server's own defences


ALLOWED_EXTRA = "view.plant.example"


@pytest.fixture(scope="module")
def bare_view(tmp_path_factory):
    """A view on a port of its own with no monitor behind it: the HTTP server alone."""
    tmp = tmp_path_factory.mktemp("bare-view")
    with ProcessGroup() as procs:
        view = procs.cli("view", "--monitor", ipc_endpoint(tmp, "nobody"), "--port", "0",
                         "--allow-host", ALLOWED_EXTRA)
        port = int(view.wait_for_stderr(r"serving http://127\.0\.0\.1:(\d+)/", 60).group(1))
        yield {"port": port, "view": view}


def raw_request(port: int, head: str, timeout: float = 5.0) -> tuple[int, dict, bytes]:
    """Send ``head`` (request line and headers, no blank line) and read the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall((head + "\r\nConnection: close\r\n\r\n").encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    top, _, body = data.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip()
               for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def ws_handshake(port: int, origin: str | None, host: str | None = None) -> int:
    key = base64.b64encode(b"0123456789abcdef").decode()
    head = (f"GET /ws HTTP/1.1\r\nHost: {host or f'127.0.0.1:{port}'}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13")
    if origin is not None:
        head += f"\r\nOrigin: {origin}"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall((head + "\r\n\r\n").encode())
        return int(sock.recv(64).split()[1])


def test_the_view_answers_only_the_host_names_it_serves(bare_view):
    """DNS rebinding: a page of evil.example whose name now resolves to 127.0.0.1 sends
    ``Host: evil.example``; the view refuses it, and any malformed Host."""
    port = bare_view["port"]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "LOCALHOST",
                 f"{ALLOWED_EXTRA}:{port}"):
        status, _, body = raw_request(port, f"GET /api/state HTTP/1.1\r\nHost: {host}")
        assert status == 200 and json.loads(body)["monitors"], host
    for host in (f"evil.example:{port}", "127.0.0.1.evil.example", f"127.0.0.1:{port}; x",
                 "", "[::2]", "10.0.0.1"):
        status, _, body = raw_request(port, f"GET /api/state HTTP/1.1\r\nHost: {host}")
        assert status == 421, (host, status)
        assert b"monitors" not in body
    status, _, _ = raw_request(port, "GET /api/state HTTP/1.1")  # no Host at all
    assert status in (400, 421)
    assert ws_handshake(port, None, host="evil.example") == 421


def test_a_websocket_from_a_page_of_another_origin_is_refused(bare_view):
    port = bare_view["port"]
    assert ws_handshake(port, f"http://127.0.0.1:{port}") == 101  # the view's own page
    assert ws_handshake(port, None) == 101  # not a browser: nothing to protect there
    for origin in ("http://evil.example", f"http://evil.example:{port}", "null",
                   f"http://localhost:{port}", f"file://127.0.0.1:{port}"):
        assert ws_handshake(port, origin) == 403, origin


def test_every_response_carries_the_security_headers_and_no_version_or_path(bare_view):
    port = bare_view["port"]
    host = f"Host: 127.0.0.1:{port}"
    for path in ("/", "/api/state", "/api/history", "/metrics", "/static/view.js",
                 "/static/plotly.min.js", "/static/none.js", "/static/..%2f..%2fparser.py",
                 "/nowhere"):
        status, headers, body = raw_request(port, f"GET {path} HTTP/1.1\r\n{host}")
        assert headers["x-content-type-options"] == "nosniff", path
        assert headers["x-frame-options"] == "DENY"
        assert headers["referrer-policy"] == "no-referrer"
        csp = dict(d.strip().split(" ", 1) for d in headers["content-security-policy"].split(";"))
        assert csp["default-src"] == "'self'" and csp["frame-ancestors"] == "'none'"
        assert "script-src" not in csp  # scripts: 'self' only, no inline, no eval
        assert f"ws://127.0.0.1:{port}" in csp["connect-src"].split()
        assert not re.search(r"\d", headers.get("server", "")), headers.get("server")
        assert "python" not in headers.get("server", "").lower()
        if status != 200:
            assert status == 404, path
            assert b"/" not in body and b"site-packages" not in body  # no file path
    _, headers, _ = raw_request(port, f"GET / HTTP/1.1\r\nHost: evil.example:{port}")
    assert headers["x-frame-options"] == "DENY" and "aiohttp" not in str(headers).lower()
    assert "evil" not in headers["content-security-policy"]


def test_slow_idle_and_surplus_connections_are_dropped_within_a_bound(bare_view):
    """Slowloris: a client that sends its headers a byte at a time, one that sends
    nothing, and one idle after a request are each closed within ~IDLE_S (5 s); past
    64 connections the view answers 503 at once; afterwards it serves again."""
    port = bare_view["port"]
    head = f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Slow: ".encode()
    slow = socket.create_connection(("127.0.0.1", port))
    silent = socket.create_connection(("127.0.0.1", port))
    idle = socket.create_connection(("127.0.0.1", port))
    idle.sendall(f"GET /api/state HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    assert idle.recv(12).startswith(b"HTTP/1.1 200")
    surplus = [socket.create_connection(("127.0.0.1", port)) for _ in range(70)]
    t0 = time.monotonic()
    closed: dict[str, float] = {}
    try:
        # a bound on connections: the ones past 64 are answered 503 and closed at once
        answers = []
        for sock in surplus[-10:]:
            sock.settimeout(3)
            answers.append(sock.recv(64))
        assert all(a.startswith(b"HTTP/1.1 503") for a in answers), answers
        for sock in (slow, silent, idle, *surplus[:-10]):
            sock.setblocking(False)
        names = {"slow": slow, "silent": silent, "idle": idle}
        sent = 0
        while len(closed) < 3 and time.monotonic() - t0 < 15:
            try:
                slow.send(head[sent:sent + 1] if sent < len(head) else b"x")
                sent += 1
            except OSError:
                closed.setdefault("slow", time.monotonic() - t0)
            for name, sock in names.items():
                try:
                    if sock.recv(65536) == b"":
                        closed.setdefault(name, time.monotonic() - t0)
                except BlockingIOError:
                    pass
                except OSError:
                    closed.setdefault(name, time.monotonic() - t0)
            time.sleep(0.25)
        assert set(closed) == {"slow", "silent", "idle"}, closed
        assert max(closed.values()) < 9.0, closed  # IDLE_S 5 s, swept every 1 s
        # the held connections were dropped as well: the view answers again
        status, _, _ = wait_until(lambda: _try_state(port), 10, interval=0.5)
        assert status == 200
    finally:
        for sock in (slow, silent, idle, *surplus):
            sock.close()
    assert bare_view["view"].returncode is None


def _try_state(port: int):
    try:
        answer = raw_request(port, f"GET /api/state HTTP/1.1\r\nHost: 127.0.0.1:{port}")
    except OSError:
        return None
    return answer if answer[0] == 200 else None


def test_implausible_latencies_are_shown_as_missing(tmp_path):
    """A status whose latency comes from a forged t_ns (0 or INT64_MAX: -9.2e15 us) is
    no measurement: the page and /metrics show none, not -9.2e15."""
    import zmq

    from lhtstream.io.protocol import encode

    endpoint = ipc_endpoint(tmp_path, "fake-monitor")
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.bind(endpoint)
    status = {"stream": "*", "t_ns": 1, "frames": 10, "dropped": 0, "malformed": 0,
              "latency_us": {"p50": -9.2e15, "p99": 9.2e15, "p999": 250.0, "max": 300.0},
              "uptime_s": 1.0, "model": "m",
              "streams": {"ws1": {"frames": 10, "latency_us": {"p50": -9.2e15, "p99": 120.0,
                                                               "p999": 9.2e15, "max": 9.2e15}}}}
    try:
        with ProcessGroup() as procs:
            view = procs.cli("view", "--monitor", endpoint, "--port", "0")
            port = int(view.wait_for_stderr(r"serving http://127\.0\.0\.1:(\d+)/", 60).group(1))
            base = f"http://127.0.0.1:{port}"
            s = wait_until(lambda: pub.send_multipart(encode("status", status))
                           or (st := state(base))["streams"] and st, 20, interval=0.3)
            assert s["monitors"][0]["latency_us"] == {"p50": None, "p99": None, "p999": 250.0,
                                                      "max": 300.0}
            assert s["streams"][0]["latency_us"] == {"p50": None, "p99": 120.0, "p999": None,
                                                     "max": None}
            text = get(base + "/metrics").decode()
            assert 'quantile="0.99",stream="ws1"} 0.00012' in text
            assert "e+09" not in text and "e+15" not in text and "-9.2" not in text
    finally:
        pub.close(0)
