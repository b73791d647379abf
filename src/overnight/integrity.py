"""Integrity: prove that what ran is what was committed, and say in one line when it was not.

Three witnesses, none of them the experiment itself:

1. a manifest, sha256 of every file of the candidate's tree, from its committed bytes;
2. verification of the run directory against it, just before launch and after exit;
3. a live watch (inotify through watchdog) on the run directory while the run goes on, which
   catches a committed file written in place, replaced by an atomic rename, moved or deleted,
   with the moment it happened, even when the file is put back before exit.

Verdicts never depend on the watch keeping up: what it reads when it gets to an event only
explains. A committed path changed twice or more during the run (writes closed, renames or
creates onto it, deletes) is tampered whatever it holds at exit, since what it held in
between cannot be known; one change that leaves the committed bytes is a no-op rewrite. The
first event of each kind on each path is always kept, whatever the flood (`Watch.changes`).

Around one run (costs measured on a 20-file, 2 MB tree):

    tree = repo.tree(commit)                            # committed bytes (Repo.tree)
    manifest = Manifest.of_tree(tree)
    tree.write(workdir)
    with Watch(workdir, manifest) as watch:             # start 12 ms, stop 8 ms
        # After the watch starts, so that no change slips in between the two.
        pre = verify(manifest, workdir, outputs_ok=False)   # 2 ms
        watch.started_at = time.time()
        ...launch, wait...
        exited_at = time.time()
    post = verify(manifest, workdir)                    # 2 ms
    report = TamperReport.build(                        # 1 ms
        workdir, manifest, pre=pre, post=post, watch=watch, exited_at=exited_at,
        committed=lambda paths: {p: tree.read(p) for p in paths if tree.read(p) is not None})
    report.tampered, report.summary(), report.to_json()

Files the run creates are outputs, not tampering; `__pycache__` and `*.pyc` always are.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import functools
import hashlib
import os
import re
import stat
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from watchdog import events as wd_events
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from overnight.errors import ConfigError
from overnight.knobs import list_knobs
from overnight.tree import Tree

FILE, EXECUTABLE, SYMLINK = "100644", "100755", "120000"  # git's modes, so both sides agree
_CHUNK = 1 << 20
_KEEP_BYTES = 1 << 20  # content kept in memory to explain a change, per file, at most
_MAX_EVENTS = 1000  # a run rewriting a committed file in a loop must not grow memory forever
_MAX_OUTPUTS = 100  # outputs listed in a report (the count is always exact)
_CONSTANT_RE = re.compile(r"[A-Z][A-Z0-9_]*\s*[:=]|.*;\s*[A-Z][A-Z0-9_]*\s*=")


def is_output(relpath: str) -> bool:
    """Python's byte-code caches are written by any run that imports: never tampering."""
    return relpath.endswith(".pyc") or "__pycache__" in relpath.split("/")


# --- manifests -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    mode: str  # FILE, EXECUTABLE or SYMLINK
    sha256: str  # of the contents; of the target path for a symlink (git stores it so)
    target: str = ""  # where a symlink points


@dataclass(frozen=True)
class Manifest:
    """{relative posix path: Entry} for every regular file and symlink of a tree."""

    entries: dict[str, Entry]

    @classmethod
    def of_dir(cls, root: Path) -> Manifest:
        entries = {}
        for rel, path, st in _walk(Path(root), lambda _rel: True):
            entry = _entry_of(path, st)
            if entry is not None:
                entries[rel] = entry
        return cls(dict(sorted(entries.items())))

    @classmethod
    def of_tree(cls, tree: Tree) -> Manifest:
        entries = {}
        for f in tree.files:
            target = os.fsdecode(f.data) if f.mode == SYMLINK else ""
            entries[f.path] = Entry(f.mode, f.sha256, target)
        return cls(dict(sorted(entries.items())))

    def to_json(self) -> dict[str, dict[str, str]]:
        return {p: {k: v for k, v in vars(e).items() if v} for p, e in self.entries.items()}

    @classmethod
    def from_json(cls, data: dict[str, dict[str, str]]) -> Manifest:
        return cls({p: Entry(**e) for p, e in data.items()})

    @functools.cached_property
    def dirs(self) -> frozenset[str]:
        """Every directory that holds a committed file, as 'a/', 'a/b/' ('' is the root)."""
        out = {""}
        for path in self.entries:
            parts = path.split("/")[:-1]
            out.update("/".join(parts[: i + 1]) + "/" for i in range(len(parts)))
        return frozenset(out)


