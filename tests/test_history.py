"""The proposers' history: bounded per context, complete for duplicates, fed row by row."""

from __future__ import annotations

from pathlib import Path

from overnight.history import RECENT, History
from overnight.ledger import Ledger


def test_history_is_bounded_but_remembers_every_fingerprint(tmp_path: Path):
    ledger = Ledger(tmp_path / "l.sqlite")
    history = History()

    def add(status: str, **kw) -> int:
        rid = ledger.insert("t", status, commit_sha=f"{kw.pop('n', 0):040x}", **kw)
        history.update(ledger.get(rid))
        return rid

    base = add("keep", is_baseline=1, metric=1.0, fingerprint="f-base")
    add("repeat", repeat_of=base, metric=1.01)
    first = add("discard", metric=1.2, fingerprint="f-first")
    kept = add("keep", metric=0.9, estimate=0.91, runs=2, fingerprint="f-kept", n=7)
    crash = add("crash", fingerprint="f-crash")
    for i in range(3 * RECENT):
        add("discard", metric=1.1, fingerprint=f"f{i}")
    running = add("running", fingerprint="f-running")

    shown = history.experiments()
    ids = [e.id for e in shown]
    assert len(shown) <= RECENT + 4
    assert ids == sorted(ids)
    assert {base, kept, crash, running} <= set(ids)  # baseline, keeps, failures, in flight
    assert first not in ids  # old and unremarkable: out of the window
    assert all(e.status != "repeat" for e in shown)  # a repeat is its candidate's estimate
    assert next(e for e in shown if e.id == kept).metric == 0.91
    assert {"f-first", "f0", "f-running"} <= history.tried  # duplicates: every one, forever
    assert history.by_fingerprint["f-first"] == first
    assert [e.id for e in history.in_flight()] == [running]
    assert f"{7:040x}" in history.kept_commits
    ledger.close()
