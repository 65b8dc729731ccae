"""ZeroMQ CURVE on frame and alarm sockets: encryption and authentication across hosts.

Keys are files made by ``lhtstream keys DIR --name NAME`` (``NAME.key`` public,
``NAME.key_secret`` both halves; ZeroMQ's own certificate format, ``zmq.auth``). A
process given its key pair (``--curve-secret``) makes every socket CURVE:

- what it binds (the replay's frame PUB, the monitor's PUB) is a CURVE server that
  admits only clients whose public key lies in ``--curve-clients DIR`` (checked by a ZAP
  authenticator thread, ``zmq.auth.thread.ThreadAuthenticator``);
- what it connects (the monitor's frame SUB, ``tap``, ``alarms``) is a CURVE client of
  the server whose public key is ``--curve-server-key FILE``.

Without ``--curve-secret`` sockets are plain TCP/ipc, the default on one host.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from lhtstream.base.errors import LhtstreamError
from lhtstream.io.protocol import valid_name


class CurveError(LhtstreamError):
    """A key file or folder that cannot be used."""


def make_keys(folder: str | Path, name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` and ``NAME.key_secret`` in ``folder`` (created); never overwrites."""
    if not valid_name(name):
        raise CurveError(f"key name {name!r}: need 1..64 characters from A-Z a-z 0-9 _ . -")
    folder = Path(folder)
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise CurveError(f"{path} exists: give another --name or folder (keys are never "
                             "overwritten)")
    folder.mkdir(parents=True, exist_ok=True)
    made = zmq.auth.create_certificates(str(folder), name)
    Path(made[1]).chmod(0o600)
    return Path(made[0]), Path(made[1])


def _load(path: str | Path, secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public, private = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise CurveError(f"cannot read CURVE key {path}: {exc}") from None
    if secret and private is None:
        raise CurveError(f"{path} holds no secret key: give the NAME.key_secret file")
    return public, private


@dataclass
class Curve:
    """One process's CURVE settings; ``None`` of them given means plain sockets."""

    public: bytes
    secret: bytes
    server_key: bytes | None = None
    clients: Path | None = None
    _auth: ThreadAuthenticator | None = None

    @classmethod
    def from_files(cls, secret: str | None, server_key: str | None = None,
                   clients: str | None = None) -> Curve | None:
        """Load the key files named by the CLI options; None when ``secret`` is None."""
        if secret is None:
            if server_key is not None or clients is not None:
                raise CurveError("--curve-server-key and --curve-clients need --curve-secret "
                                 "(this process's own key pair)")
            return None
        public, private = _load(secret, True)
        assert private is not None  # _load(..., secret=True) raised otherwise
        peer = None if server_key is None else _load(server_key, False)[0]
        folder = None
        if clients is not None:
            folder = Path(clients)
            if not folder.is_dir() or not any(folder.glob("*.key")):
                raise CurveError(f"--curve-clients {clients}: no folder of NAME.key public "
                                 "keys")
        return cls(public, private, peer, folder)

    def serve(self, context: Any, socket: Any) -> None:
        """Make ``socket`` (to be bound) a CURVE server admitting only ``clients``."""
        if self.clients is None:
            raise CurveError("a process that binds needs --curve-clients DIR (the public "
                             "keys it admits)")
        if self._auth is None:
            self._auth = ThreadAuthenticator(context)
            self._auth.start()
            self._auth.configure_curve(domain="*", location=str(self.clients))
        socket.curve_secretkey = self.secret
        socket.curve_publickey = self.public
        socket.curve_server = True

    def connect_to(self, socket: Any) -> None:
        """Make ``socket`` (to be connected) a CURVE client of ``server_key``."""
        if self.server_key is None:
            raise CurveError("a process that connects needs --curve-server-key FILE (the "
                             "public key of what it connects to)")
        socket.curve_secretkey = self.secret
        socket.curve_publickey = self.public
        socket.curve_serverkey = self.server_key

    def close(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None


def server(curve: Curve | None, context: Any, socket: Any) -> None:
    """``curve.serve`` when CURVE is on, else nothing (plain socket)."""
    if curve is not None:
        curve.serve(context, socket)


def client(curve: Curve | None, socket: Any) -> None:
    """``curve.connect_to`` when CURVE is on, else nothing (plain socket)."""
    if curve is not None:
        curve.connect_to(socket)


def has_curve() -> bool:
    """Whether this libzmq was built with CURVE (libsodium or its own tweetnacl)."""
    return bool(zmq.has("curve"))
