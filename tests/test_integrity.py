"""Integrity: manifests from git and from disk agree, verification finds what changed, the live
watch catches writes and atomic renames by other processes, and one line says what happened."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from overnight.integrity import (
    EXECUTABLE,
    FILE,
    SYMLINK,
    Change,
    Manifest,
    TamperReport,
    Watch,
    explain,
    explain_knob_mismatch,
    verify,
    when_phrase,
)
from overnight.snapshot import Repo

ENV = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
       "GIT_COMMITTER_EMAIL": "t@t", "GIT_CONFIG_NOSYSTEM": "1"}

# The story: line 442 of a long train.py holds the constant a linter rewrote.
STORY = "".join(f"# line {i}\n" for i in range(1, 442)) + textwrap.dedent("""\
    SCALAR_LR = 0.5
    import time
    print("SCALAR_LR", SCALAR_LR, flush=True)
    """)
LINTED = STORY.replace("SCALAR_LR = 0.5", "SCALAR_LR = 0.3")


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, env=ENV, check=True, capture_output=True,
                          text=True).stdout.strip()


def commit_tree(root: Path, files: dict[str, str | bytes]) -> tuple[Repo, str]:
    """A git repository at root holding `files` (plus an executable and a symlink), committed."""
    root.mkdir(parents=True)
    for rel, content in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        data = content.encode() if isinstance(content, str) else content
        (root / rel).write_bytes(data)
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o755)
    (root / "data").symlink_to("sub/d.txt")
    git(root, "init", "-q", "-b", "main")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "init")
    return Repo(root), git(root, "rev-parse", "HEAD")


@pytest.fixture
def run_dir(tmp_path: Path) -> tuple[Repo, str, Manifest, Path]:
    """A committed tree materialized into a run directory, and its manifest."""
    repo, commit = commit_tree(tmp_path / "repo", {
        "train.py": STORY, "sub/d.txt": "data\n", "lib/util.py": "def f():\n    return 1\n"})
    work = tmp_path / "runs" / "1" / "work"
    repo.materialize(commit, work)
    return repo, commit, Manifest.of_tree(repo.tree(commit)), work


def background(script: str) -> subprocess.Popen:
    """Another process on the machine (a linter, an editor) doing `script`."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)])


def build(work: Path, repo: Repo, commit: str, manifest: Manifest, watch: Watch | None,
          pre: list[Change] | None = None, exited_at: float | None = None) -> TamperReport:
    return TamperReport.build(work, manifest, pre=pre or [], post=verify(manifest, work),
                              watch=watch, exited_at=exited_at,
                              committed=lambda paths: committed_bytes(repo, commit, paths))


# --- manifests -------------------------------------------------------------------------------


def test_manifest_of_a_materialized_dir_equals_the_manifest_of_its_commit(tmp_path: Path):
    binary = bytes(range(256)) * 40
    repo, commit = commit_tree(tmp_path / "repo", {
        "train.py": STORY, "sub/d.txt": "data\n", "dir with space/ünï.txt": "x\n",
        "empty.txt": "", "weights.bin": binary})
    work = tmp_path / "work"
    repo.materialize(commit, work)

    from_git, from_disk = Manifest.of_tree(repo.tree(commit)), Manifest.of_dir(work)

    assert from_git == from_disk
    entries = from_git.entries
    assert set(entries) == {"train.py", "sub/d.txt", "dir with space/ünï.txt", "empty.txt",
                            "weights.bin", "run.sh", "data"}
    assert entries["weights.bin"].sha256 == hashlib.sha256(binary).hexdigest()
    assert entries["run.sh"].mode == EXECUTABLE and entries["train.py"].mode == FILE
    assert entries["data"].mode == SYMLINK and entries["data"].target == "sub/d.txt"
    assert Manifest.from_json(json.loads(json.dumps(from_git.to_json()))) == from_git

    # Another commit differs exactly where its tree does.
    (repo.root / "train.py").write_text(LINTED)
    git(repo.root, "commit", "-qam", "lint")
    other = Manifest.of_tree(repo.tree(repo.head()))
    assert {p for p in entries if entries[p] != other.entries[p]} == {"train.py"}


