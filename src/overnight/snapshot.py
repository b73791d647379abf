"""Git plumbing: candidate commits, refs, the kept branch and run directories.

Never touches the user's working tree, index or HEAD: candidates are written as objects
(`commit-tree`, or loose objects directly) and run directories are written from the
committed bytes (`Repo.tree`), not checked out.

Every git process goes through `git_command`, which leaves git no way to run a program: an
experiment can write `.git/hooks`, `.git/config` and `.gitattributes`, and the harness runs
git with its own environment (API keys included) after every candidate.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import zlib
from collections import OrderedDict
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

# Config given on the command line wins over every file, the repository's included: each of
# these is a way git would otherwise run a program, or read bytes other than the committed ones.
_SEALED = (
    ("core.hooksPath", os.devnull),  # no hooks (reference-transaction on update-ref, ...)
    ("core.fsmonitor", "false"),  # a hook `status` would run
    ("core.untrackedCache", "false"),
    ("core.pager", "cat"),
    ("core.attributesFile", os.devnull),  # the user's attributes (the repository's remain:
    ("core.excludesFile", os.devnull),  # the drivers they name are switched off below)
    ("core.useReplaceRefs", "false"),  # refs/replace/ would swap committed objects
    ("diff.external", ""),
    ("commit.gpgSign", "false"),  # gpg.program
    ("tag.gpgSign", "false"),
    ("log.showSignature", "false"),
    ("gc.auto", "0"),  # no background gc or maintenance after a write
    ("maintenance.auto", "false"),
    ("protocol.allow", "never"),  # no transport at all, not even a partial clone's lazy fetch
    ("submodule.recurse", "false"),
)

# Drivers the repository's config may define, each a command git runs on file contents: a
# filter (on checkout, add, status), a diff driver (textconv, external diff), a merge driver.
_DRIVERS = re.compile(r"^(filter|diff|merge)\.(.+)\.(clean|smudge|process|required|textconv"
                      r"|command|driver)$")
_DRIVER_OFF = {
    "filter": (("clean", ""), ("smudge", ""), ("process", ""), ("required", "false")),
    "diff": (("textconv", ""), ("command", "")),
    "merge": (("driver", ""),),
}
# Plumbing that never looks at attributes, so needs no driver switched off (one git process
# fewer per call: these run for every candidate). Anything else reads the config first.
_NO_DRIVERS = frozenset({"cat-file", "check-ignore", "commit-tree", "config", "for-each-ref",
                         "hash-object", "ls-tree", "rev-parse", "update-ref", "version"})

# What git may see of the harness's environment: no API keys, no inherited GIT_* variables
# (GIT_DIR, GIT_INDEX_FILE, GIT_EXEC_PATH, GIT_CONFIG_* ...). GIT_CEILING_DIRECTORIES only
# narrows where git looks for a repository.
_PASSED = frozenset({"PATH", "LANG", "LANGUAGE", "TZ", "TMPDIR", "GIT_CEILING_DIRECTORIES"})


def git_environment() -> dict[str, str]:
    """The whole environment of a git process the harness runs, built from an allowlist."""
    env = {k: v for k, v in os.environ.items() if k in _PASSED or k.startswith("LC_")}
    env.update(_IDENTITY)
    env.update({
        "HOME": os.devnull,  # ~/.gitconfig, ~/.config/git/*: not the user's files
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_SYSTEM": os.devnull,
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_NO_REPLACE_OBJECTS": "1",
        "GIT_OPTIONAL_LOCKS": "0",  # `status` leaves the user's index alone
    })
    return env


def git_command(root: Path, *args: str,
                work_tree: Path | None = None) -> tuple[list[str], dict[str, str]]:
    """(argv, env) for `git *args` run in `root`, with every way git has to run a program
    turned off: hooks, fsmonitor, pagers, external diffs, textconv, the filter, diff and merge
    drivers the repository's config defines, and the user's global and system config.

    Run it with `cwd=root`. `work_tree` points git at another directory's files (the
    repository's objects and config stay those of `root`).
    """
    env = git_environment()
    pairs = list(_SEALED)
    if not args or args[0] not in _NO_DRIVERS:
        pairs += _drivers_off(root, env)
    argv = ["git", "--no-pager"]
    for key, value in pairs:
        argv += ["-c", f"{key}={value}"]
    if work_tree is not None:
        argv.append(f"--work-tree={work_tree}")
    return [*argv, *args], env


def _drivers_off(root: Path, env: dict[str, str]) -> list[tuple[str, str]]:
    """Config that switches off every driver the repository defines, read afresh each time (an
    experiment may add one at any moment). `git config` reads files and runs nothing."""
    argv = ["git", "--no-pager", *(a for k, v in _SEALED for a in ("-c", f"{k}={v}")),
            "config", "-z", "--name-only", "--get-regexp", _DRIVERS.pattern]
    proc = subprocess.run(argv, cwd=root, env=env, capture_output=True, check=False)
    if proc.returncode not in (0, 1):  # 1: none defined
        raise GitError(f"git config failed: {proc.stderr.decode(errors='replace').strip()}")
    out: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for key in os.fsdecode(proc.stdout).split("\0"):
        m = _DRIVERS.match(key)
        if m is None or (m[1], m[2]) in seen:
            continue
        kind, name = m[1], m[2]
        if "=" in name:  # `-c` splits at the first '=': the driver could not be named
            raise GitError(
                f"the repository's git config defines a {kind} driver named {name!r}, which "
                f"overnight cannot switch off ('=' in its name): remove [{kind} \"{name}\"] "
                "from .git/config")
        seen.add((kind, name))
        out += [(f"{kind}.{name}.{var}", value) for var, value in _DRIVER_OFF[kind]]
    return out


class GitError(OvernightError):
    pass


def branch_ref(tag: str) -> str:
    return f"refs/heads/overnight/{tag}"


def candidate_ref(tag: str, experiment_id: int) -> str:
    return f"refs/overnight/{tag}/{experiment_id}"


class BlobCache:
    """Blob contents by id, the least recently used dropped past `max_bytes`: a night of
    candidates shares almost every blob, but each proposal adds a few new ones."""

    def __init__(self, max_bytes: int = 256 << 20):
        self.max_bytes = max_bytes
        self.size = 0
        self._data: OrderedDict[str, bytes] = OrderedDict()

    def get(self, oid: str) -> bytes | None:
        data = self._data.get(oid)
        if data is not None:
            self._data.move_to_end(oid)
        return data

    def put(self, oid: str, data: bytes) -> None:
        if oid in self._data:
            self._data.move_to_end(oid)
            return
        self._data[oid] = data
        self.size += len(data)
        while self.size > self.max_bytes and len(self._data) > 1:
            _, old = self._data.popitem(last=False)
            self.size -= len(old)


class Repo:
    def __init__(self, root: Path):
        self.root = root
        self._trees: dict[str, dict[str, tuple[str, str, str]]] = {}
        self._commit_trees: dict[str, str] = {}
        self._objects: Path | None | bool = False  # False: not looked up yet
        self._refs_dir: Path | None | bool = False
        # sha256 of blob contents by blob id: a manifest of a new candidate then only hashes
        # what changed (objects are immutable, so the cache is never stale).
        self.blob_sha256: dict[str, str] = {}
        self._blobs = BlobCache()  # blob id -> contents, for trees of candidates

    @classmethod
    def open(cls, path: Path) -> Repo:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"--repo {path} does not exist: pass the directory of your "
                              "repository")
        if not path.is_dir():
            raise ConfigError(f"--repo {path} is a file: pass the directory of your repository"
                              f" (e.g. --repo {path.parent})")
        argv, env = git_command(path, "rev-parse", "--show-toplevel")
        if shutil.which(argv[0], path=env.get("PATH")) is None:
            raise ConfigError("git is not installed: install git and try again")
        out = subprocess.run(argv, cwd=path, env=env, capture_output=True, text=True,
                             check=False)
        if out.returncode != 0:
            if "dubious ownership" in out.stderr:
                raise ConfigError(
                    f"{path} belongs to another user, so git will not work in it (overnight "
                    "ignores your global git config, safe.directory included): run overnight "
                    "as the repository's owner")
            raise ConfigError(
                f"{path} is not inside a git repository: run `git init` and commit your "
                "training script first (overnight keeps results as git commits)"
            )
        return cls(Path(out.stdout.strip()))

    # -- running git ---------------------------------------------------------

    def git(self, *args: str, input: bytes | None = None, check: bool = True,
            work_tree: Path | None = None, index: Path | None = None) -> str:
        return self.git_bytes(*args, input=input, check=check, work_tree=work_tree,
                              index=index).decode(errors="replace").rstrip("\n")

    def git_bytes(self, *args: str, input: bytes | None = None, check: bool = True,
                  work_tree: Path | None = None, index: Path | None = None) -> bytes:
        """`index`: a temporary index file to use instead of the user's (GIT_INDEX_FILE)."""
        argv, env = git_command(self.root, *args, work_tree=work_tree)
        if index is not None:
            env["GIT_INDEX_FILE"] = str(index)
        proc = subprocess.run(argv, cwd=self.root, input=input, capture_output=True, env=env,
                              check=False)
        if check and proc.returncode != 0:
            err = proc.stderr.decode(errors="replace").strip()
            raise GitError(f"git {' '.join(args[:3])} failed: {err}")
        return proc.stdout

    # -- reading ---------------------------------------------------------------

    def head(self) -> str:
        sha = self.git("rev-parse", "--verify", "-q", "HEAD^{commit}", check=False)
        if not sha:
            raise ConfigError("the repository has no commits yet: commit your files first")
        return sha

    def dirty(self, paths: list[str]) -> list[str]:
        """Paths among `paths` with uncommitted changes, or not committed at all."""
        out = self.git("status", "--porcelain", "--untracked-files=all",
                       "--ignore-submodules=all", "--", *paths)
        return sorted({line[3:].strip() for line in out.splitlines() if line.strip()})

    def tracked(self, commit: str, paths: list[str]) -> set[str]:
        out = self.git("ls-tree", "-r", "--name-only", commit, "--", *paths)
        return set(out.splitlines())

    def read_file(self, commit: str, path: str) -> str:
        return self.read_files(commit, [path])[path]

    def read_files(self, commit: str, paths: list[str]) -> dict[str, str]:
        """Text of several files at a commit in one git call."""
        out = {}
        for path, data in zip(paths, self._cat([f"{commit}:{p}" for p in paths]), strict=True):
            if data is None:
                raise GitError(f"{path} does not exist at {commit[:10]}")
            out[path] = data.decode("utf-8", errors="replace")
        return out

    def _cat(self, names: list[str]) -> list[bytes | None]:
        """The contents of objects (`<commit>:<path>` or ids) in one `cat-file --batch`;
        None for one git does not have."""
        if not names:
            return []
        data = self.git_bytes("cat-file", "--batch",
                              input="".join(n + "\n" for n in names).encode())
        out: list[bytes | None] = []
        pos = 0
        for _ in names:
            nl = data.index(b"\n", pos)
            header = data[pos:nl].decode()
            if header.endswith(("missing", "ambiguous")):
                out.append(None)
                pos = nl + 1
                continue
            size = int(header.split()[2])
            out.append(data[nl + 1: nl + 1 + size])
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
        """What changed from `a` to `b`, as git prints it, with no external diff or textconv
        (a repository's diff driver is a program)."""
        return self.git("diff", "--no-ext-diff", "--no-textconv", a, b)

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
            self._blobs.put(sha, data)  # a candidate's tree is then read without git
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
        have = {oid: data for _, _, oid in listing
                if (data := self._blobs.get(oid)) is not None}
        wanted = sorted({oid for _, _, oid in listing} - set(have))
        if wanted:
            for oid, data in self._read_objects(wanted).items():
                have[oid] = data
                self._blobs.put(oid, data)
        files = []
        for path, mode, oid in listing:
            data = have[oid]
            mode = mode if mode in (EXECUTABLE, SYMLINK) else FILE
            files.append(TreeFile(path, mode, data, self._sha256(oid, data)))
        return Tree(commit, tuple(files))

    def _sha256(self, oid: str, data: bytes) -> str:
        digest = self.blob_sha256.get(oid)
        if digest is None:
            digest = self.blob_sha256[oid] = hashlib.sha256(data).hexdigest()
        return digest

    def _read_objects(self, oids: list[str]) -> dict[str, bytes]:
        out = {}
        for oid, data in zip(oids, self._cat(oids), strict=True):
            if data is None:
                raise GitError(f"object {oid[:10]} is missing from the repository")
            out[oid] = data
        return out

    def commit_tree(self, tree: str, parent: str, message: str,
                    when: float | None = None) -> str:
        """A commit of `tree` on `parent`, by overnight. `when`: its date (default now); the
        same tree, parent, message and date make the same commit."""
        sha = self._commit_tree(tree, parent, message, when)
        self._commit_trees[sha] = tree
        return sha

    def _commit_tree(self, tree: str, parent: str, message: str, when: float | None) -> str:
        if self._loose_objects() is None and when is None:
            return self.git("commit-tree", tree, "-p", parent, input=message.encode())
        stamp = f"{int(time.time() if when is None else when)} +0000"
        who = f"{_IDENTITY['GIT_COMMITTER_NAME']} <{_IDENTITY['GIT_COMMITTER_EMAIL']}> {stamp}"
        body = message if message.endswith("\n") else message + "\n"
        text = f"tree {tree}\nparent {parent}\nauthor {who}\ncommitter {who}\n\n{body}"
        return self._write("commit", text.encode())

    def patch(self, a: str, b: str) -> bytes:
        """The change from tree (or commit) `a` to `b` as a patch `git apply` takes back,
        whatever the repository's diff settings (prefixes, context, colour, renames)."""
        return self.git_bytes("diff", "--binary", "--full-index", "--no-ext-diff",
                              "--no-textconv", "--no-color", "--no-renames", "--no-relative",
                              "--src-prefix=a/", "--dst-prefix=b/", "-U3", a, b)

    def apply_to(self, tree: str, patch: bytes) -> str | None:
        """The tree `tree` with `patch` applied, or None when it does not apply cleanly. Done
        in a temporary index (read-tree, apply --cached, write-tree): the user's index and
        working tree are never read or written."""
        with tempfile.TemporaryDirectory(prefix="overnight-index-") as tmp:
            index = Path(tmp) / "index"
            self.git("read-tree", tree, index=index)
            try:
                self.git_bytes("apply", "--cached", "--whitespace=nowarn", input=patch,
                               index=index)
            except GitError:  # a context line or a file it changes is not there
                return None
            return self.git("write-tree", index=index)

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
        """Write the commit's files into `dest` (created, must be empty) from the committed
        bytes: no checkout, so no line-ending conversion, filter, LFS smudge or hook changes
        what runs, and the user's index is never touched. Symlinks stay symlinks.

        Not `git archive` either: it drops `export-ignore` files and rewrites `export-subst`
        ones, so the run would not see what was committed.
        """
        self.tree(commit).write(dest)
