"""Git plumbing: candidates never touch the user's working tree, index or HEAD."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from overnight.errors import ConfigError
from overnight.snapshot import Repo

ENV = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
       "GIT_COMMITTER_EMAIL": "t@t"}


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, env=ENV, check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    root = tmp_path / "r"
    (root / "sub").mkdir(parents=True)
    (root / "train.py").write_text("LR = 0.1\n")
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o755)
    (root / "sub" / "data.txt").write_text("data\n")
    git(root, "init", "-q", "-b", "main")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "init")
    return Repo.open(root)


def test_candidate_commit_leaves_the_user_alone(repo: Repo, tmp_path: Path):
    root = repo.root
    (root / "train.py").write_text("LR = 0.5  # the user is editing\n")  # uncommitted
    git(root, "add", "train.py")  # and staged
    head, index = git(root, "rev-parse", "HEAD"), git(root, "ls-files", "-s")
    sha = repo.commit_candidate(head, {"train.py": "LR = 0.2\n"}, "LR 0.1 -> 0.2")
    assert git(root, "rev-parse", "HEAD") == head
    assert git(root, "ls-files", "-s") == index
    assert (root / "train.py").read_text() == "LR = 0.5  # the user is editing\n"
    assert repo.read_file(sha, "train.py") == "LR = 0.2\n"
    assert git(root, "rev-parse", f"{sha}^") == head
    assert repo.diff(head, sha).count("\n+LR = 0.2") == 1
    dest = tmp_path / "run"
    repo.materialize(sha, dest)
    assert (dest / "train.py").read_text() == "LR = 0.2\n"
    assert (dest / "sub" / "data.txt").read_text() == "data\n"
    assert os.access(dest / "run.sh", os.X_OK)  # modes survive


def test_read_files_and_refs(repo: Repo):
    head = repo.head()
    assert repo.read_files(head, ["train.py", "sub/data.txt"]) == {
        "train.py": "LR = 0.1\n", "sub/data.txt": "data\n"}
    repo.set_ref("refs/overnight/t/1", head)
    assert repo.refs("refs/overnight/t/") == {"refs/overnight/t/1": head}
    repo.delete_ref("refs/overnight/t/1")
    assert repo.ref("refs/overnight/t/1") is None


def test_dirty_and_exclude(repo: Repo):
    assert repo.dirty(["train.py"]) == []
    (repo.root / "train.py").write_text("LR = 9\n")
    (repo.root / "new.py").write_text("x = 1\n")
    assert repo.dirty(["train.py", "new.py"]) == ["new.py", "train.py"]
    repo.exclude("/.overnight/")
    repo.exclude("/.overnight/")
    exclude = (repo.root / ".git" / "info" / "exclude").read_text().splitlines()
    assert exclude.count("/.overnight/") == 1


def test_not_a_repository(tmp_path: Path):
    with pytest.raises(ConfigError, match="not inside a git repository"):
        Repo.open(tmp_path)


def test_candidate_edits_nested_files_and_keeps_modes(repo: Repo, tmp_path: Path):
    head = repo.head()
    sha = repo.commit_candidate(head, {"sub/data.txt": "new\n", "run.sh": "#!/bin/sh\necho 2\n",
                                       "deep/new/file.py": "X = 1\n"}, "nested")
    assert repo.read_files(sha, ["sub/data.txt", "train.py", "deep/new/file.py"]) == {
        "sub/data.txt": "new\n", "train.py": "LR = 0.1\n", "deep/new/file.py": "X = 1\n"}
    modes = {line.split()[3]: line.split()[0]
             for line in git(repo.root, "ls-tree", "-r", sha).splitlines()}
    assert modes["run.sh"] == "100755" and modes["sub/data.txt"] == "100644"
    changed = git(repo.root, "diff", "--name-only", head, sha).splitlines()
    assert sorted(changed) == ["deep/new/file.py", "run.sh", "sub/data.txt"]


def test_objects_written_directly_are_the_ones_git_would_write(repo: Repo, tmp_path: Path):
    head = repo.head()
    edits = {"train.py": "LR = 0.3\n", "sub/data.txt": "x\n", "a-b/c.py": "C = 1\n",
             "sub.txt": "order matters: 'sub.txt' sorts before the tree 'sub'\n"}
    sha = repo.commit_candidate(head, edits, "objects")
    # The same tree through git's own index machinery must have the same id.
    index = tmp_path / "index"
    env = {**ENV, "GIT_INDEX_FILE": str(index)}
    subprocess.run(["git", "read-tree", head], cwd=repo.root, env=env, check=True)
    for path, text in edits.items():
        blob = subprocess.run(["git", "hash-object", "-w", "--stdin"], cwd=repo.root, env=env,
                              input=text, capture_output=True, text=True, check=True).stdout
        subprocess.run(["git", "update-index", "--add", "--cacheinfo",
                        f"100644,{blob.strip()},{path}"], cwd=repo.root, env=env, check=True)
    tree = subprocess.run(["git", "write-tree"], cwd=repo.root, env=env, capture_output=True,
                          text=True, check=True).stdout.strip()
    assert git(repo.root, "rev-parse", f"{sha}^{{tree}}") == tree
    assert git(repo.root, "cat-file", "-t", sha) == "commit"
    fsck = subprocess.run(["git", "fsck", "--strict", "--no-dangling"], cwd=repo.root, env=ENV,
                          capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_pinned_refs_are_real_git_refs(repo: Repo):
    head = repo.head()
    repo.pin("refs/overnight/t/7", head)
    assert git(repo.root, "rev-parse", "refs/overnight/t/7") == head
    assert repo.refs("refs/overnight/t/") == {"refs/overnight/t/7": head}
    git(repo.root, "pack-refs", "--all")
    sha = repo.commit_candidate(head, {"train.py": "LR = 0.9\n"}, "x")
    repo.pin("refs/overnight/t/7", sha)  # a loose ref overrides the packed one
    assert git(repo.root, "rev-parse", "refs/overnight/t/7") == sha
    assert git(repo.root, "for-each-ref", "--format=%(objectname)", "refs/overnight/t/7") == sha


def test_the_blob_cache_stays_within_its_bound():
    from overnight.snapshot import BlobCache

    cache = BlobCache(max_bytes=100)
    for i in range(10):
        cache.put(f"b{i}", b"x" * 30)
        cache.get("b0")  # used all the time, like the unchanged files of every candidate
    assert cache.size <= 100
    assert cache.get("b0") is not None and cache.get("b1") is None and cache.get("b9")
