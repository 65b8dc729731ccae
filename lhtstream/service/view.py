"""The live view's service (``lhtstream view``): a web page of the monitors and their
streams, and ``/metrics``. The CLI (cli/view.py) parses options and calls `serve`.

A separate process, so it can never slow a monitor: it is one more subscriber of the
monitors' ``status``/``alarm``/``verdict`` topics and of the frame stream. ZeroMQ PUB
sockets drop for a subscriber whose queue is full, so a view that falls behind loses
its own messages, never anyone else's; and the view itself decodes only the newest
frame of each stream for pictures, plus a burst of consecutive frames once a second
for the spot's path, and skips the rest undecoded (the stream is in the topic).

Threads: one receive thread owns every ZeroMQ socket and updates a `ViewState` under
a lock; the HTTP/WebSocket server (aiohttp) runs an asyncio loop in the main thread and
sends each page ~25 pictures/s and ~4 state updates/s. A page whose connection cannot
take a picture yet (its send buffer is still full) skips that picture: a slow page
drops pictures, it never delays the receive thread nor other pages. Drawing is done
by the browser (Plotly.js, served from the installed ``plotly`` package, and a canvas
for the 32x32 heat map).

Endpoints: ``/`` the page, ``/ws`` its WebSocket, ``/api/state`` the same state as JSON,
``/api/history`` alarms per kind and stream over time from ``--journal``, ``/metrics``
the monitors' counters in the Prometheus text format (``prometheus-client``).

What the view trusts, and what it refuses (issue 20): it shows whatever the peers on its
monitor and frame endpoints send (bounded, checked, never executed), and anyone who can
open its HTTP port may read the line: there is no login, and nothing can be changed
through it. It answers only requests whose ``Host`` is a name it serves (the loopback
names, the bound address, ``--allow-host`` names), so a web page cannot reach it through
DNS rebinding; it accepts a WebSocket only from a page of its own origin; every response
carries a Content-Security-Policy that allows nothing outside the view, refuses framing,
and names no server version. It holds at most `MAX_CONNECTIONS` connections and closes
one that has no request in progress after `IDLE_S` (slow headers, idle keep-alive).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import ipaddress
import json
import os
import re
import signal
import socket
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp import WSMsgType, web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from lhtstream.io.journal import JournalError
from lhtstream.model.normality import NormalityModel
from lhtstream.service.view_state import (
    MonitorCollector,
    NormalPaths,
    Receiver,
    ViewError,
    ViewState,
    journal_history,
    log,
)

PICTURE_HZ = 25
"""Heat-map pictures sent per second and stream (the newest frame each time)."""
STATE_EVERY = 6
"""Picture ticks per state update (25 / 6: ~4 updates/s of tables, strips and paths)."""
MAX_PAGES = 32
"""Simultaneous page connections; more are refused with 503."""
PAGE_SEND_BUFFER = 32 * 1024
"""Kernel send buffer per page (bytes; the kernel doubles it): ~2 s of a one-stream page's
traffic, ample for a 100 ms round trip at that rate. A page that stops reading is skipped
(pictures dropped for it) once this, its own receive buffer and aiohttp's are full."""
VIEW_NICENESS = 10
"""The view runs at this CPU niceness, so the scheduler prefers the monitor over it."""
MAX_CONNECTIONS = 64
"""Simultaneous TCP connections (pages, scrapes, API calls). More are answered 503 and
closed at once, so connections held open cannot use up the view's file descriptors."""
IDLE_S = 5.0
"""A connection with no request in progress for this long is closed: one that sends its
headers slowly (slowloris), never sends them, or idles in keep-alive. A page's WebSocket
is a request in progress; its heartbeat (`HEARTBEAT_S`) drops a page that stops answering."""
HEARTBEAT_S = 10.0
"""WebSocket ping period; a page that does not answer within half of it is closed."""
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
"""Host names the view always answers to."""
_WILDCARD = ("", "0.0.0.0", "::")
_NAME = re.compile(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?")
_HOST = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9.-]+)(?::[0-9]{1,5})?")
_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
_CSP = ("default-src 'self'; connect-src 'self'{ws}; img-src 'self' data: blob:; "
        # Plotly.js sets inline styles on the elements it draws
        "style-src 'self' 'unsafe-inline'; object-src 'none'; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'none'")
_PICTURE_MAGIC = 1
_STATIC = "view_static"


# ---------------------------------------------------------------- the web server


