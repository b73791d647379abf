"""Data that git ignores, `[run] data`: made available read-only in every run, pinned per tag.

A run directory is written from the commit, so a dataset the repository ignores (nanoGPT's
`data/shakespeare_char/train.bin`) is not in it. Each path named in `[run] data` is
resolved here, on the harness's side, into (relative path in the run, absolute source)
pairs: a directory that holds no committed file is one pair; one that does (nanoGPT's
`data/shakespeare_char/` commits its prepare.py) gives one pair per file git does not track,
so the committed files the run sees stay the committed ones. Only regular files and
directories inside the repository qualify: a link out of it would put a home directory in
the box, and a link or FIFO inside a dataset would lead nowhere there (or block a reader).

How a run gets them depends on the sandbox (the runner places them):
- "bwrap": each source is bind-mounted read-only at its place; writing, deleting or renaming
  fails whatever the files' permissions.
- "user": a link at its place, owned by root in a sticky directory (the run cannot remove or
  replace it), to the source, which Landlock lets the slot's uid read and not write; the
  files' permissions must let other users read them (checked at start).
- "none": a link to the source, and nothing stops a run from writing through it: the change
  is caught after the run (below), not prevented.

The files are hashed when the loop starts and checked again after every run whose end finds
their sizes, times or inodes moved: a dataset that changed under a tag would make its later
runs incomparable with the earlier ones, so the loop halts (exit 3) naming the file. The
hashes are recorded with the tag when its baseline has its number; a change found at the
next start halts too, unless `--accept-spec-change` records it.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from overnight.errors import ConfigError, IntegrityHalt
from overnight.ledger import Ledger
from overnight.snapshot import Repo

_CHUNK = 1 << 20
EVENT = "data"


@dataclass(frozen=True)
class Data:
    pairs: tuple[tuple[str, str], ...] = ()  # (path in the run, absolute source)

    def files(self) -> list[tuple[str, str]]:
        """(relative path, absolute path) of every entry the pairs hold but directories (a
        link to one included, not followed), sorted."""
        out = []
        for rel, src in self.pairs:
            if not os.path.isdir(src) or os.path.islink(src):
                out.append((rel, src))
                continue
            for top, dirs, names in os.walk(src):
                dirs.sort()
                links = [d for d in dirs if os.path.islink(os.path.join(top, d))]
                for name in sorted([*names, *links]):
                    full = os.path.join(top, name)
                    out.append((os.path.join(rel, os.path.relpath(full, src)), full))
        return sorted(out)

    def stat_key(self) -> tuple:
        """Cheap: sizes, times and inodes, to tell when hashing again is needed. The change
        time is in it: no unprivileged process can set that back after a write."""
        key = []
        for rel, full in self.files():
            try:
                st = os.lstat(full)
            except OSError:
                key.append((rel, None))
                continue
            key.append((rel, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
        return tuple(key)

    def digest(self) -> dict[str, str]:
        """{relative path: sha256} of every file, streamed; what anything else is."""
        return {rel: _hash(full) for rel, full in self.files()}


def _hash(path: str) -> str:
    """The sha256 of a regular file; never follows a link or blocks on a FIFO that took a
    file's place."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        if os.path.islink(path):
            return f"a link to {os.readlink(path)}"
        return f"unreadable: {e.strerror}"
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return "not a regular file"
        h = hashlib.sha256()
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# -- at start: what `[run] data` names ---------------------------------------------------------

def resolve(repo: Repo, paths: list[str]) -> Data:
    """The pairs `[run] data` names, or ConfigError saying what to change."""
    root = Path(repo.root).resolve()
    pairs: list[tuple[str, str]] = []
    for name in paths:
        pairs += _pairs(repo, root, name.rstrip("/"),
                        f"overnight.toml: [run] data names {name!r}")
    return Data(tuple(pairs))


def _pairs(repo: Repo, root: Path, name: str, where: str) -> list[tuple[str, str]]:
    parts = Path(name).parts
    if Path(name).is_absolute() or ".." in parts or not parts:
        raise ConfigError(f"{where}: give a path inside the repository, relative to its "
                          "root (e.g. \"data/shakespeare_char\")")
    if parts[0] in (".git", ".overnight"):
        raise ConfigError(f"{where}: that is overnight's or git's own state, never data")
    path = root / name
    if not path.exists():
        raise ConfigError(f"{where}, which does not exist: create it (nanoGPT: run its "
                          "data/<name>/prepare.py) or fix the path")
    real = path.resolve()
    if root not in real.parents:
        raise ConfigError(
            f"{where}, which leads out of the repository (to {real}): a run sees only what "
            "is inside it. Move or copy the data into the repository, or bind-mount it "
            f"there (mount --bind {real} {path})")
    if any(real == p or p in real.parents for p in (root / ".git", root / ".overnight")):
        raise ConfigError(f"{where}, which leads to {real}: overnight's or git's own state, "
                          "never data")
    _regular(real, name, where)
    tracked = repo.tracked("HEAD", [name])
    if path.is_file():
        if tracked:
            raise ConfigError(f"{where}, which is committed: runs have it already; "
                              "drop it from [run] data")
        return [(name, str(real))]
    if not tracked:
        return [(name, str(real))]
    # A directory with committed files: bind what git does not track, file by file.
    pairs = []
    for top, dirs, files in os.walk(path):
        dirs.sort()
        for file in sorted(files):
            rel = os.path.relpath(os.path.join(top, file), root)
            if rel not in tracked:
                pairs.append((rel, os.path.realpath(os.path.join(top, file))))
    if not pairs:
        raise ConfigError(f"{where}, which holds only committed files: runs have them "
                          "already; drop it from [run] data")
    return pairs