def committed_bytes(repo: Repo, commit: str, paths: list[str]) -> dict[str, bytes]:
    tree = repo.tree(commit)
    return {p: data for p in paths if (data := tree.read(p)) is not None}


def test_a_tree_streams_every_blob_through_one_git_process(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch):
    files = {f"pkg{i % 4}/mod{i}.py": f"X{i} = {i}\n" + "# padding\n" * 2500 for i in range(40)}
    repo, commit = commit_tree(tmp_path / "repo", files)
    assert sum(len(t) for t in files.values()) > 1_000_000
    # Count real git processes with a shim on PATH that logs and hands over to git.
    log, shim = tmp_path / "git.log", tmp_path / "bin" / "git"
    shim.parent.mkdir()
    real = subprocess.run(["sh", "-c", "command -v git"], capture_output=True, text=True,
                          check=True).stdout.strip()
    # It logs the subcommand: the first argument that is neither an option nor a `-c` value.
    shim.write_text(f'#!/bin/sh\nskip=\nfor a in "$@"; do\n'
                    f'  if [ -n "$skip" ]; then skip=; continue; fi\n'
                    f'  case "$a" in -c) skip=1 ;; -*) ;; *) echo "$a" >> "{log}"; break ;; esac\n'
                    f'done\nexec "{real}" "$@"\n')
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim.parent}{os.pathsep}{os.environ['PATH']}")
    repo = Repo(repo.root)  # it takes its environment, PATH included, when it is made

    t0 = time.perf_counter()
    manifest = Manifest.of_tree(repo.tree(commit))
    elapsed = time.perf_counter() - t0

    # One listing per directory and one stream for every blob: not one process per file.
    calls = log.read_text().split()
    assert calls.count("cat-file") == 1 and calls.count("ls-tree") == 5, calls
    assert set(calls) == {"rev-parse", "ls-tree", "cat-file"}
    assert len(manifest.entries) == 42
    assert manifest.entries["pkg3/mod7.py"].sha256 == hashlib.sha256(
        files["pkg3/mod7.py"].encode()).hexdigest()
    assert elapsed < 2.0, f"Repo.tree took {elapsed:.2f}s for ~1 MB"

    # A candidate that edits one file is then hashed without any git process at all.
    edited = "X7 = 70\n"
    candidate = repo.commit_candidate(commit, {"pkg3/mod7.py": edited}, "edit")
    log.write_text("")
    after = Manifest.of_tree(repo.tree(candidate))
    assert log.read_text().split() == []
    assert after.entries["pkg3/mod7.py"].sha256 == hashlib.sha256(edited.encode()).hexdigest()
    assert after.entries["pkg1/mod5.py"] == manifest.entries["pkg1/mod5.py"]
    assert Manifest.of_tree(Repo(repo.root).tree(candidate)) == after  # a cold cache agrees


def test_a_tree_gives_committed_bytes(run_dir):
    repo, commit, _, _ = run_dir
    got = committed_bytes(repo, commit, ["train.py", "sub/d.txt", "no/such/file"])
    assert got == {"train.py": STORY.encode(), "sub/d.txt": b"data\n"}


# --- verification ----------------------------------------------------------------------------