# --- verification ----------------------------------------------------------------------------

ChangeKind = Literal["modified", "deleted", "added", "mode"]


@dataclass(frozen=True)
class Change:
    path: str  # relative posix path; an untouched output directory ends in '/'
    kind: ChangeKind
    expected: Entry | None = None  # what was committed; None when added
    found: Entry | None = None  # what is there now; None when deleted, added or unreadable
    tampering: bool = True  # False for an output

    def to_json(self) -> dict[str, object]:
        return {"path": self.path, "kind": self.kind, "tampering": self.tampering,
                "expected": vars(self.expected) if self.expected else None,
                "found": vars(self.found) if self.found else None}

    @classmethod
    def from_json(cls, d: dict) -> Change:
        return cls(d["path"], d["kind"], Entry(**d["expected"]) if d["expected"] else None,
                   Entry(**d["found"]) if d["found"] else None, d["tampering"])


def verify(expected: Manifest, root: Path, outputs_ok: bool = True,
           skip: frozenset[str] = frozenset()) -> list[Change]:
    """Every difference between `root` now and the manifest, sorted by path.

    Committed files are hashed again; other files are listed as "added" without being read
    (outputs may be checkpoints of many GB). With `outputs_ok`, an added file is an output
    (`tampering=False`) and a directory holding no committed file is listed once, not walked;
    without it (before launch, when the tree must be exactly the commit) everything counts.
    `skip`: paths the runner put there ([run] data, read-only), not the run's doing.
    """
    root = Path(root)
    holding = expected.dirs
    changes: list[Change] = []
    seen: set[str] = set()

    def descend(rel_dir: str) -> bool:
        if rel_dir.rstrip("/") in skip:
            return False
        return not is_output(rel_dir) and (not outputs_ok or rel_dir in holding)

    for rel, path, st in _walk(root, descend):
        if is_output(rel) or rel.rstrip("/") in skip:
            continue
        want = expected.entries.get(rel)
        if want is None:
            changes.append(Change(rel, "added", tampering=not outputs_ok))
            continue
        seen.add(rel)
        try:
            found = _entry_of(path, st)
        except OSError:
            found = None  # unreadable: the run cannot prove it read the committed bytes
        if found == want:
            continue
        if found is None and not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            changes.append(Change(rel, "deleted", want))  # a directory or fifo now
        elif found is not None and found.sha256 == want.sha256 and SYMLINK not in (
                found.mode, want.mode):
            changes.append(Change(rel, "mode", want, found))
        else:
            changes.append(Change(rel, "modified", want, found))
    for rel in expected.entries.keys() - seen:
        if not is_output(rel):
            changes.append(Change(rel, "deleted", expected.entries[rel]))
    return sorted(changes, key=lambda c: c.path)


# --- the live watch --------------------------------------------------------------------------

EventKind = Literal["modified", "replaced", "moved", "deleted", "attrib"]


@dataclass(frozen=True)
class WatchEvent:
    path: str  # the committed path touched (or its directory, for a directory moved/deleted)
    kind: EventKind  # modified: written in place; replaced: renamed or created onto it
    at_seconds: float  # since launch; negative before it
    differs: bool  # once the write was complete, the path did not hold the committed file

    def to_json(self) -> dict[str, object]:
        return {"path": self.path, "kind": self.kind, "at_seconds": self.at_seconds,
                "differs": self.differs}

    @classmethod
    def from_json(cls, d: dict) -> WatchEvent:
        return cls(d["path"], d["kind"], d["at_seconds"], d["differs"])


