"""Which streams a subscriber takes (`StreamSelection`), subscriber sockets
(`configure_subscriber`) and the check before binding an ``ipc://`` endpoint
(`claim_ipc`)."""

from __future__ import annotations

import fnmatch
import os
import re
import socket as _socket
import stat
from collections.abc import Iterable, Sequence
from typing import Any

import zmq

from lhtstream.io.schema import (
    _KNOWN_CAP,
    _TOPIC_BYTES,
    MAX_MESSAGE_BYTES,
    NAME_CHARS,
    TOPICS,
    ProtocolError,
    check_name,
    topic_bytes,
    valid_name,
)

_WILDCARDS = re.compile(r"[*?\[]")


class StreamSelection:
    """Which streams a subscriber takes: names and shell-style patterns (``ws1,line2-*``).

    ``prefixes(topic)`` are the ZeroMQ subscriptions that let only matching streams'
    messages through, as far as a prefix can: an exact name subscribes ``frame/ws1/``
    (exactly that stream); a pattern subscribes to its literal part before the first
    wildcard (``line2-*`` -> ``frame/line2-``: exact; ``ws?1`` -> ``frame/ws``: also
    ``ws22`` gets through). ``exact`` says whether the prefixes alone decide; if not,
    ``matches`` (cached per name) rejects the rest in the receiver.
    """

    def __init__(self, text: str | Iterable[str] | None) -> None:
        items = text.split(",") if isinstance(text, str) else list(text or [])
        self.names: set[str] = set()
        self.patterns: list[str] = []
        for item in (i.strip() for i in items):
            if not item:
                continue
            if _WILDCARDS.search(item):
                literal = _WILDCARDS.split(item, 1)[0]
                if literal and not valid_name(literal):
                    raise ProtocolError(f"stream pattern {item!r}: its literal part "
                                        f"{literal!r} is no stream name prefix ({NAME_CHARS})")
                self.patterns.append(item)
            else:
                self.names.add(check_name(item))
        if isinstance(text, str) and not (self.names or self.patterns):
            raise ProtocolError(f"stream selection {text!r} names no stream")
        self._cache: dict[str, bool] = {}
        # A pattern is filtered exactly by its prefix when its only wildcard is a final '*'.
        self.exact = all(p.endswith("*") and not _WILDCARDS.search(p[:-1])
                         for p in self.patterns)

    @property
    def everything(self) -> bool:
        return not self.names and not self.patterns

    def prefixes(self, topic: str) -> list[bytes]:
        """ZeroMQ SUBSCRIBE prefixes for ``topic``'s messages of the selected streams."""
        if self.everything:
            return [_TOPIC_BYTES[topic] + b"/"]
        out = {topic_bytes(topic, name) for name in self.names}
        for pattern in self.patterns:
            literal = _WILDCARDS.split(pattern, 1)[0]
            out.add(_TOPIC_BYTES[topic] + b"/" + literal.encode("ascii"))
        # A prefix that another one contains adds nothing (ZeroMQ would deliver once anyway).
        return sorted(p for p in out if not any(q != p and p.startswith(q) for q in out))

    def matches(self, stream: str) -> bool:
        """True when ``stream`` is selected (a dict lookup after the first time)."""
        hit = self._cache.get(stream)
        if hit is None:
            hit = self.everything or stream in self.names or any(
                fnmatch.fnmatchcase(stream, p) for p in self.patterns)
            if len(self._cache) >= _KNOWN_CAP:
                self._cache.clear()
            self._cache[stream] = hit
        return hit

    def __str__(self) -> str:
        return "all streams" if self.everything else ",".join(
            sorted(self.names) + self.patterns)


def configure_subscriber(
    socket: Any, topics: Sequence[str] | None = None, streams: StreamSelection | None = None
) -> None:
    """Bound message size and queue on a SUB socket and subscribe.

    ``topics`` None or empty subscribes to every topic; ``streams`` (default all) narrows
    each topic to the selected streams by prefix; an item of ``topics`` that is no topic
    name is subscribed as a raw prefix (``frame/ws1/``). Call before connect.
    """
    socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    socket.setsockopt(zmq.RCVHWM, 10_000)
    socket.setsockopt(zmq.LINGER, 0)
    if not topics and (streams is None or streams.everything):
        socket.setsockopt(zmq.SUBSCRIBE, b"")
        return
    selection = streams or StreamSelection(None)
    for topic in topics or TOPICS:
        # a topic name is narrowed to the selected streams; anything else is a raw prefix
        prefixes = selection.prefixes(topic) if topic in _TOPIC_BYTES else [topic.encode()]
        for prefix in prefixes:
            socket.setsockopt(zmq.SUBSCRIBE, prefix)


def claim_ipc(endpoint: str) -> None:
    """Make ``endpoint`` safe to bind if it is ``ipc://PATH``: a socket file there whose
    owner is alive (it accepts a connection) raises ProtocolError, so a second process
    never silently takes the endpoint from the first (libzmq would unlink and rebind
    it); a stale one (owner gone: connection refused) is removed. Other endpoints and
    abstract ``ipc://@name`` ones are left to ``bind``."""
    if not endpoint.startswith("ipc://") or endpoint.startswith("ipc://@"):
        return
    path = endpoint[len("ipc://"):]
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ProtocolError(f"{endpoint}: cannot look at {path} ({exc.strerror})") from None
    if not stat.S_ISSOCK(mode):
        raise ProtocolError(f"{endpoint}: {path} exists and is no socket; not binding over it")
    probe = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:  # nobody listens: left behind by a process that died
        os.unlink(path)
        return
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ProtocolError(f"{endpoint}: cannot probe {path} ({exc})") from None
    finally:
        probe.close()
    raise ProtocolError(f"{endpoint} is in use by a running process (another monitor?): "
                        "refusing to take it over; stop that one or choose another endpoint")
