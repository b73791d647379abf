"""The ledger: every experiment and event in SQLite (WAL), and its exports.

Knows nothing about git or processes. Any process can open it and rebuild the
state of a loop: a resumed scheduler, `overnight status`, a dashboard.

Tamper evidence: rows change state and several processes write (the loop, `steer`), so
what is chained is the *writes*, not the rows. Every write appends, in the same SQLite
transaction, a `journal` entry holding what it wrote; each entry's hash covers the one
before it. `verify()` replays the journal and compares the result with the tables, so a
row edited by hand, an edited entry and a removed entry are all caught. The chain's head
(seq and hash) is also kept in a small file outside `.overnight/` (given by the caller),
so a file rewritten and re-chained from scratch does not match it.
"""

from __future__ import annotations

import array
import contextlib
import csv
import errno
import fcntl
import hashlib
import io
import json
import math
import operator
import os
import sqlite3
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from overnight.errors import ConfigError, IntegrityHalt, OvernightError
from overnight.status import ACTIVE, FAILED, FINAL, TSV_STATUS, Status  # noqa: F401 - FINAL

_SCHEMA = """
CREATE TABLE IF NOT EXISTS experiments (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    tag           TEXT NOT NULL,
    parent        TEXT,
    commit_sha    TEXT,
    status        TEXT NOT NULL,
    is_baseline   INTEGER NOT NULL DEFAULT 0,
    description   TEXT NOT NULL DEFAULT '',
    hypothesis    TEXT NOT NULL DEFAULT '',
    proposer      TEXT NOT NULL DEFAULT '',
    knobs         TEXT NOT NULL DEFAULT '{}',
    metric        REAL,
    metrics       TEXT NOT NULL DEFAULT '{}',
    delta         REAL,
    reason        TEXT NOT NULL DEFAULT '',
    returncode    INTEGER,
    peak_rss_mb   REAL,
    peak_vram_mb  REAL,
    slot          INTEGER,
    hardware      TEXT NOT NULL DEFAULT '',
    log_path      TEXT NOT NULL DEFAULT '',
    run_dir       TEXT NOT NULL DEFAULT '',
    retry_of      INTEGER,
    kept_commit   TEXT,
    runtime_knobs TEXT NOT NULL DEFAULT '{}',
    integrity     TEXT NOT NULL DEFAULT '{}',
    fingerprint   TEXT NOT NULL DEFAULT '',
    tokens_in     INTEGER NOT NULL DEFAULT 0,
    tokens_out    INTEGER NOT NULL DEFAULT 0,
    cost_usd      REAL NOT NULL DEFAULT 0,
    created_at    REAL NOT NULL,
    started_at    REAL,
    finished_at   REAL,
    repeat_of     INTEGER,
    estimate      REAL,
    runs          INTEGER NOT NULL DEFAULT 0,
    spread        REAL,
    noise         REAL,
    hw_class      TEXT NOT NULL DEFAULT '',
    decided_at    REAL
);
CREATE INDEX IF NOT EXISTS experiments_tag ON experiments(tag, status);
CREATE TABLE IF NOT EXISTS notes (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    tag           TEXT,
    ts            REAL NOT NULL,
    text          TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    tag           TEXT NOT NULL,
    ts            REAL NOT NULL,
    kind          TEXT NOT NULL,
    experiment_id INTEGER,
    message       TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS journal (
    seq           INTEGER PRIMARY KEY,
    ts            REAL NOT NULL,
    op            TEXT NOT NULL,
    payload       TEXT NOT NULL,
    prev          TEXT NOT NULL,
    hash          TEXT NOT NULL
);
"""
GENESIS = "0" * 64  # the `prev` of the first journal entry
_HEAD_SIZE = 20 + 1 + 64 + 1  # "<seq, right-aligned> <sha256>\n"


