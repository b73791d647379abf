"""A candidate's files as committed bytes: what a run directory is written from.

A `Tree` needs no git: the harness reads it from the repository once (`Repo.tree`), and
the runner writes it out, here or on a worker node that has no repository. Files are
written from the committed bytes, so line-ending conversion, filter drivers and LFS
smudging cannot change what runs; symlinks are written as symlinks.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

FILE, EXECUTABLE, SYMLINK = "100644", "100755", "120000"  # git's modes


class TreeError(ValueError):
    """A path in a tree that cannot be written safely (absolute, `..`, or `.git`)."""


@dataclass(frozen=True)
class TreeFile:
    path: str  # relative posix path
    mode: str  # FILE, EXECUTABLE or SYMLINK
    data: bytes  # the contents; the link target for a symlink
    sha256: str  # of `data`

    @classmethod
    def of(cls, path: str, mode: str, data: bytes) -> TreeFile:
        return cls(path, mode, data, hashlib.sha256(data).hexdigest())


@dataclass(frozen=True)
class Tree:
    """Every regular file and symlink of one commit (submodules are left out, as checkout
    leaves them empty)."""

    commit: str
    files: tuple[TreeFile, ...]

    @functools.cached_property
    def by_path(self) -> dict[str, TreeFile]:
        return {f.path: f for f in self.files}

    def read(self, path: str) -> bytes | None:
        f = self.by_path.get(path)
        return f.data if f is not None else None

    def resolve(self, path: str, depth: int = 40) -> TreeFile | None:
        """The regular file `path` reaches, following committed symlinks, of the file itself
        or of a directory on the way (`pkg -> lib/pkg`, then `pkg/mod.py`); None when it is
        not in the tree or a link leads out of it."""
        parts = path.split("/")
        for i in range(1, len(parts) + 1):
            head = "/".join(parts[:i])
            link = self.by_path.get(head)
            if link is None or link.mode != SYMLINK:
                continue
            if depth <= 0:
                return None
            target = os.path.normpath(os.path.join(os.path.dirname(head),
                                                   os.fsdecode(link.data)))
            if os.path.isabs(target) or target == ".." or target.startswith("../"):
                return None
            return self.resolve("/".join([target, *parts[i:]]), depth - 1)
        return self.by_path.get(path)

    def write(self, dest: Path) -> None:
        """Create `dest` holding exactly these files (it must not exist or be empty)."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        root = os.path.abspath(dest)
        made: set[str] = {root}
        for f in self.files:
            full = os.path.join(root, _safe(f.path))
            parent = os.path.dirname(full)
            if parent not in made:
                os.makedirs(parent, exist_ok=True)
                made.add(parent)
            if f.mode == SYMLINK:
                os.symlink(os.fsdecode(f.data), full)
                continue
            perm = 0o755 if f.mode == EXECUTABLE else 0o644
            fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, perm)
            with os.fdopen(fd, "wb") as out:
                out.write(f.data)


def _safe(path: str) -> str:
    parts = path.split("/")
    if path.startswith("/") or any(p in ("", ".", "..") for p in parts) or parts[0] == ".git":
        raise TreeError(f"refusing to write {path!r}: not a plain relative path")
    return os.path.join(*parts)