class Watch:
    """Record every write, move or delete of a committed file under `root` while it runs.

    inotify does the watching in the kernel; one observer thread of ours reads the events, so
    the experiment is not slowed. Outputs (files not in the manifest) are ignored. When the
    kernel refuses (watch or instance limits), `unavailable` says why and the caller relies on
    the checks before launch and after exit.
    """

    def __init__(self, root: Path, manifest: Manifest, started_at: float | None = None):
        self.root = os.path.abspath(root)
        self.manifest = manifest
        self.started_at = started_at  # set it at launch; until then: when the watch started
        self.unavailable = ""  # why there was no live watch, or why it stopped early
        self.dropped = 0  # events past _MAX_EVENTS, counted, not kept
        self._dirs = {d.rstrip("/") for d in manifest.dirs if d}
        self._lock = threading.Lock()
        self._raw: list[_Raw] = []
        self._kept: set[tuple[str, str]] = set()  # (path, kind) whose first event is kept
        self._pending: dict[str, list[_Raw]] = {}  # kept events not judged yet
        self._writing: set[str] = set()  # written in place, not closed yet
        # Completed changes per path: a write closed, a rename or create onto it, a delete.
        self._changes: Counter[str] = Counter()
        # path -> (entry, content ≤ _KEEP_BYTES) first seen differing; (None, None): gone
        self._differing: dict[str, tuple[Entry | None, bytes | None]] = {}
        self._observer: BaseObserver | None = None
        self._began = time.time()
        self._sentinel = f".overnight-watch-{uuid.uuid4().hex}"
        self._flushed = threading.Event()

    def __enter__(self) -> Watch:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Watch:
        self._began = time.time()
        observer: BaseObserver | None = None
        try:
            observer = Observer()
            observer.schedule(_Handler(self), self.root, recursive=True,
                              event_filter=_EVENT_TYPES)
            observer.start()  # adds the inotify watches before returning: no blind window
        except OSError as e:
            self.unavailable = _why_unwatchable(e)
            if observer is not None:  # its reader thread may have started: end it
                with contextlib.suppress(OSError, RuntimeError):
                    observer.stop()
            return self
        self._observer = observer
        return self

    @property
    def launched_at(self) -> float:
        return self.started_at if self.started_at is not None else self._began

    def stop(self) -> None:
        observer, self._observer = self._observer, None
        if observer is None:
            return
        sentinel = self._flush()
        observer.stop()
        observer.join(timeout=5)
        if sentinel:  # removed once nobody watches: its event would race the shutdown
            with contextlib.suppress(OSError):
                os.unlink(sentinel)
        for rel in list(self._pending):  # still open for writing, or written through mmap
            self._judge(rel)
        with self._lock:
            for rel in self._writing:
                self._changes[rel] += 1
            self._writing.clear()
            # A path changed twice held, in between, bytes nobody read in time: whatever the
            # watch read late, it counts as differing (see `changes`).
            for raw in self._raw:
                if raw.kind != "attrib" and self._changes[raw.path] >= 2:
                    raw.differs = True

    def changes(self, path: str) -> int:
        """How many times `path` was changed (a write closed, a rename or create onto it, a
        delete) while watched. One change that leaves the committed bytes is a no-op rewrite
        (a formatter with nothing to do, an atomic save of the same text): not tampering. Two
        or more are, whatever the file holds at exit: what it held in between (a swapped-in
        data file the run read, then put back) cannot be known, and the watch may get to
        events late, so what it read then proves nothing."""
        with self._lock:
            return self._changes.get(path, 0)

    @property
    def events(self) -> list[WatchEvent]:
        launch = self.launched_at
        with self._lock:
            return [WatchEvent(r.path, r.kind, r.at - launch, r.differs is not False)
                    for r in self._raw]

    def seen(self, path: str) -> tuple[Entry | None, bytes | None] | None:
        """What the watch first saw at `path` when it differed from the commit: its entry
        (None: gone) and content (None: gone or too large to keep); None if never."""
        with self._lock:
            return self._differing.get(path)

    # -- the observer thread ---------------------------------------------------------------

    def _flush(self) -> str:
        """Make sure every event that happened before now has been handled; returns the path
        of the marker to remove after the observer stops ("" if none could be made).

        inotify events of one watch arrive in order, so once the event of a marker we create
        now has been seen, all earlier ones have been too: waiting on that event, not on a
        clock. The marker is a symlink: creating it makes one event (a file would add a close).
        If it cannot be made, the check after exit still sees what the watch would miss.
        """
        path = os.path.join(self.root, self._sentinel)
        try:
            os.symlink(self._sentinel, path)
        except OSError:
            return ""
        # An unpaired move is held back 0.5 s by watchdog to pair it: allow for that.
        if not self._flushed.wait(timeout=2.0):
            self.unavailable = self.unavailable or "the live watch lagged at stop"
        return path

    def _on(self, event: FileSystemEvent) -> None:
        rel_src = self._rel(event.src_path)
        kind = event.event_type
        if kind == "created" and rel_src == self._sentinel:
            self._flushed.set()
            return
        if kind == "moved":
            rel_dest = self._rel(getattr(event, "dest_path", "") or "")
            if self._touches(rel_dest, event.is_directory):
                self._record(rel_dest, "replaced")
            if self._touches(rel_src, event.is_directory):
                self._record(rel_src, "moved")
            return
        if not self._touches(rel_src, event.is_directory) or rel_src is None:
            return
        if kind == "created":
            self._record(rel_src, "replaced")  # deleted then recreated, or moved in from outside
        elif kind == "deleted":
            self._record(rel_src, "deleted")
        elif kind == "modified" and not event.is_directory:
            # Mid-write (a truncate, half the bytes): judged when the writer closes the file.
            self._record(rel_src, "modified", judge=False)
        elif kind == "closed" and rel_src in self._writing:
            with self._lock:
                self._writing.discard(rel_src)
                self._changes[rel_src] += 1
            self._judge(rel_src)
        elif kind == "attrib" and not event.is_directory:
            # Metadata (touch, chmod): hashed once per path, so that a flood of touches does
            # not make the watch fall behind; a mode left changed is seen after exit.
            self._record(rel_src, "attrib", judge=(rel_src, "attrib") not in self._kept)

    def _rel(self, path: str | bytes) -> str | None:
        path = os.fsdecode(path)
        if not path.startswith(self.root + os.sep):
            return None
        return path[len(self.root) + 1:].replace(os.sep, "/")

    def _touches(self, rel: str | None, is_directory: bool) -> bool:
        if rel is None or is_output(rel):
            return False
        return rel in self._dirs if is_directory else rel in self.manifest.entries

    def _record(self, rel: str, kind: EventKind, judge: bool = True) -> None:
        raw = _Raw(time.time(), rel, kind)
        with self._lock:
            # Bounded, but the first event of each kind on each path is always kept: it is
            # the one that explains what happened.
            kept = len(self._raw) < _MAX_EVENTS or (rel, kind) not in self._kept
            if kept:
                self._raw.append(raw)
                self._kept.add((rel, kind))
            else:
                self.dropped += 1
            if kind in ("replaced", "moved", "deleted"):
                self._changes[rel] += 1
            if kind == "modified":
                self._writing.add(rel)
        if kind == "attrib" and not judge:
            raw.differs = False  # a later touch: not looked at (the first one was)
        elif kept:
            self._pending.setdefault(rel, []).append(raw)
        if judge:
            self._judge(rel)

    def _judge(self, rel: str) -> None:
        """Does the file now differ from the commit? Looked at once per complete write until
        it first does: a no-op rewrite by a formatter is not tampering, a change that is put
        back before exit still is."""
        with self._lock:
            known = rel in self._differing
        differs = True if known else self._differs(rel)
        with self._lock:
            for raw in self._pending.pop(rel, []):
                raw.differs = differs

    def _differs(self, rel: str) -> bool:
        want = self.manifest.entries.get(rel)
        if want is None:  # a directory holding committed files was moved or deleted
            with self._lock:
                self._differing[rel] = (None, None)
            return True
        path = os.path.join(self.root, rel)
        content: bytes | None = None
        try:
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode) and st.st_size <= _KEEP_BYTES:
                # One read for both hash and content: they describe the same moment.
                content = _read_small(path, st)
                found: Entry | None = _entry_of_bytes(content or b"", st)
            else:
                found = _entry_of(path, st)
        except OSError:
            found = None
        if found == want:
            return False
        with self._lock:
            self._differing[rel] = (found, content)
        return True