@dataclass
class Row:
    id: int
    tag: str
    parent: str | None
    commit_sha: str | None
    status: str
    is_baseline: bool
    description: str
    hypothesis: str
    proposer: str
    knobs: dict[str, float | int]
    metric: float | None
    metrics: dict[str, float]
    delta: float | None
    reason: str
    returncode: int | None
    peak_rss_mb: float | None
    peak_vram_mb: float | None
    slot: int | None
    hardware: str
    log_path: str
    run_dir: str
    retry_of: int | None
    kept_commit: str | None
    runtime_knobs: dict[str, object]  # knob values the attestation saw at exit: what really ran
    integrity: dict  # the tamper report of the run
    fingerprint: str  # normalized content of the editable files: duplicates have equal ones
    tokens_in: int  # what proposing it cost
    tokens_out: int
    cost_usd: float
    created_at: float
    started_at: float | None
    finished_at: float | None
    # The noise-aware judge (judge.py): a repeat run names its candidate (or the baseline);
    # a candidate carries its estimate from its runs, their number, the estimate's standard
    # error and the run-to-run noise the decision used.
    repeat_of: int | None = None
    estimate: float | None = None
    runs: int = 0
    spread: float | None = None
    noise: float | None = None
    hw_class: str = ""  # the hardware class it ran on (or must run on, while queued)
    # When the loop decided it: keeps are ordered by this, not by id (with parallel slots an
    # older candidate can be kept after a newer one, and then it is the incumbent).
    decided_at: float | None = None
    extra: dict = field(default_factory=dict, repr=False)

    @property
    def duration_s(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at

    @property
    def value(self) -> float | None:
        """What the candidate measures, as well as it is known: its estimate from all its
        runs once it has one, else its one run's metric."""
        return self.estimate if self.estimate is not None else self.metric

    @property
    def failed_start(self) -> bool:
        """A baseline that never got its number (it crashed, timed out, failed its checks or
        precheck, or was interrupted or never ran): its tag did not come into being with it,
        so it counts for nothing and is nowhere but in `show`, the JSONL and, until a
        baseline has a number, `status`. A tampered baseline is not one: that stays in view."""
        return (self.is_baseline and self.repeat_of is None
                and self.status in FAILED | {Status.REJECTED, Status.LOST})

    @property
    def memory_gb(self) -> float | None:
        """GPU memory when the script reports it (as autoresearch does), else the tree's RSS."""
        if self.peak_vram_mb:
            return self.peak_vram_mb / 1024
        if self.peak_rss_mb is not None:
            return self.peak_rss_mb / 1024
        return None

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        d["duration_s"] = self.duration_s
        d["memory_gb"] = self.memory_gb
        return d


_JSON_COLUMNS = ("knobs", "metrics", "runtime_knobs", "integrity")
# Columns added after the first release, with their definitions, for older ledgers.
_ADDED_COLUMNS = {
    "runtime_knobs": "TEXT NOT NULL DEFAULT '{}'",
    "integrity": "TEXT NOT NULL DEFAULT '{}'",
    "fingerprint": "TEXT NOT NULL DEFAULT ''",
    "tokens_in": "INTEGER NOT NULL DEFAULT 0",
    "tokens_out": "INTEGER NOT NULL DEFAULT 0",
    "cost_usd": "REAL NOT NULL DEFAULT 0",
    "repeat_of": "INTEGER",
    "estimate": "REAL",
    "runs": "INTEGER NOT NULL DEFAULT 0",
    "spread": "REAL",
    "noise": "REAL",
    "hw_class": "TEXT NOT NULL DEFAULT ''",
    "decided_at": "REAL",
}
_COLUMNS = [f.name for f in fields(Row) if f.name != "extra"]


def _to_row(r: sqlite3.Row) -> Row:
    d = dict(r)
    for k in _JSON_COLUMNS:
        d[k] = json.loads(d[k])
    d["is_baseline"] = bool(d["is_baseline"])
    return Row(**d)


# -- why a ledger cannot be opened or written ---------------------------------

_FS_IOC_GETFLAGS = 0x80006601 | (struct.calcsize("l") << 16)  # _IOR('f', 1, long)
_FS_IMMUTABLE_FL = 0x10


def _immutable(path: Path) -> bool:
    """True if `path` carries the immutable attribute (`chattr +i`)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        flags = array.array("l", [0])
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, flags, True)
    except OSError:  # a file system without inode flags
        return False
    finally:
        os.close(fd)
    return bool(flags[0] & _FS_IMMUTABLE_FL)


def disk_full(path: Path) -> bool:
    """True if the file system holding `path` (or its nearest existing parent) has no room."""
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 1 << 20


def unwritable(path: Path) -> str | None:
    """Why the ledger at `path` cannot be written, with what to do; None if it can.

    SQLite writes the ledger and creates ledger.sqlite-wal and -shm next to it, so both
    the file and its directory must be writable.
    """
    for target in (path.parent, path):
        if not target.exists() or os.access(target, os.W_OK):
            continue
        if os.statvfs(target).f_flag & os.ST_RDONLY:
            return (f"the file system holding {target} is mounted read-only: remount it "
                    "read-write, or work in a copy of the repository")
        if _immutable(target):
            return (f"{target} is immutable (chattr +i): run `chattr -i {target}` as root, "
                    "then the same command again")
        kind = "directory" if target.is_dir() else "file"
        return (f"the {kind} {target} is read-only for this user: make it writable "
                f"(`chmod u+w {target}`, or run as its owner), then the same command again")
    return None


def open_error(path: Path, e: sqlite3.Error | OSError) -> OvernightError:
    """The error a user sees when the ledger at `path` cannot be opened: cause and remedy."""
    name = getattr(e, "sqlite_errorname", "")
    text = str(e).lower()
    if isinstance(e, OSError) and e.errno in (errno.ENOTDIR, errno.EEXIST):
        return ConfigError(f"{path.parent} is not a directory: overnight keeps its ledger "
                           "there; move that file away and run the same command again")
    if (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) \
            or name == "SQLITE_FULL" or "disk is full" in text \
            or (name.startswith("SQLITE_IOERR") or "disk i/o error" in text) and disk_full(path):
        return OvernightError(f"the disk holding {path.parent} is full: free space and run the "
                              "same command again; nothing recorded is lost")
    if name in ("SQLITE_NOTADB", "SQLITE_CORRUPT") or "not a database" in text \
            or "malformed" in text:
        return ConfigError(
            f"{path} is damaged or not a SQLite database ({e}): move it aside (`mv {path} "
            f"{path}.damaged`) and run again to start a new ledger; kept commits stay on the "
            "overnight/<tag> branches")
    if name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM")) \
            or isinstance(e, PermissionError) or "readonly" in text or "unable to open" in text:
        why = unwritable(path)
        if why is not None:
            return OvernightError(f"cannot open the ledger {path}: {why}")
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in text:
        return OvernightError(f"the ledger {path} stayed locked by another process for 30 s: "
                              "wait for it to finish, or stop it, then run the same command again")
    return OvernightError(f"cannot open the ledger {path}: {e}; check the file and its disk, "
                          "then run the same command again")


def _refuse_foreign(db: sqlite3.Connection, path: Path) -> None:
    """Leave alone a SQLite file that is not a ledger: tables but no experiments table, or an
    experiments table without the columns every ledger has had."""
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                       "AND name NOT LIKE 'sqlite_%'")}
    if not tables:
        return
    if "experiments" in tables:
        have = {r[1] for r in db.execute("PRAGMA table_info(experiments)")}
        missing = [c for c in _COLUMNS if c not in have and c not in _ADDED_COLUMNS]
        if not missing:
            return
        what = f"an experiments table without {', '.join(missing[:4])}"
    else:
        what = f"tables {', '.join(sorted(tables))}"
    raise ConfigError(
        f"{path} is not an overnight ledger (it is a SQLite database with {what}): move it "
        f"aside (`mv {path} {path}.other`) and run again to start a new ledger")


class Ledger:
    def __init__(self, path: Path, head: Path | None = None):
        """`head`: where the chain's head is kept, outside the directory of `path` (None:
        the chain is verified on its own, without a head to compare it with)."""
        self.path = path
        self.head = head
        db: sqlite3.Connection | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Autocommit: every write is its own durable transaction unless grouped explicitly.
            db = sqlite3.connect(path, isolation_level=None, timeout=30, check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            _refuse_foreign(db, path)
            db.executescript(_SCHEMA)
            have = {r["name"] for r in db.execute("PRAGMA table_info(experiments)")}
            for name, definition in _ADDED_COLUMNS.items():
                if name not in have:
                    db.execute(f"ALTER TABLE experiments ADD COLUMN {name} {definition}")
        except (sqlite3.Error, OSError, OvernightError) as e:
            if db is not None:
                db.close()
            if isinstance(e, OvernightError):
                raise
            raise open_error(path, e) from None
        self.db = db
        self._replay: _Replay | None = None  # the journal as last verified
        self._head_fd: int | None = None  # the head file, also the writers' lock
        if head is not None:
            head.parent.mkdir(parents=True, exist_ok=True)
            self._head_fd = os.open(head, os.O_RDWR | os.O_CREAT, 0o644)
        self._adopt()

    def close(self) -> None:
        self.db.close()
        if self._head_fd is not None:
            os.close(self._head_fd)
            self._head_fd = None

    # -- writing -------------------------------------------------------------

    def insert(self, tag: str, status: str, **values) -> int:
        values = {"tag": tag, "status": status, "created_at": time.time(), **values}
        for k in _JSON_COLUMNS:
            if k in values:
                values[k] = json.dumps(values[k])
        cols = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        with self._writing() as journal:
            cur = self.db.execute(
                f"INSERT INTO experiments ({cols}) VALUES ({marks})", tuple(values.values())
            )
            rid = int(cur.lastrowid)
            journal.append(("insert", {"id": rid, "row": self._stored("experiments", rid)}))
        return rid

    def update(self, experiment_id: int, **values) -> None:
        for k in _JSON_COLUMNS:
            if k in values:
                values[k] = json.dumps(values[k])
        sets = ", ".join(f"{k} = ?" for k in values)
        with self._writing() as journal:
            self.db.execute(
                f"UPDATE experiments SET {sets} WHERE id = ?", (*values.values(), experiment_id)
            )
            stored = self._stored("experiments", experiment_id, list(values))
            journal.append(("update", {"id": experiment_id, "set": stored}))

    def event(self, tag: str, kind: str, message: str = "",
              experiment_id: int | None = None) -> None:
        with self._writing() as journal:
            cur = self.db.execute(
                "INSERT INTO events (tag, ts, kind, experiment_id, message) "
                "VALUES (?, ?, ?, ?, ?)", (tag, time.time(), kind, experiment_id, message),
            )
            journal.append(("event", {"row": self._stored("events", int(cur.lastrowid))}))

    def mark_lost(self, tag: str, reason: str) -> list[Row]:
        """Experiments a dead process left queued or running become `lost`, atomically; one
        that never started says so rather than `reason`."""
        with self._writing() as journal:
            rows = self.experiments(tag, statuses=ACTIVE)
            now = time.time()
            for status, why in (("running", reason),
                                ("queued", "never started: the loop stopped first")):
                ids = [r.id for r in rows if r.status == status]
                if not ids:
                    continue
                self.db.execute(
                    "UPDATE experiments SET status = 'lost', reason = ?, finished_at = ? "
                    "WHERE tag = ? AND status = ?", (why, now, tag, status))
                journal.append(("mark_lost", {
                    "ids": ids, "set": {"status": "lost", "reason": why, "finished_at": now}}))
        return rows

    def add_note(self, text: str, tag: str | None = None) -> int:
        """A steering note from the user, for the proposer (tag None: every tag)."""
        with self._writing() as journal:
            cur = self.db.execute("INSERT INTO notes (tag, ts, text) VALUES (?, ?, ?)",
                                  (tag, time.time(), text))
            nid = int(cur.lastrowid)
            journal.append(("note", {"row": self._stored("notes", nid)}))
        return nid

    # -- the journal -----------------------------------------------------------

    @contextlib.contextmanager
    def _writing(self) -> Iterator[list[tuple[str, dict]]]:
        """One write transaction: the caller's changes and their journal entries commit
        together; the head file follows the commit.

        Writers hold the head's lock from BEGIN to the head write, so the head is never more
        than one entry behind the journal (one: a crash between the commit and the head
        write), and a reader holding the lock sees them agree.
        """
        entries: list[tuple[str, dict]] = []
        with self._head_lock(fcntl.LOCK_EX):
            self.db.execute("BEGIN IMMEDIATE")
            try:
                seq, prev = self._journal_end()
                self._check_head_before_append(seq)
                yield entries
                for op, data in entries:
                    seq += 1
                    ts = time.time()
                    payload = json.dumps(data, sort_keys=True, separators=(",", ":"))
                    digest = _entry_hash(prev, seq, ts, op, payload)
                    self.db.execute(
                        "INSERT INTO journal (seq, ts, op, payload, prev, hash) "
                        "VALUES (?, ?, ?, ?, ?, ?)", (seq, ts, op, payload, prev, digest))
                    prev = digest
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            if entries:
                self._write_head(seq, prev)

    def _stored(self, table: str, rid: int, columns: list[str] | None = None) -> dict:
        """A row's values as SQLite stored them (what verification will read back)."""
        cols = ", ".join(columns) if columns else "*"
        r = self.db.execute(f"SELECT {cols} FROM {table} WHERE id = ?", (rid,)).fetchone()
        return dict(r) if r is not None else {}

    def _journal_end(self) -> tuple[int, str]:
        r = self.db.execute("SELECT seq, hash FROM journal ORDER BY seq DESC LIMIT 1").fetchone()
        return (int(r[0]), str(r[1])) if r else (0, GENESIS)

    @contextlib.contextmanager
    def _head_lock(self, mode: int) -> Iterator[None]:
        if self._head_fd is None:
            yield
            return
        fcntl.flock(self._head_fd, mode)
        try:
            yield
        finally:
            fcntl.flock(self._head_fd, fcntl.LOCK_UN)

    def _read_head(self) -> tuple[int, str] | None:
        """(seq, hash) of the head file; None when it is empty (no chain yet)."""
        if self._head_fd is None:
            return None
        text = os.pread(self._head_fd, _HEAD_SIZE, 0).decode(errors="replace")
        if not text.strip():
            return None
        try:
            seq, digest = text.split()
            return int(seq), digest
        except ValueError:
            return -1, ""  # unreadable: never matches an entry

    def _write_head(self, seq: int, digest: str) -> None:
        """One fixed-size write at offset 0 of an open file, well inside one disk sector: a
        reader (under the lock) sees the old head or the new one, and it costs microseconds,
        not the milliseconds of a rename on some filesystems."""
        if self._head_fd is None:
            return
        os.pwrite(self._head_fd, f"{seq:>20} {digest}\n".encode(), 0)

    def _check_head_before_append(self, seq: int) -> None:
        """Never extend a chain that disagrees with the head: that would re-anchor a
        rewritten journal. The full replay is `verify()`; this is the cheap part of it."""
        if self.head is None:
            return
        problem = _head_problem(self._read_head(), seq, self._entry_hash_at, self.head)
        if problem:
            raise IntegrityHalt(self._tampered_message(problem))

    def _entry_hash_at(self, seq: int) -> str | None:
        r = self.db.execute("SELECT hash FROM journal WHERE seq = ?", (seq,)).fetchone()
        return str(r[0]) if r else None

    def _adopt(self) -> None:
        """A ledger from before the journal: one entry holding its current rows starts the
        chain. Not when a head exists: an emptied journal is an attack, not an old ledger.
        An empty ledger (deleted to start afresh) starts a new chain: it has nothing to lose."""
        if self._journal_end()[0]:
            return
        with self._head_lock(fcntl.LOCK_EX):
            tables = self._tables()
            if self._head_fd is not None and not any(tables.values()):
                os.ftruncate(self._head_fd, 0)
        if not any(tables.values()) or self._read_head() is not None:
            return
        with self._writing() as journal:
            if not self._journal_end()[0]:  # another process may have adopted it first
                journal.append(("adopt", self._tables()))

    def _tables(self) -> dict[str, list[dict]]:
        return {t: [dict(r) for r in self.db.execute(f"SELECT * FROM {t} ORDER BY id")]
                for t in ("experiments", "notes", "events")}

    def verify(self) -> None:
        """Replay the journal and compare it with the tables and the head; raise
        IntegrityHalt naming the first thing that does not agree."""
        with self._head_lock(fcntl.LOCK_SH):
            cur = self.db.cursor()
            cur.row_factory = None
            cur.execute("BEGIN")  # one snapshot of the journal and the tables
            try:
                head = self._read_head()
                entries = cur.execute(
                    "SELECT seq, ts, op, payload, prev, hash FROM journal ORDER BY seq"
                ).fetchall()
                tables = {}
                for table in ("experiments", "notes", "events"):
                    cur.execute(f"SELECT * FROM {table} ORDER BY id")
                    tables[table] = ([d[0] for d in cur.description], cur.fetchall())
            finally:
                cur.execute("COMMIT")
        replay = _Replay()
        problem = replay.feed(entries) or _head_check(replay, head, self.head, entries) \
            or replay.compare(tables)
        if problem:
            raise IntegrityHalt(self._tampered_message(problem))
        self._replay = replay

    def verify_rows(self, ids: list[int]) -> None:
        """The cheap check before a judgment: the journal since the last check (its chain and
        the head), and the experiments it reads (`ids`) and that were written since, against
        the replay. Costs what changed, not the ledger's size; `verify()` checks everything
        (at start, at exit, and in `overnight status`)."""
        replay = self._replay
        if replay is None:
            self.verify()
            return
        with self._head_lock(fcntl.LOCK_SH):
            cur = self.db.cursor()
            cur.row_factory = None
            cur.execute("BEGIN")
            try:
                head = self._read_head()
                anchor = cur.execute("SELECT hash FROM journal WHERE seq = ?",
                                     (replay.seq,)).fetchone()
                entries = cur.execute(
                    "SELECT seq, ts, op, payload, prev, hash FROM journal WHERE seq > ? "
                    "ORDER BY seq", (replay.seq,)).fetchall()
                touched = set(ids)
                problem = None
                if replay.seq and (anchor is None or anchor[0] != replay.prev):
                    problem = (f"journal entry #{replay.seq} changed since it was verified: "
                               "the journal was rewritten")
                else:
                    problem = replay.feed(entries, touched)
                if problem is None:
                    marks = ", ".join("?" for _ in touched) or "NULL"
                    cur.execute(f"SELECT * FROM experiments WHERE id IN ({marks})",
                                tuple(touched))
                    cols = [d[0] for d in cur.description]
                    problem = replay.compare_some("experiments", cols, cur.fetchall(), touched)
            finally:
                cur.execute("COMMIT")
        problem = problem or _head_check(replay, head, self.head, entries)
        if problem:
            self._replay = None
            raise IntegrityHalt(self._tampered_message(problem))

    def _tampered_message(self, problem: str) -> str:
        return (f"the ledger {self.path} was changed outside overnight: {problem}. Nothing "
                "more is recorded on a ledger that cannot be trusted: restore the file from a "
                "backup (or move it away to start afresh) and find what wrote to it; an "
                "experiment running without a sandbox can ([run] sandbox = \"bwrap\").")

    # -- reading -------------------------------------------------------------

    def get(self, experiment_id: int) -> Row | None:
        r = self.db.execute("SELECT * FROM experiments WHERE id = ?", (experiment_id,)).fetchone()
        return _to_row(r) if r else None

    def experiments(self, tag: str | None = None,
                    statuses: tuple[str, ...] | frozenset[str] | None = None) -> list[Row]:
        sql, args = "SELECT * FROM experiments WHERE 1=1", []
        if tag is not None:
            sql += " AND tag = ?"
            args.append(tag)
        if statuses:
            sql += f" AND status IN ({', '.join('?' for _ in statuses)})"
            args.extend(statuses)
        return [_to_row(r) for r in self.db.execute(sql + " ORDER BY id", args)]

    def last(self, tag: str, status: str) -> Row | None:
        """The row of that status decided last (the incumbent, for "keep")."""
        r = self.db.execute(
            "SELECT * FROM experiments WHERE tag = ? AND status = ? "
            "ORDER BY COALESCE(decided_at, 0) DESC, id DESC LIMIT 1",
            (tag, status),
        ).fetchone()
        return _to_row(r) if r else None

    def count(self, tag: str, exclude: tuple[str, ...] = ()) -> int:
        marks = ", ".join("?" for _ in exclude) or "''"
        r = self.db.execute(
            f"SELECT COUNT(*) FROM experiments WHERE tag = ? AND status NOT IN ({marks})",
            (tag, *exclude),
        ).fetchone()
        return int(r[0])

    def tags(self) -> list[str]:
        rows = self.db.execute(
            "SELECT tag, MAX(id) AS last FROM experiments GROUP BY tag ORDER BY last")
        return [r["tag"] for r in rows]

    def notes(self, tag: str) -> list[str]:
        rows = self.db.execute("SELECT text FROM notes WHERE tag IS NULL OR tag = ? ORDER BY id",
                               (tag,))
        return [r["text"] for r in rows]

    def spend(self, tag: str) -> tuple[int, int, float]:
        """Tokens in, tokens out and dollars spent on proposals for a tag."""
        r = self.db.execute(
            "SELECT COALESCE(SUM(tokens_in), 0), COALESCE(SUM(tokens_out), 0), "
            "COALESCE(SUM(cost_usd), 0) FROM experiments WHERE tag = ?", (tag,)).fetchone()
        return int(r[0]), int(r[1]), float(r[2])

    def events(self, tag: str, after: int = 0) -> list[dict]:
        """The tag's events, oldest first; `after`: only those with a larger id."""
        rows = self.db.execute("SELECT * FROM events WHERE tag = ? AND id > ? ORDER BY id",
                               (tag, after))
        return [dict(r) for r in rows]

    def last_event_id(self) -> int:
        return int(self.db.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0])