def test_verify_finds_modified_deleted_and_mode_changes_and_leaves_outputs_alone(run_dir):
    _, _, manifest, work = run_dir
    assert verify(manifest, work, outputs_ok=False) == []  # freshly materialized: exact

    (work / "train.py").write_text(LINTED)
    (work / "sub" / "d.txt").unlink()
    (work / "run.sh").chmod(0o644)
    (work / "data").unlink()
    (work / "data").symlink_to("/etc/passwd")
    # What a run leaves behind: outputs, byte-code caches, a directory of checkpoints.
    (work / "out.txt").write_text("loss 1.0\n")
    for cache in (work / "__pycache__", work / "lib" / "__pycache__"):
        cache.mkdir()
        (cache / "util.cpython-311.pyc").write_bytes(b"\0" * 16)
    (work / "ckpt" / "a").mkdir(parents=True)
    (work / "ckpt" / "a" / "model.pt").write_bytes(b"w" * 100)

    changes = {c.path: c for c in verify(manifest, work)}

    assert {p: (c.kind, c.tampering) for p, c in changes.items()} == {
        "train.py": ("modified", True), "sub/d.txt": ("deleted", True),
        "run.sh": ("mode", True), "data": ("modified", True),
        "out.txt": ("added", False), "ckpt/": ("added", False),  # a whole output dir, once
    }
    assert changes["run.sh"].expected.mode == EXECUTABLE and changes["run.sh"].found.mode == FILE
    assert changes["data"].found.target == "/etc/passwd"

    # Before launch the tree must be exactly the commit: an extra file is tampering there
    # (a planted sitecustomize.py would run first), but caches never are.
    strict = {c.path: c for c in verify(manifest, work, outputs_ok=False)}
    assert strict["ckpt/a/model.pt"].tampering and strict["out.txt"].tampering
    assert not any("__pycache__" in p for p in strict)


def test_a_committed_file_turned_into_a_directory_is_deleted(run_dir):
    _, _, manifest, work = run_dir
    (work / "sub" / "d.txt").unlink()
    (work / "sub" / "d.txt").mkdir()
    kinds = {c.path: c.kind for c in verify(manifest, work)}
    assert kinds == {"sub/d.txt": "deleted", "sub/d.txt/": "added"}


# --- the live watch --------------------------------------------------------------------------


def test_watch_catches_an_in_place_write_by_another_process(run_dir):
    _, _, manifest, work = run_dir
    with Watch(work, manifest) as watch:
        assert watch.unavailable == ""
        watch.started_at = time.time()
        writer = background(f"""
            import time
            time.sleep(0.3)
            with open({str(work / "train.py")!r}, "r+") as f:
                f.seek(0, 2)
                f.write("SCALAR_LR = 0.3\\n")
            """)
        assert writer.wait(timeout=30) == 0

    events = watch.events
    assert events and {(e.path, e.kind, e.differs) for e in events} == {
        ("train.py", "modified", True)}
    assert 0.3 <= events[0].at_seconds < 5.0
    entry, content = watch.seen("train.py")
    assert content == (STORY + "SCALAR_LR = 0.3\n").encode()


def test_watch_catches_an_atomic_rename_by_another_process(run_dir):
    _, _, manifest, work = run_dir
    with Watch(work, manifest) as watch:
        watch.started_at = time.time()
        linter = background(f"""
            import os, time
            time.sleep(0.4)
            tmp = {str(work / ".train.py.tmp")!r}
            with open(tmp, "w") as f:
                f.write({LINTED!r})
            os.replace(tmp, {str(work / "train.py")!r})
            """)
        assert linter.wait(timeout=30) == 0

    # One event, on the committed file; the temporary file is somebody's output, not ours.
    assert [(e.path, e.kind, e.differs) for e in watch.events] == [
        ("train.py", "replaced", True)]
    assert 0.4 <= watch.events[0].at_seconds < 5.0
    assert watch.seen("train.py")[1] == LINTED.encode()


def test_watch_ignores_reads_outputs_and_caches_of_a_real_run(run_dir):
    _, _, manifest, work = run_dir
    script = "import lib.util, train; open('out.txt', 'w').write('x' * 100000)"
    caching = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    with Watch(work, manifest) as watch:
        run = subprocess.run([sys.executable, "-c", script], cwd=work, capture_output=True,
                             text=True, timeout=60, check=False, env=caching)
    assert run.returncode == 0, run.stderr
    assert "SCALAR_LR 0.5" in run.stdout
    assert (work / "__pycache__").is_dir() and (work / "out.txt").exists()
    assert watch.events == []
    assert build(work, *run_dir[:3], watch).tampered is False


