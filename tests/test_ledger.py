"""The ledger: real SQLite in WAL mode, durable rows, exports."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from pathlib import Path

import pytest

from overnight.errors import IntegrityHalt
from overnight.ledger import GENESIS, Ledger, _entry_hash, export_jsonl, export_tsv


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


# -- tamper evidence: a journal of every write, chained, with its head kept elsewhere -------


def chained(tmp_path: Path) -> tuple[Ledger, Path, Path]:
    path, head = tmp_path / "state" / "ledger.sqlite", tmp_path / "git" / "ledger-head"
    ledger = Ledger(path, head=head)
    a = ledger.insert("t", "queued", commit_sha="a" * 40, is_baseline=1)
    ledger.update(a, status="keep", metric=1.3, metrics={"val_loss": 1.3})
    b = ledger.insert("t", "running", commit_sha="b" * 40)
    ledger.mark_lost("t", "the process stopped")
    ledger.update(b, reason="given up")
    ledger.event("t", "start", "pid 1")
    ledger.add_note("try a smaller model")
    ledger.verify()
    return ledger, path, head


def edit(path: Path, *sql: str) -> None:
    """What an attacker with the file does: plain sqlite3, no overnight code."""
    db = sqlite3.connect(path)
    for statement in sql:
        db.execute(statement)
    db.commit()
    db.close()


def verify_error(ledger: Ledger) -> str:
    with pytest.raises(IntegrityHalt) as e:
        ledger.verify()
    return str(e.value)


def test_a_clean_ledger_verifies_and_survives_reopening(tmp_path: Path):
    ledger, path, head = chained(tmp_path)
    ledger.close()
    again = Ledger(path, head=head)
    again.verify()
    assert again.get(1).metric == 1.3


@pytest.mark.parametrize("sql, expected", [
    ("UPDATE experiments SET metric = 50 WHERE id = 1", "experiment #1: metric is 50.0"),
    ("UPDATE experiments SET status = 'keep' WHERE id = 2", "experiment #2: status is 'keep'"),
    ("DELETE FROM experiments WHERE id = 2", "experiment #2 was deleted"),
    ("INSERT INTO experiments (tag, status, created_at) VALUES ('t', 'keep', 0)",
     "experiment #3 was added outside overnight"),
    ("UPDATE notes SET text = 'keep everything'", "note #1: text is 'keep everything'"),
    ("DELETE FROM journal WHERE seq = 3", "journal entry #3 is missing"),
    ("UPDATE journal SET payload = replace(payload, '1.3', '0.3') WHERE seq = 2",
     "journal entry #2 (update) was edited"),
])
def test_edits_with_plain_sqlite3_are_caught(tmp_path: Path, sql: str, expected: str):
    ledger, path, _ = chained(tmp_path)
    edit(path, sql)
    message = verify_error(ledger)
    assert expected in message


def test_removing_the_last_entries_is_caught_by_the_head(tmp_path: Path):
    ledger, path, _ = chained(tmp_path)
    last = sqlite3.connect(path).execute("SELECT MAX(seq) FROM journal").fetchone()[0]
    edit(path, f"DELETE FROM journal WHERE seq = {last}", "DELETE FROM notes")
    assert "journal entries were removed" in verify_error(ledger)


def rechain(path: Path) -> None:
    """Recompute every hash after an edit, as an attacker who read our code would."""
    db = sqlite3.connect(path)
    prev = GENESIS
    for seq, ts, op, payload in db.execute(
            "SELECT seq, ts, op, payload FROM journal ORDER BY seq").fetchall():
        digest = _entry_hash(prev, seq, ts, op, payload)
        db.execute("UPDATE journal SET prev = ?, hash = ? WHERE seq = ?", (prev, digest, seq))
        prev = digest
    db.commit()
    db.close()


def test_a_consistently_rewritten_chain_does_not_match_the_head(tmp_path: Path):
    ledger, path, head = chained(tmp_path)
    edit(path, "UPDATE experiments SET metric = 50 WHERE id = 1",
         "UPDATE journal SET payload = replace(payload, '\"metric\":1.3', '\"metric\":50.0')")
    rechain(path)
    assert "does not match the head" in verify_error(ledger)
    with pytest.raises(IntegrityHalt, match="does not match the head"):
        ledger.insert("t", "queued")  # it is not re-anchored by the next write either
    # The same file with no head to compare with would pass: the head is what catches it.
    Ledger(path).verify()


def test_a_head_one_entry_behind_is_a_crash_not_tampering(tmp_path: Path):
    ledger, path, head = chained(tmp_path)
    before = head.read_bytes()
    ledger.event("t", "stop", "done")
    head.write_bytes(before)  # the process died between the SQLite commit and the head write
    ledger.verify()
    ledger.event("t", "start", "resumed")  # the next write brings the head up to date
    ledger.verify()
    assert head.read_bytes() != before


def test_a_ledger_from_before_the_journal_adopts_the_chain(tmp_path: Path):
    path, head = tmp_path / "ledger.sqlite", tmp_path / "git" / "ledger-head"
    old = Ledger(path)
    a = old.insert("t", "keep", metric=1.3, is_baseline=1)
    old.add_note("a note")
    old.close()
    edit(path, "DROP TABLE journal")  # as it was before this change
    ledger = Ledger(path, head=head)
    ledger.verify()
    assert ledger.get(a).metric == 1.3
    edit(path, f"UPDATE experiments SET metric = 50 WHERE id = {a}")
    assert f"experiment #{a}: metric is 50.0" in verify_error(ledger)


def test_an_emptied_journal_is_not_adopted_again(tmp_path: Path):
    ledger, path, _ = chained(tmp_path)
    ledger.close()
    edit(path, "DELETE FROM journal", "UPDATE experiments SET metric = 50 WHERE id = 1")
    assert "journal entries were removed" in verify_error(Ledger(path, head=tmp_path / "git"
                                                                  / "ledger-head"))


def test_two_writers_share_one_chain(tmp_path: Path):
    """The loop and `overnight steer` write to the same ledger."""
    loop, path, head = chained(tmp_path)
    steer = Ledger(path, head=head)
    for i in range(20):
        loop.insert("t", "queued", description=str(i))
        steer.add_note(f"note {i}")
    loop.verify()
    steer.verify()
