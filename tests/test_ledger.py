"""The ledger: real SQLite in WAL mode, durable rows, exports."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from pathlib import Path

from overnight.ledger import Ledger, export_jsonl, export_tsv


def test_rows_round_trip_and_survive_reopening(tmp_path: Path):
    path = tmp_path / "ledger.sqlite"
    ledger = Ledger(path)
    a = ledger.insert("t1", "queued", commit_sha="a" * 40, description="baseline",
                      is_baseline=1, knobs={"LR": 0.001})
    ledger.update(a, status="keep", metric=1.5, metrics={"val_bpb": 1.5, "num_steps": 10.0},
                  peak_rss_mb=2048.0, started_at=10.0, finished_at=12.5)
    ledger.insert("t2", "queued")
    ledger.close()

    ledger = Ledger(path)
    row = ledger.get(a)
    assert row.status == "keep" and row.is_baseline and row.knobs == {"LR": 0.001}
    assert row.metrics["num_steps"] == 10.0
    assert row.duration_s == 2.5 and row.memory_gb == 2.0
    assert ledger.tags() == ["t1", "t2"]
    assert [r.id for r in ledger.experiments("t1", statuses=("keep",))] == [a]
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_mark_lost_takes_only_active_rows_of_the_tag(tmp_path: Path):
    ledger = Ledger(tmp_path / "l.sqlite")
    running = ledger.insert("t", "running")
    queued = ledger.insert("t", "queued")
    done = ledger.insert("t", "discard")
    other = ledger.insert("u", "running")
    lost = ledger.mark_lost("t", "the process stopped")
    assert sorted(r.id for r in lost) == [running, queued]
    assert ledger.get(running).status == "lost"
    assert ledger.get(running).reason == "the process stopped"
    assert ledger.get(done).status == "discard"
    assert ledger.get(other).status == "running"


def test_exports(tmp_path: Path):
    ledger = Ledger(tmp_path / "l.sqlite")
    a = ledger.insert("t", "keep", commit_sha="abcdef1234", metric=0.9979, peak_vram_mb=45060.2,
                      description="baseline")
    ledger.insert("t", "crash", commit_sha="0123456789", description="double\tthe width\nnow")
    rows = ledger.experiments("t")
    tsv = export_tsv(rows, "val_bpb")
    parsed = list(csv.reader(io.StringIO(tsv), delimiter="\t"))
    assert parsed[0] == ["commit", "val_bpb", "memory_gb", "status", "description"]
    assert parsed[1] == ["abcdef1", "0.997900", "44.0", "keep", "baseline"]
    assert parsed[2] == ["0123456", "0.000000", "0.0", "crash", "double the width now"]
    lines = export_jsonl(rows).splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["id"] == a and first["metric"] == 0.9979 and "duration_s" in first