IN_PLACE = """
    with open(path, "w") as f:  # in place: truncated, then written back
        f.write(STORY[:100])
        f.flush()
        f.write(STORY[100:])
"""
RENAMED = """
    open(path + ".fmt", "w").write(STORY)
    os.replace(path + ".fmt", path)  # an atomic save of the same text
"""


@pytest.mark.parametrize("how", [IN_PLACE, RENAMED], ids=["in-place", "renamed"])
def test_one_rewrite_with_the_same_bytes_is_not_tampering(run_dir, how: str):
    repo, commit, manifest, work = run_dir
    with Watch(work, manifest) as watch:
        formatter = background(f"import os\npath, STORY = {str(work / 'train.py')!r}, "
                               f"{STORY!r}\nif True:{how}")
        assert formatter.wait(timeout=30) == 0
    assert watch.events and {e.differs for e in watch.events} == {False}
    assert watch.changes("train.py") == 1
    assert not build(work, repo, commit, manifest, watch).tampered


def test_two_rewrites_are_tampering_even_with_the_same_bytes(run_dir):
    # What the file held between the two cannot be vouched for: the watch may have read it
    # only after the second.
    repo, commit, manifest, work = run_dir
    with Watch(work, manifest) as watch:
        formatter = background(f"import os\npath, STORY = {str(work / 'train.py')!r}, "
                               f"{STORY!r}\nif True:{IN_PLACE}{RENAMED}")
        assert formatter.wait(timeout=30) == 0
    assert watch.changes("train.py") == 2
    report = build(work, repo, commit, manifest, watch)
    assert report.summary().startswith("train.py rewritten during the run"), report.summary()
    assert "(contents now match the commit)" in report.summary()


def test_a_change_put_back_before_exit_is_still_caught(run_dir):
    repo, commit, manifest, work = run_dir
    with Watch(work, manifest) as watch:
        watch.started_at = time.time()
        sneaky = background(f"""
            import time
            path = {str(work / "train.py")!r}
            open(path, "w").write({LINTED!r})
            time.sleep(0.5)
            open(path, "w").write({STORY!r})
            """)
        assert sneaky.wait(timeout=30) == 0
        exited = time.time()

    assert verify(manifest, work) == []  # the check after exit alone sees nothing
    report = build(work, repo, commit, manifest, watch, exited_at=exited)
    assert report.tampered
    assert re.fullmatch(r"train\.py:442 SCALAR_LR = 0\.5 -> 0\.3 \(file rewritten during the "
                        r"run, \d+\.\d s after launch\)", report.summary())


def test_watch_sees_a_directory_of_committed_files_removed(run_dir):
    repo, commit, manifest, work = run_dir
    with Watch(work, manifest) as watch:
        remover = background(f"import shutil; shutil.rmtree({str(work / 'sub')!r})")
        assert remover.wait(timeout=30) == 0
    assert ("sub/d.txt", "deleted") in {(e.path, e.kind) for e in watch.events}
    assert ("sub", "deleted") in {(e.path, e.kind) for e in watch.events}
    report = build(work, repo, commit, manifest, watch)
    assert report.problems[0].startswith("sub/d.txt deleted (during the run, ")


def test_a_write_just_before_stop_is_not_lost(run_dir):
    _, _, manifest, work = run_dir
    for i in range(20):  # stop races the observer thread: every time, the event must be in
        with Watch(work, manifest) as watch:
            (work / "lib" / "util.py").write_text(f"def f():\n    return {i + 2}\n")
        assert [e.path for e in watch.events][:1] == ["lib/util.py"], f"lost on try {i}"


def test_watch_stops_cleanly(run_dir):
    _, _, manifest, work = run_dir
    before = set(threading.enumerate())
    watch = Watch(work, manifest).start()
    assert len(set(threading.enumerate()) - before) >= 1
    t0 = time.perf_counter()
    watch.stop()
    assert time.perf_counter() - t0 < 1.0
    assert [t for t in set(threading.enumerate()) - before if t.is_alive()] == []
    assert not any(p.name.startswith(".overnight-watch-") for p in work.iterdir())
    watch.stop()  # twice is harmless