def _plotly_js() -> Path:
    """plotly.js as shipped inside the installed ``plotly`` Python package (no CDN)."""
    spec = importlib.util.find_spec("plotly")
    if spec is None or spec.origin is None:
        raise ViewError("the plotly package is missing: pip install plotly")
    path = Path(spec.origin).parent / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise ViewError(f"plotly.js not found in the plotly package ({path})")
    return path


def allowed_hosts(bind: str, extra: Sequence[str] = ()) -> frozenset[str]:
    """The ``Host`` names the view answers to: the loopback names, the address it is bound
    to (unless a wildcard) and ``extra`` (``--allow-host``: names and addresses by which the
    plant's browsers reach it). IPv6 addresses in brackets, as in a ``Host`` header."""
    names = set(LOOPBACK_NAMES)
    for raw in ([] if bind in _WILDCARD else [bind]) + list(extra):
        name = raw.strip().lower().strip("[]").rstrip(".")
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            if not _NAME.fullmatch(name):
                raise ViewError(f"{raw!r} is not a host name or an IP address (no port, "
                                "no scheme)") from None
        else:
            name = f"[{address.compressed}]" if address.version == 6 else address.compressed
        names.add(name)
    return frozenset(names)


def host_name(header: str | None) -> str | None:
    """The name in a ``Host`` header (port dropped, lower case), None if malformed."""
    match = _HOST.fullmatch((header or "").lower())
    return match.group(1).rstrip(".") if match else None


def same_origin(origin: str, host: str) -> bool:
    """Whether a browser's ``Origin`` is the page's own: http(s) and the same host:port."""
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and parts.netloc.lower() == host.lower()