@dataclass
class _Raw:
    at: float  # time.time() when seen
    path: str
    kind: EventKind
    differs: bool | None = None  # None: not judged yet


class _Handler(FileSystemEventHandler):
    def __init__(self, watch: Watch):
        super().__init__()
        self._watch = watch

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            self._watch._on(event)
        except Exception as e:  # a watch thread that died unseen would look like "no events"
            self._watch.unavailable = f"the live watch failed: {type(e).__name__}: {e}"


# Only what can change a file: no open, read or close-after-read events, so the run's reads
# of its own files cost nothing.
_EVENT_TYPES = [
    cls for cls in (
        wd_events.FileModifiedEvent, getattr(wd_events, "FileAttribEvent", None),
        wd_events.FileCreatedEvent, wd_events.FileMovedEvent, wd_events.FileDeletedEvent,
        wd_events.FileClosedEvent,  # close after writing: the moment a write is complete
        wd_events.DirCreatedEvent, wd_events.DirMovedEvent, wd_events.DirDeletedEvent,
    ) if cls is not None
]


def _why_unwatchable(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "live watch unavailable: inotify watch limit reached (fs.inotify.max_user_watches)"
    if e.errno == errno.EMFILE:
        return ("live watch unavailable: too many open files or inotify instances "
                "(ulimit -n, fs.inotify.max_user_instances)")
    return f"live watch unavailable: {e.strerror or e}"


# --- explanations ----------------------------------------------------------------------------


def explain(path: str, committed: bytes | None, found: bytes | None, when: str,
            how: str = "changed") -> str:
    """One line naming a change, e.g.
    `train.py:442 SCALAR_LR = 0.5 -> 0.3 (file replaced during the run, 0.8 s after launch)`.
    `found` None: the file is gone; `committed` None: it is not in the commit."""
    if found is None:
        return _one_line(f"{path} deleted ({when})")
    if committed is None:
        return _one_line(f"{path} is not in the commit ({how} {when})")
    if found == committed:
        return _one_line(f"{path} {how} {when} (contents now match the commit)")
    return _one_line(f"{_describe(path, committed, found)} (file {how} {when})")


def explain_knob_mismatch(name: str, committed_value: object, runtime_value: object,
                          path: str, line: int) -> str:
    """When the attestation saw another value at run time than the committed file holds."""
    return _one_line(f"{path}:{line} {name} = {_value(committed_value)} in the commit but "
                     f"{_value(runtime_value)} at run time")


def when_phrase(at_seconds: float, run_seconds: float | None = None) -> str:
    """`before launch`, `during the run, 0.8 s after launch` or `after exit`."""
    if at_seconds < 0:
        return "before launch"
    # watchdog holds an unpaired move for 0.5 s: an event that close to exit may be the run's.
    if run_seconds is not None and at_seconds > run_seconds + 0.5:
        return "after exit"
    return f"during the run, {_duration(at_seconds)} after launch"


def _describe(path: str, committed: bytes, found: bytes) -> str:
    try:
        old, new = committed.decode(), found.decode()
    except UnicodeDecodeError:
        return f"{path}: contents differ ({len(committed)} -> {len(found)} bytes)"
    a, b = old.splitlines(), new.splitlines()
    ops = _changed_blocks(a, b)
    if not ops:  # only line endings or the final newline differ
        return f"{path}: line endings or final newline changed"
    # Parsing is costly (libcst): only when a changed line may assign a constant.
    maybe_knob = path.endswith(".py") and any(
        _CONSTANT_RE.match(line) for _, i1, i2, _, _ in ops for line in a[i1:i2])
    knobs = _knob_changes(path, old, b, ops) if maybe_knob else []
    changed = sum(max(i2 - i1, j2 - j1) for _, i1, i2, j1, j2 in ops)
    if knobs:
        shown = ", ".join(f"{':' if i else path + ':'}{line} {name} = {v0} -> {v1}"
                          for i, (line, name, v0, v1) in enumerate(knobs[:3]))
        if len(knobs) > 3:
            shown += f" and {len(knobs) - 3} more constants"
        # Lines changed besides the constants' own (committed numbering).
        knob_lines = {line for line, *_ in knobs}
        others: list[int] = []
        for tag, i1, i2, j1, j2 in ops:
            if tag == "replace" and i2 - i1 == j2 - j1:
                others += [n for n in range(i1 + 1, i2 + 1) if n not in knob_lines]
            else:
                others += list(range(i1 + 1, i1 + 1 + max(i2 - i1, j2 - j1)))
        if not others:
            return shown
        return f"{shown}, and {len(others)} other line(s) changed (first at line {others[0]})"
    first = _first_line_change(a, b, ops[0])
    if changed == 1:
        return f"{path}:{first}"
    return f"{path}: {changed} lines changed (first at line {first})"


def _changed_blocks(a: list[str], b: list[str]) -> list[tuple[str, int, int, int, int]]:
    """difflib's non-equal opcodes, on the part between the common head and tail only: a
    one-line change in a long file costs nothing, and a huge rewrite is not diffed at all
    (difflib is quadratic on repetitive text), it is one block."""
    head = 0
    while head < min(len(a), len(b)) and a[head] == b[head]:
        head += 1
    tail = 0
    while tail < min(len(a), len(b)) - head and a[-1 - tail] == b[-1 - tail]:
        tail += 1
    mid_a, mid_b = a[head:len(a) - tail], b[head:len(b) - tail]
    if not mid_a and not mid_b:
        return []
    if len(mid_a) * len(mid_b) > 1_000_000:
        tag = "replace" if mid_a and mid_b else ("delete" if mid_a else "insert")
        return [(tag, head, len(a) - tail, head, len(b) - tail)]
    matcher = difflib.SequenceMatcher(None, mid_a, mid_b, autojunk=False)
    return [(tag, i1 + head, i2 + head, j1 + head, j2 + head)
            for tag, i1, i2, j1, j2 in matcher.get_opcodes() if tag != "equal"]


def _knob_changes(path: str, old: str, b: list[str],
                  ops: list[tuple[str, int, int, int, int]]) -> list[tuple[int, str, str, str]]:
    """(line, name, old value, new value) of each constant whose line was rewritten in place.

    The committed file is parsed whole (a name assigned twice, or `X = 1` inside a string, is
    no constant); a new line alone, so that a long file costs one parse, not two.
    """
    try:
        before = {k.line: k for k in list_knobs(old, path)}
    except ConfigError:  # not valid Python: fall back to the line diff
        return []
    out = []
    for tag, i1, i2, j1, j2 in ops:
        if tag != "replace" or i2 - i1 != j2 - j1:
            continue
        for line, new_line in zip(range(i1 + 1, i2 + 1), b[j1:j2], strict=True):
            k = before.get(line)
            if k is None:
                continue
            try:
                after = {n.name: n for n in list_knobs(new_line + "\n", path)}
            except ConfigError:
                continue
            n = after.get(k.name)
            if n is not None and (n.value, n.kind) != (k.value, k.kind):
                out.append((line, k.name, _value(k.value), _value(n.value)))
    return out


def _first_line_change(a: list[str], b: list[str], op: tuple[str, int, int, int, int]) -> str:
    tag, i1, _, j1, _ = op
    if tag == "insert":
        return f"{j1 + 1} added {_quote(b[j1])}"
    if tag == "delete":
        return f"{i1 + 1} removed {_quote(a[i1])}"
    old, new = a[i1], b[j1]
    if old.strip() == new.strip():  # whitespace only: show it
        return f"{i1 + 1} {old[:60]!r} -> {new[:60]!r}"
    return f"{i1 + 1} {_quote(old)} -> {_quote(new)}"


def _quote(line: str, width: int = 60) -> str:
    s = line.strip()
    return "'" + (s if len(s) <= width else s[: width - 3] + "...") + "'"


def _value(v: object) -> str:
    if isinstance(v, float):
        return repr(v)
    return str(v) if isinstance(v, int) else repr(v)


def _duration(seconds: float) -> str:
    if seconds < 100:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def _one_line(s: str) -> str:
    return s.replace("\r", "\\r").replace("\n", "\\n")


# --- the report ------------------------------------------------------------------------------


@dataclass
class TamperReport:
    pre_launch: list[Change] = field(default_factory=list)  # tampering only
    events: list[WatchEvent] = field(default_factory=list)  # every event on a committed file
    post_exit: list[Change] = field(default_factory=list)  # tampering only
    outputs: list[str] = field(default_factory=list)  # the first _MAX_OUTPUTS, sorted
    n_outputs: int = 0
    watch_unavailable: str = ""  # why there was no (complete) live watch; "" when there was
    problems: list[str] = field(default_factory=list)  # one line each, the first matters most

    @property
    def tampered(self) -> bool:
        return bool(self.problems)

    def summary(self) -> str:
        if not self.problems:
            return ""
        more = len(self.problems) - 1
        return self.problems[0] + (f" (and {more} more)" if more else "")

    @classmethod
    def build(cls, root: Path, manifest: Manifest, *, pre: list[Change], post: list[Change],
              watch: Watch | None, committed: Callable[[list[str]], dict[str, bytes]],
              exited_at: float | None = None) -> TamperReport:
        """Gather the three witnesses and explain each tampered path once, by its earliest
        evidence: the check before launch, then live events in time order, then what only the
        check after exit saw. `committed(paths)` gives committed bytes (`Tree.read`)."""
        pre_bad = [c for c in pre if c.tampering]
        post_bad = [c for c in post if c.tampering]
        events = watch.events if watch is not None else []
        run_seconds = None
        if watch is not None and exited_at is not None:
            run_seconds = exited_at - watch.launched_at

        # (path, when, how, what the watch saw there, or None to look at the file now)
        plan: list[tuple[str, str, str, tuple[Entry | None, bytes | None] | None]] = []
        done: set[str] = set()
        for c in sorted(pre_bad, key=lambda c: c.kind == "added"):  # a changed file first
            plan.append((c.path, "before launch", "changed", None))
            done.add(c.path)
        for e in events:
            if e.differs and e.path not in done:
                how = {"modified": "rewritten", "attrib": "changed"}.get(e.kind, e.kind)
                seen = watch.seen(e.path) if watch is not None else None
                plan.append((e.path, when_phrase(e.at_seconds, run_seconds), how, seen))
                done.add(e.path)
        for c in post_bad:
            if c.path not in done:
                plan.append((c.path, "by the time the run exited", "changed", None))
                done.add(c.path)

        wanted = sorted({path for path, *_ in plan if path in manifest.entries})
        olds = committed(wanted) if wanted else {}
        problems = [_explain_path(Path(root), manifest, olds, *step) for step in plan]
        outputs = sorted(c.path for c in post if not c.tampering)
        reason = watch.unavailable if watch is not None else "no live watch"
        if watch is not None and watch.dropped and not reason:
            reason = f"{watch.dropped} later event(s) on committed files not kept"
        return cls(pre_bad, events, post_bad, outputs[:_MAX_OUTPUTS], len(outputs), reason,
                   problems)

    def to_json(self) -> dict[str, object]:
        return {
            "tampered": self.tampered, "summary": self.summary(), "problems": self.problems,
            "pre_launch": [c.to_json() for c in self.pre_launch],
            "events": [e.to_json() for e in self.events],
            "post_exit": [c.to_json() for c in self.post_exit],
            "outputs": self.outputs, "n_outputs": self.n_outputs,
            "watch_unavailable": self.watch_unavailable,
        }

    @classmethod
    def from_json(cls, d: dict) -> TamperReport:
        return cls([Change.from_json(c) for c in d["pre_launch"]],
                   [WatchEvent.from_json(e) for e in d["events"]],
                   [Change.from_json(c) for c in d["post_exit"]], d["outputs"], d["n_outputs"],
                   d["watch_unavailable"], d["problems"])


def _explain_path(root: Path, manifest: Manifest, olds: dict[str, bytes], path: str,
                  when: str, how: str, seen: tuple[Entry | None, bytes | None] | None) -> str:
    want = manifest.entries.get(path)
    if want is None:
        if path + "/" in manifest.dirs:  # a directory of committed files moved or deleted
            return _one_line(f"{path}/ {how} ({when})")
        return explain(path, None, b"", when, how="found")
    full = str(root / path)
    st: os.stat_result | None = None
    if seen is not None:  # what the watch saw at the time: the file may have moved on since
        now, content = seen
    else:
        content = None
        try:
            st = os.lstat(full)
            now = _entry_of(full, st)
        except OSError:
            now = None
    if now is None:
        if st is not None and stat.S_ISREG(st.st_mode):
            return _one_line(f"{path} unreadable ({how} {when})")
        return explain(path, b"", None, when)
    if SYMLINK in (want.mode, now.mode):
        before = f"symlink to {want.target!r}" if want.mode == SYMLINK else "a file"
        after = f"symlink to {now.target!r}" if now.mode == SYMLINK else "a file"
        return _one_line(f"{path}: {before} -> {after} ({how} {when})")
    if now == want:  # put back, or changed twice: what it held in between went unread
        return _one_line(f"{path} {how} {when} (contents now match the commit)")
    if now.sha256 == want.sha256:
        return _one_line(f"{path}: mode {want.mode} -> {now.mode} ({how} {when})")
    if content is None and st is not None:
        with contextlib.suppress(OSError):
            content = _read_small(full, st)
    if content is None:  # too large to keep in memory: name it without a line
        return _one_line(f"{path}: contents differ from the commit ({how} {when})")
    return explain(path, olds.get(path, b""), content, when, how)


# --- internals -------------------------------------------------------------------------------


def _walk(root: Path, descend: Callable[[str], bool]) -> Iterator[tuple[str, str, os.stat_result]]:
    """(relpath, path, lstat) of everything under root, symlinks not followed. A directory
    `descend` refuses is yielded once as 'rel/' instead of being walked."""
    stack = [("", str(root))]
    while stack:
        prefix, directory = stack.pop()
        try:
            it = os.scandir(directory)
        except FileNotFoundError:
            continue
        with it:
            for e in it:
                rel = prefix + e.name
                try:
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed while we looked
                if stat.S_ISDIR(st.st_mode):
                    if descend(rel + "/"):
                        stack.append((rel + "/", e.path))
                    else:
                        yield rel + "/", e.path, st
                else:
                    yield rel, e.path, st


def _entry_of(path: str, st: os.stat_result) -> Entry | None:
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(path)
        return Entry(SYMLINK, hashlib.sha256(os.fsencode(target)).hexdigest(), target)
    if not stat.S_ISREG(st.st_mode):
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    # git keeps one bit of mode: executable by its owner or not.
    return Entry(EXECUTABLE if st.st_mode & stat.S_IXUSR else FILE, h.hexdigest())


def _entry_of_bytes(content: bytes, st: os.stat_result) -> Entry:
    return Entry(EXECUTABLE if st.st_mode & stat.S_IXUSR else FILE,
                 hashlib.sha256(content).hexdigest())


def _read_small(path: str, st: os.stat_result) -> bytes | None:
    if stat.S_ISLNK(st.st_mode):
        return os.fsencode(os.readlink(path))
    if not stat.S_ISREG(st.st_mode) or st.st_size > _KEEP_BYTES:
        return None
    with open(path, "rb") as f:
        return f.read(_KEEP_BYTES + 1)