@pytest.mark.skipif(sys.platform != "linux", reason="inotify limits are Linux's")
def test_without_inotify_the_watch_degrades_and_the_checks_still_catch_it(run_dir):
    repo, commit, _, work = run_dir
    # A separate interpreter whose descriptors are all used up: inotify_init must fail.
    script = textwrap.dedent(f"""
        import json, os, resource, time
        from pathlib import Path
        from overnight.integrity import Manifest, TamperReport, Watch, verify
        from overnight.snapshot import Repo
        repo, work = Repo(Path({str(repo.root)!r})), Path({str(work)!r})
        tree = repo.tree({commit!r})
        manifest = Manifest.of_tree(tree)
        lowest_free = os.dup(0)
        os.close(lowest_free)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
        watch = Watch(work, manifest).start()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        (work / "train.py").write_text({LINTED!r})
        watch.stop()
        report = TamperReport.build(work, manifest, pre=[], post=verify(manifest, work),
                                    watch=watch, exited_at=time.time(),
                                    committed=lambda p: {{k: tree.read(k) for k in p}})
        print(json.dumps(report.to_json()))
        """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    report = TamperReport.from_json(json.loads(out.stdout))
    assert report.watch_unavailable.startswith("live watch unavailable: too many open files")
    assert report.events == []
    assert report.summary() == ("train.py:442 SCALAR_LR = 0.5 -> 0.3 "
                                "(file changed by the time the run exited)")


# --- the story, end to end -------------------------------------------------------------------


def test_a_linter_rewriting_a_constant_during_the_run_is_named_in_one_line(run_dir):
    repo, commit, manifest, work = run_dir
    done = work / "linter.done"
    experiment = f"""
        import os, runpy, time
        runpy.run_path("train.py")
        deadline = time.time() + 30
        while not os.path.exists({str(done)!r}):  # the workload: run until the linter is done
            if time.time() > deadline:
                raise SystemExit("the linter never ran")
            time.sleep(0.01)
        print("val_loss: 1.0")
        """
    with Watch(work, manifest) as watch:
        pre = verify(manifest, work, outputs_ok=False)
        watch.started_at = started = time.time()
        run = subprocess.Popen([sys.executable, "-c", textwrap.dedent(experiment)], cwd=work,
                               stdout=subprocess.PIPE, text=True)
        linter = background(f"""
            import os, time
            time.sleep(0.8)
            tmp = {str(work / "train.py.ruff")!r}
            open(tmp, "w").write({LINTED!r})
            os.replace(tmp, {str(work / "train.py")!r})
            open({str(done)!r}, "w").close()
            """)
        out, _ = run.communicate(timeout=60)
        exited = time.time()
        assert linter.wait(timeout=30) == 0 and run.returncode == 0
    report = build(work, repo, commit, manifest, watch, pre=pre, exited_at=exited)

    assert "SCALAR_LR 0.5" in out  # it started on the committed value...
    assert report.tampered  # ...but what ran is not provably what was committed
    m = re.fullmatch(r"train\.py:442 SCALAR_LR = 0\.5 -> 0\.3 \(file replaced during the run, "
                     r"(\d+\.\d) s after launch\)", report.summary())
    assert m, report.summary()
    assert 0.8 <= float(m.group(1)) <= exited - started + 0.05  # shown to 0.1 s
    assert "linter.done" in report.outputs and not report.pre_launch
    assert TamperReport.from_json(json.loads(json.dumps(report.to_json()))) == report


def test_a_change_before_launch_is_named_by_the_check_before_launch(run_dir):
    repo, commit, manifest, work = run_dir
    (work / "train.py").write_text(LINTED)  # between materializing and launching
    (work / "sitecustomize.py").write_text("import os\n")
    with Watch(work, manifest) as watch:
        pre = verify(manifest, work, outputs_ok=False)
    report = build(work, repo, commit, manifest, watch, pre=pre)
    assert report.problems == [
        "train.py:442 SCALAR_LR = 0.5 -> 0.3 (file changed before launch)",
        "sitecustomize.py is not in the commit (found before launch)",
    ]
    assert report.summary().endswith("(file changed before launch) (and 1 more)")


# --- explanations ----------------------------------------------------------------------------

WHEN = "during the run, 0.8 s after launch"


def test_explain_names_a_constant_change_with_its_line_and_values():
    assert explain("train.py", STORY.encode(), LINTED.encode(), WHEN, how="rewritten") == (
        "train.py:442 SCALAR_LR = 0.5 -> 0.3 (file rewritten during the run, 0.8 s after launch)")
    two = LINTED.replace("# line 3\n", "DEPTH = 8\n")
    two_new = two.replace("DEPTH = 8", "DEPTH = 6")
    assert explain("train.py", two.encode(), two_new.replace("0.3", "0.5").encode(), WHEN) == (
        "train.py:3 DEPTH = 8 -> 6, :442 SCALAR_LR = 0.3 -> 0.5 (file changed " + WHEN + ")")
    mixed = LINTED.replace("import time", "import os")
    assert explain("train.py", STORY.encode(), mixed.encode(), WHEN) == (
        "train.py:442 SCALAR_LR = 0.5 -> 0.3, and 1 other line(s) changed (first at line 443) "
        "(file changed " + WHEN + ")")


def test_explain_names_other_edits_by_their_first_line():
    old = "x = 1\ny = 2\nz = 3\n"
    assert explain("a.py", old.encode(), b"x = 1\ny = 20\nz = 3\n", WHEN) == (
        "a.py:2 'y = 2' -> 'y = 20' (file changed " + WHEN + ")")
    assert explain("a.py", old.encode(), b"x = 1\ny = 5\nz = 6\nw = 7\n", WHEN) == (
        "a.py: 3 lines changed (first at line 2 'y = 2' -> 'y = 5') (file changed " + WHEN + ")")
    assert explain("a.py", old.encode(), b"x = 1\nz = 3\n", "before launch") == (
        "a.py:2 removed 'y = 2' (file changed before launch)")
    assert explain("a.py", old.encode(), None, "after exit") == "a.py deleted (after exit)"
    long = "q = '" + "a" * 200 + "'\n"
    line = explain("a.py", old.encode(), (old + long).encode(), WHEN)
    assert line.startswith("a.py:4 added 'q = 'aaaa") and "..." in line and len(line) < 160
    assert explain("a.py", b"x = 1\n", b"    x = 1\n", WHEN).startswith(
        "a.py:1 'x = 1' -> '    x = 1'")
    assert explain("w.bin", b"\xff\x00", b"\xff\x01\x02", WHEN) == (
        "w.bin: contents differ (2 -> 3 bytes) (file changed " + WHEN + ")")
    # Not valid Python on one side: still a line diff, never an exception.
    assert explain("t.py", b"A = 1\n", b"A = (\n", WHEN) == (
        "t.py:1 'A = 1' -> 'A = (' (file changed " + WHEN + ")")
    assert "\n" not in explain("we\nird.py", b"a\n", b"b\n", WHEN)


def test_explain_knob_mismatch_and_when_phrases():
    assert explain_knob_mismatch("SCALAR_LR", 0.5, 0.3, "train.py", 14) == (
        "train.py:14 SCALAR_LR = 0.5 in the commit but 0.3 at run time")
    assert explain_knob_mismatch("DEPTH", 8, "8", "train.py", 3) == (
        "train.py:3 DEPTH = 8 in the commit but '8' at run time")
    assert when_phrase(-0.2) == "before launch"
    assert when_phrase(0.84, 10) == "during the run, 0.8 s after launch"
    assert when_phrase(12.0, 10) == "after exit"
    assert when_phrase(4 * 3600 + 5 * 60) == "during the run, 4 h 05 min after launch"
