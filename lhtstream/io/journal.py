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

Sequence numbers: ``seq`` of an alarm is ``max(seq) + 1`` of the journal when the monitor
opened it, then counted up by the writer. It is gapless and continues across restarts of
the monitor that owns the journal. One journal belongs to one monitor at a time; the
monitor takes an exclusive ``flock`` on ``PATH.lock`` to make that so.

Nothing here waits on the frame path: SQLite's automatic WAL checkpoint (copying the
WAL into the database, with an fsync, up to ~12 ms inside a commit) is switched off and
a thread with its own connection checkpoints every few seconds instead (sqlite3 releases
the GIL while SQLite works), and as soon as the WAL passes ``WAL_CHECKPOINT_BYTES``.
The WAL's size is bounded under any write rate: a commit that leaves it past
``WAL_MAX_BYTES`` is followed by a ``TRUNCATE`` checkpoint by the writer itself (after the
thread's checkpoint under way, if any: a checkpoint of the thread's never catches a gap
between a flood's commits; only a flood gets there), and ``journal_size_limit`` shrinks
the WAL back after every checkpoint.

The file at ``PATH`` is watched (``check_file``, called by the monitor once a second):
if it, or its ``-wal``, is deleted or replaced under the running writer, the writer's
whole history is written back to ``PATH`` from its open connection (a foreign file
there is moved aside to ``PATH.replaced-<unix time>``), and ``seq`` continues: a
journal never begins again at 1 on an existing history. ``health()`` counts it.

A commit that fails (disk full, read-only, I/O error)
never raises into the monitor: ``record`` keeps the rows pending, counts the error and
returns the seqs anyway, and ``flush`` retries them later, in order; ``health()`` says
how many rows wait and why. Rows committed before stay as they are.

Open videos: a video's start is journaled (``open_videos``) and cleared with its
verdict, so a monitor restarted after SIGKILL finds the videos it was in the middle of
and reports them (``interrupted``).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lhtstream.base.errors import LhtstreamError
from lhtstream.io.protocol import ALARM_FIELDS

DEFAULT_JOURNAL = "lhtstream-journal.sqlite"
JOURNAL_VERSION = 2
"""2: verdicts have ``partial`` and ``kinds``; ``open_videos``. A writer upgrades 1 in place."""
CHECKPOINT_INTERVAL_S = 5.0
"""How often the checkpoint thread copies the WAL into the database."""
WAL_POLL_S = 0.1
"""How often the checkpoint thread looks at the WAL's size."""
WAL_CHECKPOINT_BYTES = 4 << 20
"""A WAL past this size (4 MiB) is checkpointed at once (PASSIVE: the writer never waits)."""
WAL_MAX_BYTES = 32 << 20
"""A WAL past this size after a commit (32 MiB: a checkpoint that cannot catch up with a
flood of commits) gets a TRUNCATE checkpoint by the writer at once: 0 bytes again."""
MAX_PENDING_ROWS = 100_000
"""Rows kept in memory while the journal cannot be written; older ones beyond are lost
(counted): ~100 MB at worst, hours of alarms at any sane rate."""
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
    t_ns INTEGER NOT NULL,
    partial INTEGER NOT NULL DEFAULT 0,  -- the verdict covers part of the video only
    kinds TEXT NOT NULL DEFAULT '[]'     -- JSON list of the alarm kinds raised
);
CREATE TABLE IF NOT EXISTS open_videos (  -- videos started and not yet judged
    stream TEXT PRIMARY KEY,
    video TEXT NOT NULL,
    type INTEGER NOT NULL,
    first_seq INTEGER NOT NULL,   -- the alarm seq the video's alarms start from
    wall_time REAL NOT NULL
);
"""
_UPGRADE_1_TO_2 = """
ALTER TABLE verdicts ADD COLUMN partial INTEGER NOT NULL DEFAULT 0;
ALTER TABLE verdicts ADD COLUMN kinds TEXT NOT NULL DEFAULT '[]';
UPDATE meta SET value = '2' WHERE key = 'version';
"""
_INSERT_ALARM = (
    "INSERT INTO alarms (seq, wall_time, v, stream, video, type, frame, t_frame_ns, t_alarm_ns,"
    " kind, state, score, threshold, features) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
_INSERT_VERDICT = (
    "INSERT INTO verdicts (wall_time, v, stream, video, type, frames, score, anomalous,"
    " alarms, t_ns, partial, kinds) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
)
_CLOSE_VIDEO = "DELETE FROM open_videos WHERE stream = ? AND video = ?"
_OPEN_VIDEO = (
    "INSERT OR REPLACE INTO open_videos (stream, video, type, first_seq, wall_time)"
    " VALUES (?,?,?,?,?)"
)


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


def _alarm_row(seq: int, wall: float, fields: Mapping[str, Any]) -> tuple:
    features = json.dumps(json_number(dict(fields.get("features") or {})), allow_nan=False)
    return (
        seq, wall, int(fields["v"]), str(fields["stream"]), str(fields["video"]),
        int(fields["type"]), int(fields["frame"]), int(fields["t_frame_ns"]),
        int(fields["t_alarm_ns"]), str(fields["kind"]), str(fields["state"]),
        _float_or_none(fields.get("score")), _float_or_none(fields.get("threshold")), features,
    )  # fmt: skip


def _verdict_row(wall: float, fields: Mapping[str, Any]) -> tuple:
    return (
        wall, int(fields["v"]), str(fields["stream"]), str(fields["video"]), int(fields["type"]),
        int(fields["frames"]), _float_or_none(fields.get("score")),
        int(bool(fields["anomalous"])), int(fields["alarms"]),
        int(fields.get("t_ns") or time.monotonic_ns()), int(bool(fields.get("partial"))),
        json.dumps([str(k) for k in fields.get("kinds") or []]),
    )  # fmt: skip


class Journal:
    """Append-only SQLite journal of alarms and verdicts (WAL mode).

    ``writer=True`` (the monitor) creates the file and takes the owner lock;
    ``writer=False`` opens an existing journal read-only (``lhtstream alarms --history``).
    """

    def __init__(
        self, path: str | os.PathLike, *, writer: bool = True, synchronous: str = "NORMAL",
        checkpoint_interval: float | None = CHECKPOINT_INTERVAL_S, max_pages: int | None = None,
    ):
        self.path = Path(path)
        self._lock_fd: int | None = None
        self._db: sqlite3.Connection | None = None
        self.pending: list[tuple[str, tuple]] = []  # rows not yet committed, in order
        self.errors = 0  # failed commits (and checkpoints)
        self.lost = 0  # rows dropped beyond MAX_PENDING_ROWS
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._checkpointer: threading.Thread | None = None
        self.restored = 0  # times the file was deleted or replaced and written back
        self.checkpoints = 0  # checkpoints run by the thread (a TRUNCATE counts too)
        self.wal_peak = 0  # the largest WAL size the thread saw, bytes
        self._wal = f"{self.path}-wal"
        self._checkpointing = threading.Lock()  # one checkpoint at a time: thread or writer
        self._synchronous = synchronous
        self._checkpoint_interval = checkpoint_interval
        self._max_pages = max_pages
        self._identity: tuple[tuple[int, int] | None, ...] = ()
        if writer:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._lock_fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:  # a file where a folder should be, read-only, no space
                raise JournalError(
                    f"journal {self.path}: cannot create it ({exc.strerror or exc})") from None
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self._lock_fd)
                self._lock_fd = None
                raise JournalError(
                    f"journal {self.path} is in use by another monitor (lock {self.path}.lock)"
                ) from None
            uri = self.path.resolve().as_uri() + "?mode=rwc"
            self._uri = uri
        else:
            if not self.path.exists():
                raise JournalError(f"journal {self.path} does not exist")
            uri = self.path.resolve().as_uri() + "?mode=ro"
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, one transaction per row.
            self._db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            if writer:
                self._writer_pragmas(self._db)
                has_meta = self.db.execute(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
                ).fetchone()
                old = has_meta and self.db.execute(
                    "SELECT value FROM meta WHERE key = 'version'").fetchone()
                if old and old[0] == "1":
                    self.db.executescript(_UPGRADE_1_TO_2)
                self.db.executescript(_SCHEMA)
                self.db.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('version', ?)",
                    (str(JOURNAL_VERSION),),
                )
            row = self.db.execute("SELECT value FROM meta WHERE key='version'").fetchone()
        except sqlite3.DatabaseError as exc:
            self.close()
            raise JournalError(
                f"journal {self.path}: not a usable lhtstream journal ({exc})"
            ) from None
        readable = (JOURNAL_VERSION,) if writer else (1, JOURNAL_VERSION)
        if row is None or int(row[0]) not in readable:
            self.close()
            raise JournalError(
                f"journal {self.path}: version {row and row[0]}, "
                f"this lhtstream reads {JOURNAL_VERSION}"
            )
        self.version = int(row[0])
        self._seq = self.next_seq()
        if writer:
            self._identity = self._file_identity()
            self._start_checkpointer()

    def _writer_pragmas(self, db: sqlite3.Connection) -> None:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self._synchronous}")
        db.execute(f"PRAGMA journal_size_limit={WAL_CHECKPOINT_BYTES}")
        if self._checkpoint_interval is not None:
            db.execute("PRAGMA wal_autocheckpoint=0")  # the thread does it
        if self._max_pages is not None:  # test hook: a disk that fills up
            db.execute(f"PRAGMA max_page_count={int(self._max_pages)}")

    def _start_checkpointer(self) -> None:
        if self._checkpoint_interval is None:
            return
        self._stop = threading.Event()
        self._checkpointer = threading.Thread(
            target=self._checkpoint_loop, args=(self._uri, self._checkpoint_interval,
                                                self._stop),
            name="journal-checkpoint", daemon=True)
        self._checkpointer.start()

    def _stop_checkpointer(self) -> None:
        self._stop.set()
        if self._checkpointer is not None:
            self._checkpointer.join(timeout=10)
            self._checkpointer = None

    def _file_identity(self) -> tuple[tuple[int, int] | None, ...]:
        """(device, inode) of the database file and of its WAL (None: missing)."""
        out: list[tuple[int, int] | None] = []
        for path in (self.path, Path(f"{self.path}-wal")):
            try:
                st = os.stat(path)
            except OSError:
                out.append(None)
            else:
                out.append((st.st_dev, st.st_ino))
        return tuple(out)

    @property
    def db(self) -> sqlite3.Connection:
        """The open connection (JournalError once closed)."""
        if self._db is None:
            raise JournalError(f"journal {self.path} is closed")
        return self._db

    # ------------------------------------------------------------ writing

    def next_seq(self) -> int:
        """The seq the next alarm will get (max(seq) + 1, 1 for an empty journal)."""
        if getattr(self, "_seq", None) is not None:
            return self._seq
        (top,) = self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM alarms").fetchone()
        return int(top) + 1

    def _checkpoint_loop(self, uri: str, interval: float, stop: threading.Event) -> None:
        """Copy the WAL into the database every ``interval`` s, or at once when it passes
        WAL_CHECKPOINT_BYTES (TRUNCATE past WAL_MAX_BYTES), off the monitor's thread."""
        try:
            db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False,
                                 timeout=10.0)
        except sqlite3.Error as exc:
            self._failed("checkpoint connection", exc)
            return
        wal = self._wal
        due = time.monotonic() + interval
        try:
            while not stop.wait(min(WAL_POLL_S, interval)):
                try:
                    size = os.stat(wal).st_size
                except OSError:
                    size = 0
                self.wal_peak = max(self.wal_peak, size)
                if size <= WAL_CHECKPOINT_BYTES and time.monotonic() < due:
                    continue
                due = time.monotonic() + interval
                try:
                    with self._checkpointing:  # fetchall: a pending row pins the WAL
                        db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self.checkpoints += 1
                except sqlite3.Error as exc:
                    self._failed("checkpoint", exc)
        finally:
            db.close()

    def _failed(self, what: str, exc: Exception) -> None:
        self.errors += 1
        self.last_error = f"{what}: {type(exc).__name__}: {exc}"

    def record(
        self, alarms: Sequence[Mapping[str, Any]] = (),
        verdicts: Sequence[Mapping[str, Any]] = (),
        opened: Mapping[str, Any] | None = None,
    ) -> tuple[list[int], bool]:
        """Journal alarms (each gets its seq), verdicts (each closes its open video) and a
        video start (``opened``: stream, video, type) in one transaction.

        Returns (the alarms' seqs, committed). Never raises on a database error: the rows
        stay pending and are committed, in order, by the next ``record`` or ``flush``
        that succeeds; the error is counted in ``health()``.
        """
        seqs = []
        now = time.time()
        for fields in alarms:
            seq = self._seq
            self._seq += 1
            seqs.append(seq)
            self.pending.append((_INSERT_ALARM, _alarm_row(seq, now, fields)))
        for fields in verdicts:
            self.pending.append((_INSERT_VERDICT, _verdict_row(now, fields)))
            self.pending.append((_CLOSE_VIDEO, (str(fields["stream"]), str(fields["video"]))))
        if opened is not None:
            self.pending.append((_OPEN_VIDEO, (str(opened["stream"]), str(opened["video"]),
                                               int(opened["type"]), self._seq, now)))
        if len(self.pending) > MAX_PENDING_ROWS:
            drop = len(self.pending) - MAX_PENDING_ROWS
            del self.pending[:drop]
            self.lost += drop
        return seqs, self.flush()

    def flush(self) -> bool:
        """Commit the pending rows in one transaction; False (rows kept) when it fails."""
        if not self.pending:
            return True
        db = self.db
        try:
            db.execute("BEGIN")
            for sql, params in self.pending:
                db.execute(sql, params)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._failed("commit", exc)
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # no transaction left to roll back (SQLite ended it itself)
            return False
        self.pending.clear()
        if self._checkpointer is not None:
            try:
                size = os.stat(self._wal).st_size  # ~1 µs, beside a commit's ~100
            except OSError:
                size = 0
            if size > WAL_MAX_BYTES:
                try:
                    with self._checkpointing:
                        db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                    self.checkpoints += 1
                except sqlite3.Error as exc:
                    self._failed("checkpoint", exc)
        return True

    def health(self) -> dict[str, Any]:
        """The journal's state for status: ``errors``, ``pending`` rows, ``lost`` rows,
        ``restored`` (times the file was deleted or replaced and written back),
        ``last_error`` (None when every write so far succeeded)."""
        return {"errors": self.errors, "pending": len(self.pending), "lost": self.lost,
                "restored": self.restored,
                "last_error": None if self.last_error is None else self.last_error[:200]}

    def check_file(self) -> str | None:
        """Whether ``PATH`` (and its WAL) is still the file this writer has open; if it was
        deleted or replaced, write the whole history back there (`_restore`) and return
        what happened, for the operator; None when all is well (a stat or two, ~µs)."""
        if self._db is None or not self._identity:
            return None
        now = self._file_identity()
        if now == self._identity:
            return None
        db_gone = now[0] is None
        what = ("deleted" if db_gone else "replaced") if now[0] != self._identity[0] else (
            "WAL deleted" if now[1] is None else "WAL replaced")
        try:
            moved = self._restore(foreign=not db_gone and now[0] != self._identity[0])
        except (OSError, sqlite3.Error) as exc:
            self._failed(f"journal file {what}; restoring it", exc)
            return (f"journal {self.path}: file {what} under the running monitor, and it "
                    f"could not be written back ({type(exc).__name__}: {exc})")
        self.restored += 1
        self.last_error = (f"journal file {what} under the running monitor: history "
                           f"restored from the open database, seq continues at {self._seq}")
        extra = f"; the file found there was moved to {moved}" if moved else ""
        return f"journal {self.path}: {self.last_error}{extra}"

    def _restore(self, foreign: bool) -> str | None:
        """Write the open database (all committed rows) to a new file at ``PATH`` and
        continue there; a ``foreign`` file at ``PATH`` is moved aside first (its name
        returned)."""
        self._stop_checkpointer()
        moved = None
        if foreign:
            moved = f"{self.path}.replaced-{int(time.time())}"
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(f"{self.path}{suffix}"):
                    os.replace(f"{self.path}{suffix}", f"{moved}{suffix}")
        fresh = Path(f"{self.path}.restoring")
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(f"{fresh}{suffix}"):
                os.unlink(f"{fresh}{suffix}")
        copy = sqlite3.connect(fresh, isolation_level=None)
        try:
            self.db.backup(copy)
        finally:
            copy.close()
        os.replace(fresh, self.path)
        for suffix in ("-wal", "-shm"):  # the old file's (or a stranger's): not ours now
            if os.path.exists(f"{self.path}{suffix}"):
                os.unlink(f"{self.path}{suffix}")
        old, self._db = self.db, None
        old.close()
        self._db = sqlite3.connect(self._uri, uri=True, isolation_level=None,
                                   check_same_thread=False)
        self._writer_pragmas(self._db)
        self._relock()
        self._identity = self._file_identity()
        self._start_checkpointer()
        return moved

    def _relock(self) -> None:
        """Take the owner lock again if ``PATH.lock`` went with the journal."""
        lock = f"{self.path}.lock"
        try:
            same = self._lock_fd is not None and os.fstat(self._lock_fd).st_ino == \
                os.stat(lock).st_ino
        except OSError:
            same = False
        if same:
            return
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OSError(f"{lock} is now held by another process") from None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
        self._lock_fd = fd

    def open_videos(self) -> list[dict[str, Any]]:
        """Videos started and never judged (the monitor stopped without their verdict),
        each with ``alarms``: how many alarms it raised before."""
        rows = self.db.execute(
            "SELECT o.stream, o.video, o.type, o.wall_time, (SELECT COUNT(*) FROM alarms a"
            " WHERE a.stream = o.stream AND a.video = o.video AND a.state = 'raise'"
            " AND a.seq >= o.first_seq) FROM open_videos o ORDER BY o.wall_time"
        ).fetchall()
        return [{"stream": s, "video": v, "type": t, "time": _iso(w), "alarms": int(n)}
                for s, v, t, w, n in rows]

    @contextmanager
    def batch(self) -> Iterator[None]:  # for scripts and tests; the monitor uses `record`
        """One transaction for the appends inside: one commit (~0.2 ms) instead of one per
        row, for the several events a single frame or video end can raise."""
        self.db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def append_alarm(self, fields: Mapping[str, Any]) -> int:
        """Commit one alarm and return its ``seq``; call this before publishing the alarm.

        ``fields`` holds the protocol's alarm fields except ``seq``; ``features`` is a map
        stored as JSON text.
        """
        seq = self._seq
        self.db.execute(_INSERT_ALARM, _alarm_row(seq, time.time(), fields))
        # Autocommit mode (outside `batch`): the INSERT is committed when execute returns.
        self._seq += 1
        return seq

    def append_verdict(self, fields: Mapping[str, Any]) -> int:
        """Commit one verdict (before publishing it); returns its journal id."""
        cur = self.db.execute(_INSERT_VERDICT, _verdict_row(time.time(), fields))
        return int(cur.lastrowid or 0)

    # ------------------------------------------------------------ reading

    def alarms(
        self, since: int | str | None = None, stream: str | None = None
    ) -> list[dict[str, Any]]:
        """Alarms in seq order, each a dict of the protocol's alarm fields plus ``time`` (ISO, UTC).

        ``since``: an int keeps alarms with ``seq > since``; a str is parsed like ``--since``
        (integer seq or ISO time, keeping alarms journaled at or after it).
        """
        since_seq, since_time = parse_since(since) if isinstance(since, str) else (since, None)
        where: list[str] = []
        params: list[Any] = []
        if since_seq is not None:
            where.append("seq > ?")
            params.append(since_seq)
        if since_time is not None:
            where.append("wall_time >= ?")
            params.append(since_time)
        if stream is not None:
            where.append("stream = ?")
            params.append(stream)
        # the columns are the wire's alarm fields, by name
        sql = f"SELECT {', '.join(ALARM_FIELDS)}, wall_time FROM alarms"
        if where:
            sql += " WHERE " + " AND ".join(where)
        out = []
        for row in self.db.execute(sql + " ORDER BY seq", params):
            alarm = dict(zip(ALARM_FIELDS, row[:-1], strict=True))
            alarm["features"] = json.loads(alarm["features"])
            alarm["time"] = _iso(row[-1])
            out.append(alarm)
        return out

    def verdicts(self, stream: str | None = None) -> list[dict[str, Any]]:
        """Verdicts in journal order, each a dict of the protocol's verdict fields plus ``time``."""
        extra = "partial, kinds" if self.version >= 2 else "0, '[]'"
        sql = (
            "SELECT id, wall_time, v, stream, video, type, frames, score, anomalous, alarms, t_ns,"
            f" {extra} FROM verdicts"
        )
        params: list[Any] = []
        if stream is not None:
            sql += " WHERE stream = ?"
            params.append(stream)
        out = []
        for row in self.db.execute(sql + " ORDER BY id", params):
            (id_, wall, v, stream_, video, type_, frames, score, anomalous, alarms, t_ns,
             partial, kinds) = row  # fmt: skip
            out.append({
                "v": v, "stream": stream_, "video": video, "type": type_, "frames": frames,
                "score": score, "anomalous": bool(anomalous), "alarms": alarms, "t_ns": t_ns,
                "partial": bool(partial), "kinds": json.loads(kinds), "id": id_,
                "time": _iso(wall),
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
        lo, hi = self.db.execute(
            "SELECT MIN(wall_time), MAX(wall_time) FROM alarms WHERE state = 'raise'"
        ).fetchone()
        span = 0.0 if lo is None else hi - lo
        bucket = next((b for b in HISTORY_BUCKETS_S if span / b <= max_buckets),
                      HISTORY_BUCKETS_S[-1])
        rows = self.db.execute(
            "SELECT CAST(wall_time / ? AS INTEGER) * ?, stream, kind, COUNT(*) FROM alarms"
            " WHERE state = 'raise' GROUP BY 1, 2, 3 ORDER BY 1, 2, 3 LIMIT ?",
            (bucket, bucket, HISTORY_MAX_ROWS),
        ).fetchall()
        return float(bucket), [(float(t), str(s), str(k), int(n)) for t, s, k, n in rows]

    def verdict_counts(self, bucket_s: float) -> list[tuple[float, str, bool, int]]:
        """Verdicts per time bucket (``bucket_s`` wide), stream and outcome: rows of
        (bucket start as Unix time, stream, anomalous, count), at most `HISTORY_MAX_ROWS`."""
        rows = self.db.execute(
            "SELECT CAST(wall_time / ? AS INTEGER) * ?, stream, anomalous, COUNT(*)"
            " FROM verdicts GROUP BY 1, 2, 3 ORDER BY 1, 2, 3 LIMIT ?",
            (bucket_s, bucket_s, HISTORY_MAX_ROWS),
        ).fetchall()
        return [(float(t), str(s), bool(a), int(n)) for t, s, a, n in rows]

    def close(self) -> None:
        """Stop the checkpoint thread, close the database and release the owner lock."""
        self._stop_checkpointer()
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