# -- verification -------------------------------------------------------------

def _entry_hash(prev: str, seq: int, ts: float, op: str, payload: str) -> str:
    return hashlib.sha256(f"{prev}\n{seq}\n{ts!r}\n{op}\n{payload}".encode()).hexdigest()


def _head_problem(head: tuple[int, str] | None, seq: int,
                  hash_at: Callable[[int], str | None], where: Path) -> str | None:
    """Does a journal ending at (seq, digest) agree with the head file? hash_at(seq) -> the
    journal's hash at seq. One entry past the head is a crash between commit and head write."""
    if head is None:
        if seq == 0:
            return None
        return f"the chain head {where} is missing, but the journal has {seq} entries"
    head_seq, head_hash = head
    if head_seq < 0:
        return f"the chain head {where} is unreadable"
    if seq < head_seq:
        return (f"the journal ends at entry #{seq} but the head {where} records #{head_seq}: "
                "journal entries were removed")
    if seq > head_seq + 1:
        return (f"the journal has {seq - head_seq} entries past the head {where} "
                f"(#{head_seq}): they were written outside overnight")
    if hash_at(head_seq) != head_hash:
        return (f"journal entry #{head_seq} does not match the head {where}: the journal was "
                "rewritten")
    return None


_decode = json.JSONDecoder().decode


