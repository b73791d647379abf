"""Git plumbing: candidate commits, refs, the kept branch and run directories.

Never touches the user's working tree, index or HEAD: candidates are built in a
temporary index file and written with `commit-tree`; run directories are
checked out from the commit's objects through a temporary index too.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
import threading
import time
import zlib
from pathlib import Path

from overnight.errors import ConfigError, OvernightError
from overnight.tree import EXECUTABLE, FILE, SYMLINK, Tree, TreeFile

# Commits are made by the harness, so they carry its identity whatever the user's config says.
_IDENTITY = {
    "GIT_AUTHOR_NAME": "overnight",
    "GIT_AUTHOR_EMAIL": "overnight@localhost",
    "GIT_COMMITTER_NAME": "overnight",
    "GIT_COMMITTER_EMAIL": "overnight@localhost",
}


class GitError(OvernightError):
    pass


def branch_ref(tag: str) -> str:
    return f"refs/heads/overnight/{tag}"


def candidate_ref(tag: str, experiment_id: int) -> str:
    return f"refs/overnight/{tag}/{experiment_id}"


class Repo:
    def __init__(self, root: Path):
        self.root = root
        self._env = {**os.environ, **_IDENTITY, "GIT_TERMINAL_PROMPT": "0"}
        self._env.pop("GIT_INDEX_FILE", None)
        self._trees: dict[str, dict[str, tuple[str, str, str]]] = {}
        self._commit_trees: dict[str, str] = {}
        self._objects: Path | None | bool = False  # False: not looked up yet
        self._refs_dir: Path | None | bool = False
        # sha256 of blob contents by blob id: a manifest of a new candidate then only hashes
        # what changed (objects are immutable, so the cache is never stale).
        self.blob_sha256: dict[str, str] = {}
        self.link_targets: dict[str, str] = {}  # blob id -> where a symlink with it points
        self._blobs: dict[str, bytes] = {}  # blob id -> contents, for trees of candidates

    @classmethod
    def open(cls, path: Path) -> Repo:
        try:
            out = subprocess.run(
                ["git", "rev-parse", "--show-toplevel"],
                cwd=path, capture_output=True, text=True, check=False,
            )
        except FileNotFoundError:
            raise ConfigError("git is not installed: install git and try again") from None
        if out.returncode != 0:
            raise ConfigError(
                f"{path} is not inside a git repository: run `git init` and commit your "
                "training script first (overnight keeps results as git commits)"
            )
        return cls(Path(out.stdout.strip()))

    # -- running git ---------------------------------------------------------

    def git(self, *args: str, input: bytes | None = None, env: dict[str, str] | None = None,
            check: bool = True) -> str:
        proc = subprocess.run(
            ["git", *args], cwd=self.root, input=input, capture_output=True,
            env={**self._env, **(env or {})}, check=False,
        )
        if check and proc.returncode != 0:
            err = proc.stderr.decode(errors="replace").strip()
            raise GitError(f"git {' '.join(args[:3])} failed: {err}")
        return proc.stdout.decode(errors="replace").rstrip("\n")

    # -- reading ---------------------------------------------------------------

    def head(self) -> str:
        sha = self.git("rev-parse", "--verify", "-q", "HEAD^{commit}", check=False)
        if not sha:
            raise ConfigError("the repository has no commits yet: commit your files first")
        return sha

    def dirty(self, paths: list[str]) -> list[str]:
        """Paths among `paths` with uncommitted changes, or not committed at all."""
        out = self.git("status", "--porcelain", "--untracked-files=all", "--", *paths)
        return sorted({line[3:].strip() for line in out.splitlines() if line.strip()})

    def tracked(self, commit: str, paths: list[str]) -> set[str]:
        out = self.git("ls-tree", "-r", "--name-only", commit, "--", *paths)
        return set(out.splitlines())

    def read_file(self, commit: str, path: str) -> str:
        return self.read_files(commit, [path])[path]

    def read_files(self, commit: str, paths: list[str]) -> dict[str, str]:
        """Text of several files at a commit in one git call."""
        if not paths:
            return {}
        req = "".join(f"{commit}:{p}\n" for p in paths).encode()
        proc = subprocess.run(
            ["git", "cat-file", "--batch"], cwd=self.root, input=req,
            capture_output=True, env=self._env, check=True,
        )
        out, data, pos = {}, proc.stdout, 0
        for path in paths:
            nl = data.index(b"\n", pos)
            header = data[pos:nl].decode()
            if header.endswith("missing"):
                raise GitError(f"{path} does not exist at {commit[:10]}")
            size = int(header.split()[2])
            out[path] = data[nl + 1: nl + 1 + size].decode("utf-8", errors="replace")
            pos = nl + 1 + size + 1
        return out

    def tree_of(self, commit: str) -> str:
        if commit not in self._commit_trees:  # commits are immutable: ask git once
            self._commit_trees[commit] = self.git("rev-parse", f"{commit}^{{tree}}")
        return self._commit_trees[commit]

    def ref(self, name: str) -> str | None:
        return self.git("rev-parse", "--verify", "-q", name, check=False) or None

    def refs(self, prefix: str) -> dict[str, str]:
        out = self.git("for-each-ref", "--format=%(refname) %(objectname)", prefix)
        return dict(line.split(" ", 1) for line in out.splitlines() if line)

    def diff(self, a: str, b: str) -> str:
        return self.git("diff", a, b)

    # -- writing (objects and refs only) ----------------------------------------

    def commit_candidate(self, parent: str, edits: dict[str, str], message: str) -> str:
        """A commit on top of `parent` whose files hold `edits`. Returns its sha.

        Four git processes however large the repository: the new blobs, the changed trees
        (from cached listings of the parent's trees), the commit.
        """
        blobs = {path: self._write("blob", text.encode()) for path, text in edits.items()}
        tree = self._tree_with(self.tree_of(parent), blobs)
        return self.commit_tree(tree, parent, message)

    def _write(self, kind: str, data: bytes) -> str:
        """Store one object. Written directly as a loose object (what `git hash-object -w`
        does, without a process per object); through git for repositories that are not
        plain SHA-1 ones."""
        objects = self._loose_objects()
        if objects is None:
            return self.git("hash-object", "-t", kind, "-w", "--stdin", input=data)
        raw = f"{kind} {len(data)}\0".encode() + data
        sha = hashlib.sha1(raw).hexdigest()
        if kind == "blob":
            self.blob_sha256[sha] = hashlib.sha256(data).hexdigest()
        path = objects / sha[:2] / sha[2:]
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            tmp = path.parent / f"tmp_obj_{os.getpid()}_{threading.get_ident()}"
            tmp.write_bytes(zlib.compress(raw, 1))
            tmp.chmod(0o444)
            os.replace(tmp, path)
        return sha

    def _loose_objects(self) -> Path | None:
        if self._objects is False:
            fmt = self.git("rev-parse", "--show-object-format", check=False)
            path = Path(self.git("rev-parse", "--git-path", "objects"))
            path = path if path.is_absolute() else self.root / path
            self._objects = path if fmt == "sha1" and path.is_dir() else None
        return self._objects

    def _entries(self, tree: str) -> dict[str, tuple[str, str, str]]:
        """name -> (mode, type, sha) of one tree, cached: trees are immutable."""
        if tree not in self._trees:
            out = self.git("ls-tree", "-z", tree)
            entries = {}
            for item in out.split("\0"):
                if item:
                    meta, name = item.split("\t", 1)
                    mode, kind, sha = meta.split()
                    entries[name] = (mode, kind, sha)
            self._trees[tree] = entries
        return self._trees[tree]

    def _tree_with(self, tree: str | None, blobs: dict[str, str]) -> str:
        """`tree` with some paths (possibly nested) pointing at new blobs; the new tree's sha."""
        entries = dict(self._entries(tree)) if tree else {}
        nested: dict[str, dict[str, str]] = {}
        for path, blob in blobs.items():
            head, _, rest = path.partition("/")
            if rest:
                nested.setdefault(head, {})[rest] = blob
            else:
                mode = entries[head][0] if head in entries else "100644"  # keep +x
                entries[head] = (mode, "blob", blob)
        for name, sub in nested.items():
            old = entries.get(name)
            subtree = self._tree_with(old[2] if old and old[1] == "tree" else None, sub)
            entries[name] = ("040000", "tree", subtree)
        # Git's tree order: names as bytes, a directory sorting as if it ended with "/".
        def order(name: str) -> bytes:
            return name.encode() + (b"/" if entries[name][1] == "tree" else b"")

        data = b"".join(
            f"{entries[n][0].lstrip('0')} {n}\0".encode() + bytes.fromhex(entries[n][2])
            for n in sorted(entries, key=order)
        )
        sha = self._write("tree", data)
        self._trees[sha] = entries  # what we just wrote: no need to ask git to list it
        return sha

    def listing(self, commit: str) -> list[tuple[str, str, str]]:
        """(path, mode, blob id) of every file of a commit, from cached tree listings."""
        out: list[tuple[str, str, str]] = []

        def walk(tree: str, prefix: str) -> None:
            for name, (mode, kind, sha) in self._entries(tree).items():
                if kind == "tree":
                    walk(sha, f"{prefix}{name}/")
                elif kind == "blob":
                    out.append((prefix + name, mode, sha))

        walk(self.tree_of(commit), "")
        return out

    def tree(self, commit: str) -> Tree:
        """The commit's files as committed bytes (one `cat-file --batch` for blobs not seen
        before: candidates share almost all of theirs, and objects never change)."""
        listing = self.listing(commit)
        wanted = sorted({oid for _, _, oid in listing if oid not in self._blobs})
        if wanted:
            self._blobs.update(self._read_objects(wanted))
        files = []
        for path, mode, oid in listing:
            data = self._blobs[oid]
            mode = mode if mode in (EXECUTABLE, SYMLINK) else FILE
            files.append(TreeFile(path, mode, data, self._sha256(oid, data)))
        return Tree(commit, tuple(files))

    def _sha256(self, oid: str, data: bytes) -> str:
        digest = self.blob_sha256.get(oid)
        if digest is None:
            digest = self.blob_sha256[oid] = hashlib.sha256(data).hexdigest()
        return digest

    def _read_objects(self, oids: list[str]) -> dict[str, bytes]:
        proc = subprocess.run(["git", "cat-file", "--batch"], cwd=self.root,
                              input="".join(o + "\n" for o in oids).encode(),
                              capture_output=True, env=self._env, check=False)
        if proc.returncode != 0:
            raise GitError(f"git cat-file failed: {proc.stderr.decode(errors='replace')}")
        out, data, pos = {}, proc.stdout, 0
        for oid in oids:
            nl = data.index(b"\n", pos)
            header = data[pos:nl].decode()
            if header.endswith("missing"):
                raise GitError(f"object {oid[:10]} is missing from the repository")
            size = int(header.split()[2])
            out[oid] = data[nl + 1: nl + 1 + size]
            pos = nl + 1 + size + 1
        return out

    def commit_tree(self, tree: str, parent: str, message: str) -> str:
        sha = self._commit_tree(tree, parent, message)
        self._commit_trees[sha] = tree
        return sha

    def _commit_tree(self, tree: str, parent: str, message: str) -> str:
        if self._loose_objects() is None:
            return self.git("commit-tree", tree, "-p", parent, input=message.encode())
        stamp = f"{int(time.time())} +0000"
        who = f"{_IDENTITY['GIT_COMMITTER_NAME']} <{_IDENTITY['GIT_COMMITTER_EMAIL']}> {stamp}"
        body = message if message.endswith("\n") else message + "\n"
        text = f"tree {tree}\nparent {parent}\nauthor {who}\ncommitter {who}\n\n{body}"
        return self._write("commit", text.encode())

    def set_ref(self, name: str, sha: str) -> None:
        self.git("update-ref", name, sha)

    def pin(self, name: str, sha: str) -> None:
        """Point a new `refs/overnight/...` ref at `sha`: a loose ref file written directly in
        the files backend (one per candidate, so no process), through git otherwise."""
        if self._refs_dir is False:
            storage = self.git("config", "--get", "extensions.refstorage", check=False)
            path = Path(self.git("rev-parse", "--git-common-dir"))
            path = path if path.is_absolute() else self.root / path
            self._refs_dir = path if storage in ("", "files") else None
        if self._refs_dir is None or not name.startswith("refs/overnight/"):
            self.set_ref(name, sha)
            return
        path = self._refs_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(sha + "\n")
        os.replace(tmp, path)

    def delete_ref(self, name: str) -> None:
        self.git("update-ref", "-d", name, check=False)

    def exclude(self, pattern: str) -> None:
        """Add a pattern to .git/info/exclude once (never to the user's .gitignore)."""
        path = Path(self.git("rev-parse", "--git-path", "info/exclude"))
        if not path.is_absolute():
            path = self.root / path
        path.parent.mkdir(parents=True, exist_ok=True)
        existing = path.read_text().splitlines() if path.exists() else []
        if pattern not in existing:
            with open(path, "a") as f:
                if existing and existing[-1] != "":
                    f.write("\n")
                f.write(pattern + "\n")

    def materialize(self, commit: str, dest: Path) -> None:
        """Check the commit's tree out into `dest` (created), in one git process, through a
        temporary index so the user's index is never touched.

        Not `git archive`: it drops `export-ignore` files and rewrites `export-subst` ones, so
        the run would not see what was committed.
        """
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="overnight-index-") as tmp:
            env = {"GIT_INDEX_FILE": os.path.join(tmp, "index"),
                   "GIT_WORK_TREE": str(dest.resolve())}
            self.git("read-tree", "--reset", "-u", commit, env=env)