class _Refuse(asyncio.Protocol):
    """A connection over `MAX_CONNECTIONS`: answered 503 and closed, nothing read."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                        b"Connection: close\r\n\r\n")
        transport.close()


class Connections:
    """The view's TCP protocol factory, around aiohttp's: at most `MAX_CONNECTIONS`, and a
    connection whose first request has not come in `IDLE_S` is closed. (Between
    requests, aiohttp's keep-alive timeout, set to `IDLE_S` as well, closes it.)"""

    def __init__(self, server: Any) -> None:
        self.server = server  # aiohttp's web.Server: a protocol factory
        self.opened: dict[Any, float] = {}  # connection -> when it opened, until a request
        self.refused = 0

    def __call__(self) -> asyncio.BaseProtocol:
        now = time.monotonic()
        live = set(self.server.connections)
        # asyncio accepts a burst before any of it is connected: count those too
        starting = sum(1 for h, at in self.opened.items() if h not in live and now - at < 1.0)
        if len(live) + starting >= MAX_CONNECTIONS:
            self.refused += 1
            return _Refuse()
        handler = self.server()
        self.opened[handler] = time.monotonic()
        return handler

    def started(self, handler: Any) -> None:
        """A request came in on ``handler``'s connection."""
        self.opened.pop(handler, None)

    async def sweep(self) -> None:
        """Close connections still without a request after `IDLE_S` (runs until cancelled)."""
        while True:
            await asyncio.sleep(IDLE_S / 5)
            now = time.monotonic()
            live = set(self.server.connections)
            for handler, at in list(self.opened.items()):
                if handler not in live or now - at > IDLE_S:
                    del self.opened[handler]
                    if handler in live:
                        handler.force_close()


class Page:
    """One connected browser page and what it has been sent."""

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws
        self.busy = False  # a send to it is still in progress: skip pictures meanwhile
        self.event_id = 0
        self.picture_ids: dict[str, int] = {}
        self.pictures_dropped = 0


def _picture_message(name: str, header: dict[str, Any], payload: bytes) -> bytes:
    """Binary picture: magic u8, name length u8, name, pad to even, frame u32, rows u16,
    cols u16, then the ``<u2`` pixels (little-endian, row-major)."""
    raw = name.encode()[:255]
    head = struct.pack("<BB", _PICTURE_MAGIC, len(raw)) + raw
    if len(head) % 2:
        head += b"\0"
    rows, cols = header["shape"]
    return head + struct.pack("<IHH", header["frame"] & 0xFFFFFFFF, rows, cols) + payload


class ViewServer:
    """aiohttp application: the page, its WebSocket, JSON endpoints and /metrics."""

    def __init__(self, state: ViewState, journal: str | None = None,
                 hosts: frozenset[str] = frozenset(LOOPBACK_NAMES)) -> None:
        self.state = state
        self.journal = journal
        self.hosts = hosts
        self.connections: Connections | None = None  # set by `serve`
        self.pages: set[Page] = set()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(MonitorCollector(state))
        self.static = Path(__file__).with_name(_STATIC)
        self.plotly_js = _plotly_js()  # at start: a missing one is a one-line error
        self.app = web.Application(middlewares=[self._check_host])
        self.app.on_response_prepare.append(self._secure)
        self.app.add_routes([
            web.get("/", self.index),
            web.get("/ws", self.websocket),
            web.get("/metrics", self.metrics),
            web.get("/api/state", self.api_state),
            web.get("/api/history", self.api_history),
            web.get("/static/plotly.min.js", self.plotly),
            web.get("/static/{name}", self.static_file),
        ])
        self.app.on_startup.append(self._start_ticker)
        self.app.on_shutdown.append(self._close_pages)

    # ---- every request and response

    @web.middleware
    async def _check_host(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Answer only the names this view serves (a page reached through DNS rebinding
        carries its own site's name in ``Host``)."""
        if self.connections is not None:
            self.connections.started(request.protocol)
        if host_name(request.headers.get("Host")) not in self.hosts:
            raise web.HTTPMisdirectedRequest(
                text="421: this view does not serve that host name (lhtstream view "
                "--allow-host NAME adds one)")
        return await handler(request)

    async def _secure(self, request: web.Request, response: web.StreamResponse) -> None:
        """Headers of every response: no server version, nothing loaded from elsewhere,
        never framed, no referrer sent."""
        response.headers["Server"] = "lhtstream"
        response.headers.update(_SECURITY_HEADERS)
        host = request.headers.get("Host")
        ws = f" ws://{host} wss://{host}" if host and host_name(host) in self.hosts else ""
        response.headers["Content-Security-Policy"] = _CSP.format(ws=ws)

    # ---- HTTP

    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=(self.static / "index.html").read_bytes(),
                            content_type="text/html")

    async def static_file(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        types = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}
        suffix = Path(name).suffix
        if "/" in name or name.startswith(".") or suffix not in types:
            raise web.HTTPNotFound()
        item = self.static / name
        if not item.is_file():
            raise web.HTTPNotFound()
        return web.Response(body=item.read_bytes(), content_type=types[suffix])

    async def plotly(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(self.plotly_js, headers={"Cache-Control": "max-age=86400"})

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def api_state(self, request: web.Request) -> web.StreamResponse:
        with self.state.lock:
            snap = self.state.snapshot(time.monotonic())
            snap["events"] = list(self.state.events)
        snap["pages"] = [{"pictures_dropped": p.pictures_dropped, "busy": p.busy}
                         for p in self.pages]
        return web.json_response(snap)

    async def api_history(self, request: web.Request) -> web.StreamResponse:
        if self.journal is None:
            return web.json_response({"journal": None, "error": "the view was started "
                                      "without --journal FILE"})
        try:
            history = await asyncio.get_running_loop().run_in_executor(
                None, journal_history, self.journal)
        except JournalError as exc:
            name = Path(self.journal).name  # no path on the view's host in a response
            return web.json_response({"journal": name,
                                      "error": str(exc).replace(self.journal, name)})
        return web.json_response(history)

    # ---- WebSocket

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is not None and not same_origin(origin, request.host):
            # a page of another site, in the operator's browser, must not read the line
            raise web.HTTPForbidden(text="403: a WebSocket from a page of another origin")
        if len(self.pages) >= MAX_PAGES:
            raise web.HTTPServiceUnavailable(text=f"at most {MAX_PAGES} pages at once")
        ws = web.WebSocketResponse(heartbeat=HEARTBEAT_S, max_msg_size=4096)
        await ws.prepare(request)
        raw = request.transport.get_extra_info("socket") if request.transport else None
        if raw is not None:
            # bounds what a page that stopped reading holds (and how soon it shows as busy)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, PAGE_SEND_BUFFER)
        page = Page(ws)
        self.pages.add(page)
        try:
            async for msg in ws:  # the page sends nothing we need; read to see it close
                if msg.type == WSMsgType.ERROR:
                    break
        finally:
            self.pages.discard(page)
        return ws

    async def _start_ticker(self, app: web.Application) -> None:
        app["ticker"] = asyncio.create_task(self._ticker())

    async def _close_pages(self, app: web.Application) -> None:
        app["ticker"].cancel()
        for page in list(self.pages):
            await page.ws.close()

    async def _ticker(self) -> None:
        period = 1.0 / PICTURE_HZ
        tick = 0
        next_at = time.monotonic()
        while True:
            next_at += period
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            if time.monotonic() - next_at > 1.0:
                next_at = time.monotonic()  # suspended: do not burst
            tick += 1
            if not self.pages:
                continue
            with_state = tick % STATE_EVERY == 0
            pictures, state_json, events = self._collect(with_state)
            for page in list(self.pages):
                fresh = [(n, i, b) for n, i, b in pictures if page.picture_ids.get(n) != i]
                if page.busy:
                    page.pictures_dropped += len(fresh)
                    continue
                new_events = [e for e in events if e["id"] > page.event_id]
                if not fresh and state_json is None:
                    continue
                page.busy = True
                asyncio.create_task(self._send(page, fresh, state_json, new_events))

    def _collect(self, with_state: bool) -> tuple[list, str | None, list]:
        state = self.state
        pictures = []
        with state.lock:
            for sv in state.streams.values():
                if sv.picture is not None:
                    pictures.append((sv.name, sv.picture_id, sv.picture))
            snap = state.snapshot(time.monotonic()) if with_state else None
            events = list(state.events) if with_state else []
        built = [(n, i, _picture_message(n, *p)) for n, i, p in pictures]
        return built, (json.dumps(snap, allow_nan=False) if snap else None), events

    async def _send(self, page: Page, pictures: list, state_json: str | None,
                    events: list) -> None:
        try:
            for name, pid, body in pictures:
                await page.ws.send_bytes(body)
                page.picture_ids[name] = pid
            if state_json is not None:
                extra = json.dumps({"events": events, "pictures_dropped": page.pictures_dropped})
                await page.ws.send_str('{"type":"state","state":' + state_json + "," + extra[1:])
                if events:
                    page.event_id = events[-1]["id"]
        except (ConnectionError, RuntimeError):
            pass  # the page went away; websocket() removes it
        finally:
            page.busy = False


# ---------------------------------------------------------------- running it


def serve(monitors: Sequence[str], frames: Sequence[str], host: str, port: int,
          allow_hosts: Sequence[str] = (), model_path: str | None = None,
          journal: str | None = None) -> None:
    """Serve the view until SIGINT/SIGTERM; `ViewError` if it cannot start.

    ``monitors``: publish endpoints to subscribe to; ``frames``: frame endpoints (pictures
    and paths; may be empty); ``allow_hosts``: names besides the loopback ones and
    ``host`` that browsers may reach it by (`allowed_hosts`); ``model_path``: draws the
    model's normal path; ``journal``: the history tab's source.
    """
    normal = None
    if model_path:
        normal = NormalPaths(NormalityModel.load(model_path))
    if journal and not Path(journal).exists():
        log(f"journal {journal} does not exist yet: the history shows it once the "
             "monitor has created it")
    # Every frame wakes the view's ZeroMQ thread at the moment it wakes the monitor's; on
    # a busy host the view must lose that race (measured: with both at nice 0 on a loaded
    # 2-core VM the monitor's p50 rose several-fold while a view was attached).
    with contextlib.suppress(OSError):
        os.nice(VIEW_NICENESS)  # before any thread starts: they all inherit it
    hosts = allowed_hosts(host, allow_hosts)
    state = ViewState(monitors, normal, model_path)
    server = ViewServer(state, journal, hosts)
    receiver = Receiver(state, monitors, frames)
    receiver.start()
    try:
        asyncio.run(_serve(server, host, port, monitors, frames))
    finally:
        receiver.stop_event.set()
        receiver.join(5.0)


async def _serve(server: ViewServer, host: str, port: int, monitors: Sequence[str],
                 frames: Sequence[str]) -> None:
    runner = web.AppRunner(server.app, handle_signals=False, access_log=None,
                           keepalive_timeout=IDLE_S)
    await runner.setup()
    server.connections = connections = Connections(runner.server)
    loop = asyncio.get_running_loop()
    try:
        listener = await loop.create_server(connections, host or None, port,
                                            reuse_address=True)
    except OSError as exc:
        await runner.cleanup()
        raise ViewError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from None
    sweeper = asyncio.create_task(connections.sweep())
    bound = listener.sockets[0].getsockname()[1]
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    log(f"serving http://{shown}:{bound}/ (metrics at /metrics); monitors "
         f"{', '.join(monitors)}; frames {', '.join(frames) or 'none (no pictures)'}")
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log("stopping")
        sweeper.cancel()
        listener.close()
        await runner.cleanup()
