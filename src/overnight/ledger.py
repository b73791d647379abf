"""The ledger: every experiment and event in SQLite (WAL), and its exports.

Knows nothing about git or processes. Any process can open it and rebuild the
state of a loop: a resumed scheduler, `overnight status`, a dashboard.
"""

from __future__ import annotations

import array
import csv
import errno
import fcntl
import io
import json
import os
import sqlite3
import struct
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from overnight.errors import ConfigError, OvernightError

FINAL = ("keep", "discard", "crash", "timeout", "tampered", "rejected", "checks_failed", "lost")
ACTIVE = ("queued", "running")

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
    finished_at   REAL
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
"""


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
    extra: dict = field(default_factory=dict, repr=False)

    @property
    def duration_s(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at

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
    def __init__(self, path: Path):
        self.path = path
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

    def close(self) -> None:
        self.db.close()

    # -- writing -------------------------------------------------------------

    def insert(self, tag: str, status: str, **values) -> int:
        values = {"tag": tag, "status": status, "created_at": time.time(), **values}
        for k in _JSON_COLUMNS:
            if k in values:
                values[k] = json.dumps(values[k])
        cols = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        cur = self.db.execute(
            f"INSERT INTO experiments ({cols}) VALUES ({marks})", tuple(values.values())
        )
        return int(cur.lastrowid)

    def update(self, experiment_id: int, **values) -> None:
        for k in _JSON_COLUMNS:
            if k in values:
                values[k] = json.dumps(values[k])
        sets = ", ".join(f"{k} = ?" for k in values)
        self.db.execute(
            f"UPDATE experiments SET {sets} WHERE id = ?", (*values.values(), experiment_id)
        )

    def event(self, tag: str, kind: str, message: str = "",
              experiment_id: int | None = None) -> None:
        self.db.execute(
            "INSERT INTO events (tag, ts, kind, experiment_id, message) VALUES (?, ?, ?, ?, ?)",
            (tag, time.time(), kind, experiment_id, message),
        )

    def mark_lost(self, tag: str, reason: str) -> list[Row]:
        """Experiments a dead process left queued or running become `lost`, atomically."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            rows = self.experiments(tag, statuses=ACTIVE)
            self.db.execute(
                "UPDATE experiments SET status = 'lost', reason = ?, finished_at = ? "
                "WHERE tag = ? AND status IN ('queued', 'running')",
                (reason, time.time(), tag),
            )
        return rows

    # -- reading -------------------------------------------------------------

    def get(self, experiment_id: int) -> Row | None:
        r = self.db.execute("SELECT * FROM experiments WHERE id = ?", (experiment_id,)).fetchone()
        return _to_row(r) if r else None

    def experiments(self, tag: str | None = None,
                    statuses: tuple[str, ...] | None = None) -> list[Row]:
        sql, args = "SELECT * FROM experiments WHERE 1=1", []
        if tag is not None:
            sql += " AND tag = ?"
            args.append(tag)
        if statuses:
            sql += f" AND status IN ({', '.join('?' for _ in statuses)})"
            args.extend(statuses)
        return [_to_row(r) for r in self.db.execute(sql + " ORDER BY id", args)]

    def last(self, tag: str, status: str) -> Row | None:
        r = self.db.execute(
            "SELECT * FROM experiments WHERE tag = ? AND status = ? ORDER BY id DESC LIMIT 1",
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

    def add_note(self, text: str, tag: str | None = None) -> int:
        """A steering note from the user, for the proposer (tag None: every tag)."""
        cur = self.db.execute("INSERT INTO notes (tag, ts, text) VALUES (?, ?, ?)",
                              (tag, time.time(), text))
        return int(cur.lastrowid)

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

    def events(self, tag: str) -> list[dict]:
        rows = self.db.execute("SELECT * FROM events WHERE tag = ? ORDER BY id", (tag,))
        return [dict(r) for r in rows]


# -- exports ------------------------------------------------------------------

def export_tsv(rows: list[Row], metric: str) -> str:
    """The karpathy/autoresearch results.tsv: commit, metric, memory_gb, status, description."""
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n")
    w.writerow(["commit", metric, "memory_gb", "status", "description"])
    for r in rows:
        value = f"{r.metric:.6f}" if r.metric is not None else "0.000000"
        mem = f"{r.memory_gb:.1f}" if r.memory_gb is not None else "0.0"
        desc = " ".join((r.description or "").split())  # one line, no tabs
        w.writerow([(r.commit_sha or "")[:7], value, mem, r.status, desc])
    return buf.getvalue()


def export_jsonl(rows: list[Row]) -> str:
    return "".join(json.dumps(r.to_dict(), sort_keys=True) + "\n" for r in rows)