def _regular(real: Path, name: str, where: str) -> None:
    """Regular files and directories only, all the way down."""
    entries = [(name, real)]
    if real.is_dir():
        for top, dirs, files in os.walk(real):
            for entry in [*dirs, *files]:
                full = Path(top, entry)
                entries.append((os.path.join(name, os.path.relpath(full, real)), full))
    for rel, full in entries:
        mode = os.lstat(full).st_mode
        if stat.S_ISLNK(mode):
            raise ConfigError(f"{where}: {rel} is a symbolic link, which a run's box would "
                              "not follow to the same place: replace it by what it points to, "
                              "or name its target in [run] data instead")
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise ConfigError(f"{where}: {rel} is not a regular file (a FIFO, socket or "
                              "device): a dataset is files and directories; remove it")


def unreadable_to_others(data: Data) -> str | None:
    """Sandbox "user": the first path of the data that a slot's uid (another user) could not
    read, or enter on the way to it; None when it can read everything."""
    for _, src in data.pairs:
        for above in Path(src).parents:
            if not os.stat(above).st_mode & stat.S_IXOTH:
                return str(above)
        inside = [src]
        for top, dirs, files in os.walk(src):
            inside += [os.path.join(top, name) for name in [*dirs, *files]]
        for path in inside:
            mode = os.stat(path).st_mode
            need = stat.S_IROTH | (stat.S_IXOTH if stat.S_ISDIR(mode) else 0)
            if mode & need != need:
                return path
    return None


# -- per tag: hashed at start, watched between runs, pinned with the baseline -----------------

class Watch:
    """The data of one tag as its runs see it. `start()` hashes it (and compares with the
    tag's pin), `after_run()` looks again whenever sizes or times moved, `pin()` records the
    hashes with the tag once its baseline has its number."""

    def __init__(self, ledger: Ledger, tag: str, data: Data):
        self.ledger, self.tag, self.data = ledger, tag, data
        self.known: dict[str, str] = {}
        self.key: tuple = ()

    @property
    def pairs(self) -> tuple[tuple[str, str], ...]:
        return self.data.pairs

    def start(self, accept: bool, note: Callable[[str], None], measured: bool = True) -> None:
        """The data is what the tag's baseline ran on, or the loop halts (exit 3), unless
        the change is accepted (--accept-spec-change), which is recorded. Without a measured
        baseline (`measured` False) nothing is compared: a pin left by a start that died
        before its baseline had its number is replaced by `pin()`."""
        if not self.data.pairs:
            return
        self.key, self.known = self.data.stat_key(), self.data.digest()
        was = pinned(self.ledger, self.tag) if measured else None
        changed = changes(was, self.known) if was is not None else []
        if not changed:
            return
        if not accept:
            raise IntegrityHalt(
                f"the data of tag '{self.tag}' changed since its baseline ran "
                f"({'; '.join(changed)}), so new results would not compare with the old ones. "
                "Put the data back, start a new --tag, or pass --accept-spec-change to go on "
                "(the change is recorded)")
        self.ledger.event(self.tag, EVENT, json.dumps(self.known, sort_keys=True))
        self.ledger.event(self.tag, "spec_change", f"data accepted: {'; '.join(changed)}")
        note(f"data changed (accepted): {'; '.join(changed)}")

    def after_run(self) -> None:
        """Before a result is judged: the data its run read is the data the loop started
        with, or the loop halts (exit 3); a change mid-loop is never accepted, since the runs
        in flight may have read either."""
        if not self.data.pairs:
            return
        key = self.data.stat_key()
        if key == self.key:
            return
        now = self.data.digest()
        self.key = key
        changed = changes(self.known, now)
        if changed:
            raise IntegrityHalt(
                f"the data of tag '{self.tag}' changed while the loop ran "
                f"({'; '.join(changed)}): the run that just ended may have read either "
                "version, so it is not judged. A run may write through to the data only with "
                'sandbox = "none"; otherwise someone changed it. Put the data back and run '
                "again, or start a new --tag")

    def pin(self) -> None:
        """Record the hashes with the tag (its baseline measured on them; a record left by a
        start that died before its baseline was recorded is replaced)."""
        if not self.data.pairs:
            return
        if pinned(self.ledger, self.tag) != self.known:
            self.ledger.event(self.tag, EVENT, json.dumps(self.known, sort_keys=True))


def pinned(ledger: Ledger, tag: str) -> dict[str, str] | None:
    found = [e for e in ledger.events(tag) if e["kind"] == EVENT]
    return json.loads(found[-1]["message"]) if found else None


def changes(was: dict[str, str], now: dict[str, str]) -> list[str]:
    out = [f"{p} changed" for p in sorted(set(was) & set(now)) if was[p] != now[p]]
    out += [f"{p} is gone" for p in sorted(set(was) - set(now))]
    out += [f"{p} is new" for p in sorted(set(now) - set(was))]
    return out
