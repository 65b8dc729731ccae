"""The monitor's frame connections, watched through ZeroMQ's socket monitor: a failed
handshake is named (CURVE key not admitted, wrong server key), and an endpoint is
reconnected explicitly only when libzmq gave up on it (after a protocol error)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from lhtstream.service.oplog import RateLimitedLog, log

RECONNECT_GRACE_S = 0.5
"""After a frame connection drops, how long libzmq gets to show it is reconnecting by
itself (it emits CONNECT_RETRIED/DELAYED/CONNECTED at once when it does) before the
monitor concludes it gave up (a protocol error) and reconnects explicitly."""

_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


def _handshake_failure(kind: int, value: int) -> str:
    """What a failed handshake (a ZeroMQ socket-monitor event and its value) means for the
    operator of a monitor whose frame SUB is the CURVE client."""
    if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return (f"the publisher did not admit this monitor's CURVE key (ZAP status {value}): "
                "its --curve-clients folder lacks this monitor's public key")
    if kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return (f"handshake protocol error (ZMQ_PROTOCOL_ERROR 0x{value:x}): CURVE on one "
                "side only, or another protocol on that port")
    return ("the publisher closed the handshake: with CURVE, --curve-server-key is not the "
            "publisher's public key (or the publisher does not use CURVE)")


class FrameConnections:
    """The socket monitor of the frame SUB socket ``sub`` for ``endpoints``; ``status()``
    gives its counts for the monitor's status. ``gaps``: where reconnections are logged."""

    NONE: dict[str, Any] = {"reconnects": 0, "handshake_failures": 0, "handshake_error": None}
    """`status()` of a monitor whose connections are not watched."""

    def __init__(self, sub: Any, endpoints: Iterable[str],
                 gaps: Callable[[str], None] = log) -> None:
        self.sub = sub
        self.endpoints = set(endpoints)
        self._log = gaps
        self.reconnects = 0
        self.handshake_failures = 0  # frame connections refused at the ZMTP/CURVE handshake
        self.handshake_error: str | None = None  # the last one, named
        self._failed_handshake: dict[str, str] = {}  # endpoint -> its last failure
        self._handshakes = RateLimitedLog(10.0)
        # endpoint -> monotonic ns by which libzmq must have shown it reconnects by itself
        self.dropped: dict[str, int] = {}
        # the PAIR socket of zmq_socket_monitor on `sub`
        self.events = sub.get_monitor_socket(
            zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_CONNECT_DELAYED
            | zmq.EVENT_CONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | _HANDSHAKE_FAILED
        )

    def status(self) -> dict[str, Any]:
        return {"reconnects": self.reconnects, "handshake_failures": self.handshake_failures,
                "handshake_error": self.handshake_error}

    def read_events(self) -> None:
        """Track which frame connections dropped and whether libzmq is reconnecting them.

        An ordinary disconnect (publisher exited or restarted) needs nothing from us:
        libzmq retries by itself (CONNECT_RETRIED/DELAYED at once, CONNECTED later) and
        keeps the pipe, so frames already queued are still delivered. Only after a
        *protocol* error (e.g. a part above ZMQ_MAXMSGSIZE) does it drop the connection
        for good, and then no retry event follows the DISCONNECTED one.
        """
        while True:
            try:
                event = recv_monitor_message(self.events, zmq.NOBLOCK)
            except zmq.Again:
                return
            raw = event["endpoint"]
            endpoint = raw.decode() if isinstance(raw, bytes) else str(raw)
            if endpoint not in self.endpoints:
                continue
            kind = int(event["event"])
            if kind & _HANDSHAKE_FAILED:
                reason = _handshake_failure(kind, int(event["value"]))
                self.handshake_failures += 1
                self.handshake_error = f"{endpoint}: {reason}"[:200]
                self._failed_handshake[endpoint] = reason
                self._handshakes(f"frames from {endpoint}: {reason}")
                continue
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                if self._failed_handshake.pop(endpoint, None) is not None:
                    log(f"frames from {endpoint}: handshake succeeded")
                continue
            if kind == zmq.EVENT_DISCONNECTED:
                self.dropped[endpoint] = time.monotonic_ns() + int(RECONNECT_GRACE_S * 1e9)
            else:  # libzmq is reconnecting (or has): leave it alone
                self.dropped.pop(endpoint, None)

    def reconnect_abandoned(self, now_ns: int) -> None:
        """Reconnect frame endpoints libzmq gave up on; call only when the SUB queue is
        drained. Never earlier: an explicit disconnect terminates the endpoint's pipe,
        discarding frames still queued in it, and a pipe terminated while a multipart
        message is being read trips libzmq's ``!_more`` assertion in fq.cpp (libzmq
        #3485/#3663), which aborted the monitor when a ``--rate max`` replay exited.
        """
        for endpoint, deadline in list(self.dropped.items()):
            if now_ns < deadline:
                continue
            del self.dropped[endpoint]
            self.reconnects += 1
            refused = self._failed_handshake.get(endpoint)
            self._log(f"connection to {endpoint} dropped and libzmq did not reconnect ("
                      + (f"refused at the handshake: {refused}" if refused else
                         "after a protocol error: a message part above the size bound?")
                      + "); reconnecting")
            try:
                self.sub.disconnect(endpoint)
            except zmq.ZMQError:
                pass
            self.sub.connect(endpoint)

    def close(self) -> None:
        """Stop the socket monitor and close its PAIR socket."""
        self.sub.disable_monitor()
        self.events.close(0)
