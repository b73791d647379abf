"""Data that git ignores, `[run] data`: made available read-only in every run, pinned per tag.

A run directory is written from the commit, so a dataset the repository ignores (nanoGPT's
`data/shakespeare_char/train.bin`) is not in it. Each path named in `[run] data` is
resolved here, on the harness's side, into (relative path in the run, absolute source)
pairs: a directory that holds no committed file is one pair; one that does (nanoGPT's
`data/shakespeare_char/` commits its prepare.py) gives one pair per file git does not track,
so the committed files the run sees stay the committed ones. The runner bind-mounts each
source read-only at its place (sandbox "bwrap"), or links it there (sandboxes "user" and
"none", where the files' own permissions are what protects them).

The files are hashed when a tag's baseline has its number (`Pin`) and checked again whenever
their sizes or times change and when a tag resumes: a dataset that changed under a tag
would make its later runs incomparable with the earlier ones, so the loop halts (exit 3).
"""

from __future__ import annotations

import hashlib
import json
import os
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
        """(relative path, absolute path) of every file the pairs hold, sorted."""
        out = []
        for rel, src in self.pairs:
            if os.path.isdir(src):
                for top, dirs, names in os.walk(src):
                    dirs.sort()
                    for name in sorted(names):
                        full = os.path.join(top, name)
                        out.append((os.path.join(rel, os.path.relpath(full, src)), full))
            else:
                out.append((rel, src))
        return sorted(out)

    def stat_key(self) -> tuple:
        """Cheap: sizes and modification times, to tell when hashing again is needed."""
        key = []
        for rel, full in self.files():
            try:
                st = os.stat(full)
            except OSError:
                key.append((rel, None))
                continue
            key.append((rel, st.st_size, st.st_mtime_ns, st.st_ino))
        return tuple(key)

    def digest(self) -> dict[str, str]:
        """{relative path: sha256} of every file, streamed."""
        out = {}
        for rel, full in self.files():
            h = hashlib.sha256()
            try:
                with open(full, "rb") as f:
                    while chunk := f.read(_CHUNK):
                        h.update(chunk)
            except OSError as e:
                out[rel] = f"unreadable: {e.strerror}"
                continue
            out[rel] = h.hexdigest()
        return out


def resolve(repo: Repo, paths: list[str]) -> Data:
    """The pairs `[run] data` names, or ConfigError saying what to change."""
    root = Path(repo.root).resolve()
    private = [root / ".git", root / ".overnight"]
    pairs: list[tuple[str, str]] = []
    for name in paths:
        where = f"overnight.toml: [run] data names {name!r}"
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
        if any(real == p or p in real.parents for p in private) or real == root \
                or real in root.parents:
            raise ConfigError(f"{where}, which leads to {real}: not a dataset")
        tracked = repo.tracked("HEAD", [name])
        if path.is_file():
            if tracked:
                raise ConfigError(f"{where}, which is committed: runs have it already; "
                                  "drop it from [run] data")
            pairs.append((name.rstrip("/"), str(real)))
        elif not tracked:
            pairs.append((name.rstrip("/"), str(real)))
        else:  # a directory with committed files: bind what git does not track, file by file
            for top, dirs, names in os.walk(path):
                dirs.sort()
                for file in sorted(names):
                    rel = os.path.relpath(os.path.join(top, file), root)
                    if rel not in tracked:
                        pairs.append((rel, os.path.realpath(os.path.join(top, file))))
            if not any(p[0].startswith(name.rstrip("/") + "/") for p in pairs):
                raise ConfigError(f"{where}, which holds only committed files: runs have "
                                  "them already; drop it from [run] data")
    return Data(tuple(pairs))


def pin(ledger: Ledger, tag: str, data: Data) -> dict[str, str]:
    """Record the data's hashes with the tag (its baseline is measured on them; a record
    left by a start that died before its baseline was recorded is replaced)."""
    digest = data.digest()
    if pinned(ledger, tag) != digest:
        ledger.event(tag, EVENT, json.dumps(digest, sort_keys=True))
    return digest


def pinned(ledger: Ledger, tag: str) -> dict[str, str] | None:
    found = [e for e in ledger.events(tag) if e["kind"] == EVENT]
    return json.loads(found[-1]["message"]) if found else None


def check(ledger: Ledger, tag: str, data: Data, accept: bool,
          note: Callable[[str], None]) -> None:
    """The data is what the tag's baseline ran on, or the loop halts (exit 3), unless the
    change is accepted (--accept-spec-change), which is recorded."""
    was = pinned(ledger, tag)
    if was is None:
        return
    now = data.digest()
    changed = changes(was, now)
    if not changed:
        return
    if not accept:
        raise IntegrityHalt(
            f"the data of tag '{tag}' changed since its baseline ran ({'; '.join(changed)}), "
            "so new results would not compare with the old ones. Put the data back, start a "
            "new --tag, or pass --accept-spec-change to go on (the change is recorded)")
    ledger.event(tag, EVENT, json.dumps(now, sort_keys=True))
    ledger.event(tag, "spec_change", f"data accepted: {'; '.join(changed)}")
    note(f"data changed (accepted): {'; '.join(changed)}")


def changes(was: dict[str, str], now: dict[str, str]) -> list[str]:
    out = [f"{p} changed" for p in sorted(set(was) & set(now)) if was[p] != now[p]]
    out += [f"{p} is gone" for p in sorted(set(was) - set(now))]
    out += [f"{p} is new" for p in sorted(set(now) - set(was))]
    return out
