"""The ledger: every experiment and event in SQLite (WAL), and its exports.

Knows nothing about git or processes. Any process can open it and rebuild the
state of a loop: a resumed scheduler, `overnight status`, a dashboard.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

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


class Ledger:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # Autocommit: every write is its own durable transaction unless grouped explicitly.
        self.db = sqlite3.connect(path, isolation_level=None, timeout=30, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)
        have = {r["name"] for r in self.db.execute("PRAGMA table_info(experiments)")}
        for name, definition in _ADDED_COLUMNS.items():
            if name not in have:
                self.db.execute(f"ALTER TABLE experiments ADD COLUMN {name} {definition}")

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
