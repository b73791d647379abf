"""Integrity around one run: what ran must be what was committed.

Three witnesses, none of them the experiment's own word about its result:
- the run directory against the commit's manifest, just before launch and after exit;
- a live watch (inotify) of the committed files while the run goes;
- the attestation the injected start-up hook wrote: the sha256 of the source bytes Python
  actually compiled, for the main script and every module imported from the run directory.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from overnight import _attest
from overnight.integrity import (
    Manifest,
    TamperReport,
    Watch,
    explain_knob_mismatch,
    verify,
)
from overnight.knobs import list_knobs
from overnight.metrics import read_regular
from overnight.tree import Tree


@dataclass
class Verdict:
    report: dict = field(default_factory=dict)  # the tamper report, as JSON
    summary: str = ""  # one line when tampered, else ""
    runtime_knobs: dict = field(default_factory=dict)  # what the script's constants were
    notes: list[str] = field(default_factory=list)  # worth knowing, not tampering


class RunGuard:
    """`with RunGuard(...) as g:` around the launch; then `g.verdict(attestation)`."""

    def __init__(self, tree: Tree, workdir: Path, data: tuple[str, ...] = ()):
        # Committed bytes only, no repository: the runner may be on a machine without one.
        self.tree, self.workdir = tree, workdir
        self.data = frozenset(data)  # [run] data in the tree: put there by the runner
        self.manifest = Manifest.of_tree(tree)
        self.watch = Watch(workdir, self.manifest)
        self.pre: list = []
        self.post: list = []
        self.exited_at: float | None = None

    def __enter__(self) -> RunGuard:
        # Watch first, then check: nothing can change unseen between the two.
        self.watch.start()
        self.pre = verify(self.manifest, self.workdir, outputs_ok=False, skip=self.data)
        return self

    @property
    def tampered_before_launch(self) -> bool:
        return any(c.tampering for c in self.pre)

    def launching(self) -> None:
        """Call just before the process starts: event times count from here."""
        self.watch.started_at = time.time()

    def __exit__(self, *exc: object) -> None:
        self.exited_at = time.time()
        self.watch.stop()
        self.post = verify(self.manifest, self.workdir, skip=self.data)

    def verdict(self, attestation: Path | None) -> Verdict:
        report = TamperReport.build(
            self.workdir, self.manifest, pre=self.pre, post=self.post, watch=self.watch,
            committed=self._committed,
            exited_at=self.exited_at,
        )
        verdict = Verdict()
        if attestation is not None and not self.tampered_before_launch:
            self._attested(attestation, report, verdict)
        verdict.report = report.to_json()
        verdict.report["notes"] = verdict.notes
        verdict.summary = report.summary()
        return verdict

    def _attested(self, path: Path, report: TamperReport, verdict: Verdict) -> None:
        """Compare what Python compiled with the committed bytes."""
        records = [d for d in map(load_json, [path, *_attest.secondary_outputs(path)]) if d]
        if not records:
            verdict.notes.append("no attestation was written (not a Python script, or the "
                                 "process was killed before it started)")
            return
        main = records[0]
        raw = main.get("knobs") or {}  # name -> {"type": ..., "value": ...}
        verdict.runtime_knobs = {k: v.get("value") if isinstance(v, dict) else v
                                 for k, v in raw.items()}
        for record in records:
            sources = [(rel, d) for rel, d in (record.get("modules") or {}).items()]
            # A module imported again with other bytes: every version that ran must match.
            sources += [(rel, d) for rel, ds in (record.get("reloads") or {}).items() for d in ds]
            if record.get("main", {}).get("path"):
                sources.append((record["main"]["path"], record["main"].get("sha256")))
            if record.get("main", {}).get("unchanged_at_exit") is False:
                report.problems.append(f"{record['main']['path']} changed while it ran")
            if not record.get("main", {}).get("exact", True):
                verdict.notes.append("this interpreter ran the script itself: its hash is of "
                                     "the bytes at start-up, checked again at exit")
            for rel, digest in sources:
                # Through a committed symlink (`helper.py -> lib/helper_impl.py`, or a linked
                # directory on the way) Python compiles the file it points to: compare with
                # that file of the tree, not with the link.
                committed = self.tree.resolve(rel)
                if committed is None and rel in self.manifest.entries:
                    report.problems.append(f"{rel} ran through a symlink that leads out of the "
                                           "commit's files")
                elif committed is None:
                    report.problems.append(f"{rel} ran but is not part of the commit "
                                           "(created in the run directory)")
                elif committed.sha256 != digest:
                    if not any(p.startswith(rel) for p in report.problems):
                        report.problems.append(
                            f"{rel}: the bytes Python executed are not the committed ones")
        self._knob_notes(main, verdict)

    def _committed(self, paths: list[str]) -> dict[str, bytes]:
        """Committed bytes of `paths` (a path not in the tree is left out)."""
        return {p: data for p in paths if (data := self.tree.read(p)) is not None}

    def _knob_notes(self, main: dict, verdict: Verdict) -> None:
        """A constant the script changed at run time is not tampering, but worth seeing."""
        rel = (main.get("main") or {}).get("path")
        if rel is None or rel not in self.manifest.entries:
            return
        source = self.tree.resolve(rel)
        if source is None:
            return
        text = source.data.decode("utf-8", errors="replace")
        try:
            committed = {k.name: k for k in list_knobs(text, rel)}
        except Exception:  # noqa: BLE001 - a script we cannot parse has no knobs to compare
            return
        for name, knob in committed.items():
            ran = verdict.runtime_knobs.get(name)
            if isinstance(ran, (int, float)) and not isinstance(ran, bool) and ran != knob.value:
                verdict.notes.append(explain_knob_mismatch(name, knob.value, ran, rel, knob.line))


def attest_env(out: Path, root: Path, pythonpath: str | None,
               knobs: tuple[str, ...] = ()) -> dict[str, str]:
    """Environment that injects the attestation hook into the experiment's Python."""
    env = _attest.environ(out, root, base={}, knobs=knobs)
    if pythonpath:
        env["PYTHONPATH"] = env["PYTHONPATH"] + os.pathsep + pythonpath
    return env


ATTESTATION_MAX_BYTES = 16 << 20


def load_json(path: Path) -> dict:
    """An attestation the run wrote: only a regular file, within a size cap, never blocking
    (the experiment could leave a FIFO or a huge sparse file there)."""
    try:
        data = json.loads(read_regular(path, ATTESTATION_MAX_BYTES))
    except (OSError, ValueError):  # UnsafeFile is a ValueError
        return {}
    return data if isinstance(data, dict) else {}