def _same(a: object, b: object) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float)
                      and math.isnan(a) and math.isnan(b))


class _Replay:
    """The tables as the journal says they are, replayed entry by entry (and resumable)."""

    def __init__(self) -> None:
        self.state: dict[str, dict[int, dict]] = {"experiments": {}, "notes": {}, "events": {}}
        self.written_by: dict[tuple[str, int], int] = {}  # (table, id) -> last journal entry
        self.seq = 0
        self.prev = GENESIS

    def feed(self, entries: list[tuple], touched: set[int] | None = None) -> str | None:
        """Replay `entries` (the next ones after `seq`); the ids of experiments they write
        go into `touched`. The first problem of the chain, or None."""
        exp = self.state["experiments"]
        for seq, ts, op, payload, prev_col, digest in entries:
            if seq != self.seq + 1:
                return f"journal entry #{self.seq + 1} is missing (the next one is #{seq})"
            if prev_col != self.prev:
                return (f"journal entry #{seq} ({op}) does not follow entry #{seq - 1}: an "
                        "entry was edited, inserted or removed")
            if _entry_hash(self.prev, seq, ts, op, payload) != digest:
                return f"journal entry #{seq} ({op}) was edited: its hash does not match it"
            self.seq, self.prev = seq, digest
            data = _decode(payload)
            ids: list[int] = []
            if op == "insert":
                exp[data["id"]] = data["row"]
                ids = [data["id"]]
            elif op == "update":
                exp.setdefault(data["id"], {}).update(data["set"])
                ids = [data["id"]]
            elif op == "mark_lost":
                for rid in data["ids"]:
                    exp.setdefault(rid, {}).update(data["set"])
                ids = list(data["ids"])
            elif op in ("event", "note"):
                table = "events" if op == "event" else "notes"
                self.state[table][data["row"]["id"]] = data["row"]
                self.written_by[table, data["row"]["id"]] = seq
            elif op == "adopt":
                for table, rows in data.items():
                    for row in rows:
                        self.state[table][row["id"]] = row
                        self.written_by[table, row["id"]] = seq
            else:
                return f"journal entry #{seq} has an unknown operation {op!r}"
            for rid in ids:
                self.written_by["experiments", rid] = seq
            if touched is not None:
                touched.update(ids)
        return None

    def compare(self, tables: dict[str, tuple[list[str], list[tuple]]]) -> str | None:
        """Every row of every table against the replay."""
        for table, (cols, rows) in tables.items():
            problem = self.compare_some(table, cols, rows, None)
            if problem:
                return problem
        return None

    def compare_some(self, table: str, cols: list[str], rows: list[tuple],
                     ids: set[int] | None) -> str | None:
        """`rows` against the replay; with `ids`, only those rows were read (a missing one
        was deleted); without, they are the whole table."""
        want = self.state[table]
        noun = {"experiments": "experiment", "notes": "note", "events": "event"}[table]
        as_row = operator.itemgetter(*cols)
        seen = set()
        for row in rows:
            rid = row[0]
            seen.add(rid)
            replayed = want.get(rid)
            if replayed is None:
                return f"{noun} #{rid} was added outside overnight (the journal never wrote it)"
            if len(replayed) == len(cols) and as_row(replayed) == row:
                continue
            for i, col in enumerate(cols):
                # A column added after the row was journaled is not compared.
                if col in replayed and not _same(replayed[col], row[i]):
                    return (f"{noun} #{rid}: {col} is {row[i]!r} but journal entry "
                            f"#{self.written_by[table, rid]} wrote {replayed[col]!r}")
        missing = sorted((set(want) if ids is None else {i for i in ids if i in want}) - seen)
        if missing:
            rid = missing[0]
            return (f"{noun} #{rid} was deleted (journal entry "
                    f"#{self.written_by[table, rid]} wrote it)")
        return None


