"""SQLite alarm journal: every alarm and verdict is committed here *before* it is published.

A subscriber that missed messages (joined late, was disconnected, crashed) recovers
them from the journal: ``lhtstream alarms --history --journal PATH``.

Durability choice: WAL mode with ``synchronous=NORMAL``. A commit is appended to the
WAL file with a ``write()`` and no ``fsync``; the data is then in the kernel's page
cache, so it survives the *process* being killed (SIGKILL, crash, OOM) — which is the
failure the monitor must survive. On *power loss or a kernel crash* the last few
commits before the outage may be rolled back (the database itself stays consistent).
Use ``Journal(path, synchronous="FULL")`` to fsync every commit when that matters;
it costs a disk flush (~ms on spinning disks) per alarm.

Sequence numbers: ``seq`` of an alarm is SQLite's rowid, i.e. ``max(seq) + 1`` of the
journal at the time of the insert. It is gapless and continues across restarts of the
monitor that owns the journal. One journal belongs to one monitor at a time; the
monitor takes an exclusive ``flock`` on ``PATH.lock`` to make that so.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lhtstream.base.errors import LhtstreamError

DEFAULT_JOURNAL = "lhtstream-journal.sqlite"
JOURNAL_VERSION = 1
HISTORY_BUCKETS_S = (1, 10, 60, 600, 3600, 21600, 86400)
"""Bucket widths the history counts choose from (s): the smallest giving few enough buckets."""
HISTORY_MAX_ROWS = 20_000
"""Rows a history count returns at most (buckets x streams x kinds)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS alarms (
    seq INTEGER PRIMARY KEY,      -- rowid: max+1, gapless, survives restarts
    wall_time REAL NOT NULL,      -- time.time() at journaling, for --since ISO-time
    v INTEGER NOT NULL,
    stream TEXT NOT NULL,
    video TEXT NOT NULL,
    type INTEGER NOT NULL,
    frame INTEGER NOT NULL,
    t_frame_ns INTEGER NOT NULL,  -- the frame's t_ns (monotonic clock of the host)
    t_alarm_ns INTEGER NOT NULL,  -- monotonic ns when the alarm was decided
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    score REAL,
    threshold REAL,
    features TEXT NOT NULL        -- JSON object
);
CREATE INDEX IF NOT EXISTS alarms_stream ON alarms (stream, seq);
CREATE TABLE IF NOT EXISTS verdicts (
    id INTEGER PRIMARY KEY,
    wall_time REAL NOT NULL,
    v INTEGER NOT NULL,
    stream TEXT NOT NULL,
    video TEXT NOT NULL,
    type INTEGER NOT NULL,
    frames INTEGER NOT NULL,
    score REAL,
    anomalous INTEGER NOT NULL,
    alarms INTEGER NOT NULL,
    t_ns INTEGER NOT NULL
);
"""


class JournalError(LhtstreamError):
    """The journal file cannot be opened, is not a journal, or is owned by another monitor."""


def json_number(value: Any) -> Any:
    """Plain JSON value: numpy scalars to Python, NaN/inf to None (JSON has no NaN)."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): json_number(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_number(v) for v in value]
    return value