def _head_check(replay: _Replay, head: tuple[int, str] | None, where: Path | None,
                entries: list[tuple]) -> str | None:
    if where is None:
        return None
    hashes = {e[0]: e[5] for e in entries[-2:]}
    hashes.setdefault(replay.seq, replay.prev)
    return _head_problem(head, replay.seq, hashes.get, where)


# -- exports ------------------------------------------------------------------

def keeps_in_order(rows: list[Row]) -> list[Row]:
    """The kept rows in the order they were kept (the last one is the incumbent), which is
    not always the order of their ids."""
    return sorted((r for r in rows if r.status == Status.KEEP),
                  key=lambda r: (r.decided_at or 0.0, r.id))


def export_tsv(rows: list[Row], metric: str) -> str:
    """The karpathy/autoresearch results.tsv: commit, metric, memory_gb, status, description.

    One row per candidate once it is decided (the baseline included), in karpathy's four
    statuses (status.TSV_STATUS: timeout and tampered are crash, checks_failed is discard);
    its metric is the candidate's value (the estimate from its runs when it has one). Repeat
    runs, rejected proposals, lost runs, failed starts and undecided candidates are only in
    the JSONL.
    """
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n")
    w.writerow(["commit", metric, "memory_gb", "status", "description"])
    for r in rows:
        status = TSV_STATUS.get(r.status)  # a Status is a str: "keep" finds Status.KEEP
        if status is None or r.repeat_of is not None or r.failed_start:
            continue
        value = r.value
        shown = f"{value:.6f}" if value is not None and status != "crash" else "0.000000"
        mem = f"{r.memory_gb:.1f}" if r.memory_gb is not None else "0.0"
        desc = " ".join((r.description or "").split())  # one line, no tabs
        # A keep is named by the commit that stays on overnight/<tag>, as in autoresearch's
        # own file; anything else by the candidate commit that ran.
        commit = r.kept_commit if r.status == "keep" and r.kept_commit else r.commit_sha
        w.writerow([(commit or "")[:7], shown, mem, status, desc])
    return buf.getvalue()


def export_jsonl(rows: list[Row]) -> str:
    """Every row (repeats, rejected, lost and undecided ones too) with every field, and its
    `value` (the estimate when there is one, else the metric)."""
    return "".join(json.dumps({**r.to_dict(), "value": r.value}, sort_keys=True) + "\n"
                   for r in rows)