def _float_or_none(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _iso(wall_time: float) -> str:
    return datetime.fromtimestamp(wall_time, timezone.utc).isoformat(timespec="milliseconds")


def parse_since(text: str | None) -> tuple[int | None, float | None]:
    """``--since`` as (alarm seq, None) for an integer, else (None, unix time) for ISO time.

    An ISO time without a zone is local time.
    """
    if text is None:
        return None, None
    text = text.strip()
    try:
        return int(text), None
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise JournalError(
            f"bad --since {text!r}: give an alarm seq (e.g. 42) or an ISO time "
            "(e.g. 2024-05-01T12:00:00)"
        ) from None
    return None, when.timestamp()


class Journal:
    """Append-only SQLite journal of alarms and verdicts (WAL mode).

    ``writer=True`` (the monitor) creates the file and takes the owner lock;
    ``writer=False`` opens an existing journal read-only (``lhtstream alarms --history``).
    """

    def __init__(
        self, path: str | os.PathLike, *, writer: bool = True, synchronous: str = "NORMAL"
    ):
        self.path = Path(path)
        self._lock_fd: int | None = None
        if writer:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self._lock_fd)
                self._lock_fd = None
                raise JournalError(
                    f"journal {self.path} is in use by another monitor (lock {self.path}.lock)"
                ) from None
            uri = self.path.resolve().as_uri() + "?mode=rwc"
        else:
            if not self.path.exists():
                raise JournalError(f"journal {self.path} does not exist")
            uri = self.path.resolve().as_uri() + "?mode=ro"
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, one transaction per row.
            self._db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            if writer:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute(f"PRAGMA synchronous={synchronous}")
                self._db.executescript(_SCHEMA)
                self._db.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('version', ?)",
                    (str(JOURNAL_VERSION),),
                )
            row = self._db.execute("SELECT value FROM meta WHERE key='version'").fetchone()
        except sqlite3.DatabaseError as exc:
            self.close()
            raise JournalError(
                f"journal {self.path}: not a usable lhtstream journal ({exc})"
            ) from None
        if row is None or int(row[0]) != JOURNAL_VERSION:
            self.close()
            raise JournalError(
                f"journal {self.path}: version {row and row[0]}, "
                f"this lhtstream reads {JOURNAL_VERSION}"
            )

    # ------------------------------------------------------------ writing

    def next_seq(self) -> int:
        """The seq the next alarm will get (max(seq) + 1, 1 for an empty journal)."""
        (top,) = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM alarms").fetchone()
        return int(top) + 1

    @contextmanager
    def batch(self) -> Iterator[None]:
        """One transaction for the appends inside: one commit (~0.2 ms) instead of one per
        row, for the several events a single frame or video end can raise."""
        self._db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def append_alarm(self, fields: Mapping[str, Any]) -> int:
        """Commit one alarm and return its ``seq``; call this before publishing the alarm.

        ``fields`` holds the protocol's alarm fields except ``seq``; ``features`` is a map
        stored as JSON text.
        """
        features = json.dumps(json_number(dict(fields.get("features") or {})), allow_nan=False)
        cur = self._db.execute(
            "INSERT INTO alarms (wall_time, v, stream, video, type, frame, t_frame_ns, t_alarm_ns,"
            " kind, state, score, threshold, features) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                time.time(), int(fields["v"]), str(fields["stream"]), str(fields["video"]),
                int(fields["type"]), int(fields["frame"]), int(fields["t_frame_ns"]),
                int(fields["t_alarm_ns"]), str(fields["kind"]), str(fields["state"]),
                _float_or_none(fields.get("score")), _float_or_none(fields.get("threshold")),
                features,
            ),
        )  # fmt: skip
        # Autocommit mode (outside `batch`): the INSERT is committed when execute returns.
        return int(cur.lastrowid)

    def append_verdict(self, fields: Mapping[str, Any]) -> int:
        """Commit one verdict (before publishing it); returns its journal id."""
        cur = self._db.execute(
            "INSERT INTO verdicts (wall_time, v, stream, video, type, frames, score, anomalous,"
            " alarms, t_ns) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (
                time.time(), int(fields["v"]), str(fields["stream"]), str(fields["video"]),
                int(fields["type"]), int(fields["frames"]), _float_or_none(fields.get("score")),
                int(bool(fields["anomalous"])), int(fields["alarms"]),
                int(fields.get("t_ns") or time.monotonic_ns()),
            ),
        )  # fmt: skip
        return int(cur.lastrowid)

    # ------------------------------------------------------------ reading

    def alarms(
        self, since: int | str | None = None, stream: str | None = None
    ) -> list[dict[str, Any]]:
        """Alarms in seq order, each a dict of the protocol's alarm fields plus ``time`` (ISO, UTC).

        ``since``: an int keeps alarms with ``seq > since``; a str is parsed like ``--since``
        (integer seq or ISO time, keeping alarms journaled at or after it).
        """
        since_seq, since_time = parse_since(since) if isinstance(since, str) else (since, None)
        where, params = [], []
        if since_seq is not None:
            where.append("seq > ?")
            params.append(since_seq)
        if since_time is not None:
            where.append("wall_time >= ?")
            params.append(since_time)
        if stream is not None:
            where.append("stream = ?")
            params.append(stream)
        sql = (
            "SELECT seq, wall_time, v, stream, video, type, frame, t_frame_ns, t_alarm_ns, kind,"
            " state, score, threshold, features FROM alarms"
        )
        if where:
            sql += " WHERE " + " AND ".join(where)
        out = []
        for row in self._db.execute(sql + " ORDER BY seq", params):
            (seq, wall, v, stream_, video, type_, frame, t_frame, t_alarm, kind, state, score,
             threshold, features) = row  # fmt: skip
            out.append({
                "v": v, "stream": stream_, "video": video, "type": type_, "frame": frame,
                "seq": seq, "t_frame_ns": t_frame, "t_alarm_ns": t_alarm, "kind": kind,
                "state": state, "score": score, "threshold": threshold,
                "features": json.loads(features), "time": _iso(wall),
            })  # fmt: skip
        return out

    def verdicts(self, stream: str | None = None) -> list[dict[str, Any]]:
        """Verdicts in journal order, each a dict of the protocol's verdict fields plus ``time``."""
        sql = (
            "SELECT id, wall_time, v, stream, video, type, frames, score, anomalous, alarms, t_ns"
            " FROM verdicts"
        )
        params: list[Any] = []
        if stream is not None:
            sql += " WHERE stream = ?"
            params.append(stream)
        out = []
        for row in self._db.execute(sql + " ORDER BY id", params):
            id_, wall, v, stream_, video, type_, frames, score, anomalous, alarms, t_ns = row
            out.append({
                "v": v, "stream": stream_, "video": video, "type": type_, "frames": frames,
                "score": score, "anomalous": bool(anomalous), "alarms": alarms, "t_ns": t_ns,
                "id": id_, "time": _iso(wall),
            })  # fmt: skip
        return out

    def raise_counts(
        self, max_buckets: int = 120
    ) -> tuple[float, list[tuple[float, str, str, int]]]:
        """Alarms raised per time bucket, stream and kind, for a history chart.

        Returns ``(bucket_s, rows)``: the bucket width, the smallest of `HISTORY_BUCKETS_S`
        giving at most ``max_buckets`` buckets over the journal's span, and rows of
        (bucket start as Unix time, stream, kind, count), at most `HISTORY_MAX_ROWS`.
        """
        lo, hi = self._db.execute(
            "SELECT MIN(wall_time), MAX(wall_time) FROM alarms WHERE state = 'raise'"
        ).fetchone()
        span = 0.0 if lo is None else hi - lo
        bucket = next((b for b in HISTORY_BUCKETS_S if span / b <= max_buckets),
                      HISTORY_BUCKETS_S[-1])
        rows = self._db.execute(
            "SELECT CAST(wall_time / ? AS INTEGER) * ?, stream, kind, COUNT(*) FROM alarms"
            " WHERE state = 'raise' GROUP BY 1, 2, 3 ORDER BY 1, 2, 3 LIMIT ?",
            (bucket, bucket, HISTORY_MAX_ROWS),
        ).fetchall()
        return float(bucket), [(float(t), str(s), str(k), int(n)) for t, s, k, n in rows]

    def verdict_counts(self, bucket_s: float) -> list[tuple[float, str, bool, int]]:
        """Verdicts per time bucket (``bucket_s`` wide), stream and outcome: rows of
        (bucket start as Unix time, stream, anomalous, count), at most `HISTORY_MAX_ROWS`."""
        rows = self._db.execute(
            "SELECT CAST(wall_time / ? AS INTEGER) * ?, stream, anomalous, COUNT(*)"
            " FROM verdicts GROUP BY 1, 2, 3 ORDER BY 1, 2, 3 LIMIT ?",
            (bucket_s, bucket_s, HISTORY_MAX_ROWS),
        ).fetchall()
        return [(float(t), str(s), bool(a), int(n)) for t, s, a, n in rows]

    def close(self) -> None:
        """Close the database and release the owner lock."""
        db = getattr(self, "_db", None)
        if db is not None:
            db.close()
            self._db = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
