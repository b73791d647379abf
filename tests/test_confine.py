"""Confinement without namespaces: an experiment as its slot's uid under Landlock cannot read
the repository, write outside its work directory, signal the harness or fork without end,
and everything it started dies by uid. Real processes, as root (as in CI)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from overnight._confine import argv, device_write_paths, landlock, system_read_paths
from overnight._confine.launch import EXIT_FAILED, PREFIX
from overnight._confine.uids import (
    SLOT_UID_BASE,
    SLOT_UID_LAST,
    await_exit,
    kill_uid,
    procs_of_uid,
    slot_ids,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching uids needs root")

# The last slots of the range: a harness running on this machine uses the first ones.
SLOT = SLOT_UID_LAST - SLOT_UID_BASE


@dataclass
class Box:
    """A repository the experiment must not see, a work directory it owns, and a
    world-writable directory outside it: permission bits alone would allow both."""

    root: Path
    repo: Path
    work: Path
    public: Path
    uid: int
    gid: int

    def config(self, confine: bool = True, **extra: object) -> dict:
        rules = {"read": system_read_paths(), "write": [str(self.work), *device_write_paths()]}
        return {"uid": self.uid, "gid": self.gid, "umask": 0o077, "cwd": str(self.work),
                "rlimits": {"RLIMIT_CORE": 0}, "landlock": rules if confine else None, **extra}

    def run(self, script: str, confine: bool = True,
            **extra: object) -> subprocess.CompletedProcess:
        command = argv(self.config(confine, **extra), ["/bin/sh", "-c", script])
        env = {"PATH": "/usr/bin:/bin", "REPO": str(self.repo), "WORK": str(self.work),
               "PUBLIC": str(self.public), "OVERNIGHT_RUN_MARKER": "1"}
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)


@pytest.fixture
def make_box() -> Iterator[Callable[[int], Box]]:
    made: list[Box] = []

    def make(slot: int) -> Box:
        uid, gid = slot_ids(slot)
        # Not under pytest's tmp_path: /tmp/pytest-of-root is 0700, closed to the slot's user.
        root = Path(tempfile.mkdtemp(prefix="confine-", dir="/tmp"))
        root.chmod(0o755)
        repo, work, public = root / "repo", root / "work", root / "public"
        repo.mkdir(mode=0o755)
        (repo / "secret.txt").write_text("the ledger\n")
        (repo / "secret.txt").chmod(0o644)
        work.mkdir()
        os.chown(work, uid, gid)
        public.mkdir()
        public.chmod(0o777)
        box = Box(root, repo, work, public, uid, gid)
        made.append(box)
        return box

    yield make
    for box in made:
        kill_uid(box.uid)
        assert await_exit(procs_of_uid(box.uid), timeout=10) == []
        shutil.rmtree(box.root)


def test_landlock_is_available_here():
    assert landlock.abi() >= 1, landlock.unavailable_reason()
    assert landlock.unavailable_reason() == ""


def test_confined_child_writes_only_its_work_dir(make_box):
    box = make_box(SLOT)
    script = ("echo result > $WORK/out && echo wrote-work\n"
              "echo x > $PUBLIC/planted && echo wrote-public\n"
              "cat $REPO/secret.txt\n"
              "ls $REPO && echo listed-repo\n"
              "ln -s $REPO/secret.txt $WORK/link && cat $WORK/link\n"
              "echo x > /tmp/planted-$$ && echo wrote-tmp\n")
    out = box.run(script)
    assert "wrote-work" in out.stdout and (box.work / "out").read_text() == "result\n"
    assert (box.work / "out").stat().st_uid == box.uid
    assert "wrote-public" not in out.stdout and not (box.public / "planted").exists()
    assert "wrote-tmp" not in out.stdout
    assert "the ledger" not in out.stdout and "listed-repo" not in out.stdout
    assert "Permission denied" in out.stderr


def test_without_landlock_the_permission_bits_alone_would_allow_it(make_box):
    # The control for the test above: the same uid, unconfined, reads and plants.
    box = make_box(SLOT)
    out = box.run("cat $REPO/secret.txt; echo x > $PUBLIC/planted && echo wrote-public",
                  confine=False)
    assert "the ledger" in out.stdout and "wrote-public" in out.stdout


def test_confined_child_is_unprivileged_and_cannot_signal_the_harness(make_box):
    box = make_box(SLOT)
    script = (f"id -u; id -G; grep -E '^(CapEff|NoNewPrivs)' /proc/self/status\n"
              f"kill -0 {os.getpid()} && echo signalled-harness\n"
              "ulimit -c\n")
    out = box.run(script)
    lines = out.stdout.split("\n")
    assert lines[0] == str(box.uid) != "0"
    assert lines[1] == str(box.gid)  # no supplementary group of root's survives
    assert "CapEff:\t0000000000000000" in lines
    assert "NoNewPrivs:\t1" in lines
    assert "signalled-harness" not in out.stdout and "not permitted" in out.stderr
    assert lines[-2] == "0"  # RLIMIT_CORE


@pytest.mark.skipif(landlock.abi() < 6, reason="signal scoping needs Landlock ABI 6")
def test_signals_stay_inside_the_landlock_domain(make_box):
    # Another process of the very same uid, outside the domain: uid rules would allow the
    # signal, Landlock's scope does not.
    box = make_box(SLOT)
    target = subprocess.Popen(argv(box.config(confine=False), ["/bin/sleep", "300"]),
                              stdin=subprocess.DEVNULL)
    try:
        confined = box.run(f"kill -0 {target.pid} && echo signalled")
        free = box.run(f"kill -0 {target.pid} && echo signalled", confine=False)
    finally:
        target.kill()
        target.wait()
    assert "signalled" not in confined.stdout and "not permitted" in confined.stderr
    assert "signalled" in free.stdout


def test_nproc_stops_a_fork_bomb_and_kill_uid_ends_it(make_box):
    box = make_box(SLOT - 1)
    # Zombies count against RLIMIT_NPROC until an init collects them, and this one may take
    # its time with those of an earlier run: leave room for them.
    limit = len(_entries_of_uid(box.uid)) + 16
    script = ("n=0\n"
              "while [ $n -lt 300 ]; do sleep 300 >/dev/null 2>&1 & n=$((n+1)); echo $n; done\n"
              "echo escaped\n")
    out = box.run(script, rlimits={"RLIMIT_NPROC": limit})
    assert "escaped" not in out.stdout and "Cannot fork" in out.stderr
    forked = [int(line) for line in out.stdout.split()]
    assert forked and max(forked) < limit
    survivors = procs_of_uid(box.uid)
    assert len(survivors) == max(forked)  # the sleeps outlived the shell (they hold no pipe)
    kill_uid(box.uid)
    assert await_exit(survivors, timeout=10) == []
    assert procs_of_uid(box.uid) == []
    kill_uid(box.uid)  # nothing left to signal is fine


def test_kill_uid_ends_a_daemon_that_left_the_session_and_cleared_its_environment(make_box):
    box = make_box(SLOT)
    # Double fork: the shell backgrounds setsid, which starts a new session; the daemon
    # clears its environment, prints its pid and drops the pipe; the shell exits at once.
    script = ("setsid env -i /bin/sh -c 'echo $$; exec /bin/sleep 300 >/dev/null 2>&1' &\n"
              "exit 0\n")
    out = box.run(script)
    assert out.returncode == 0, out.stderr
    daemon = int(out.stdout)
    assert os.getsid(daemon) == daemon != os.getsid(0)
    assert b"OVERNIGHT_RUN_MARKER" not in Path(f"/proc/{daemon}/environ").read_bytes()
    assert procs_of_uid(box.uid) == [daemon]
    kill_uid(box.uid)
    assert await_exit([daemon], timeout=10) == []
    assert procs_of_uid(box.uid) == []


def _entries_of_uid(uid: int) -> list[str]:
    """Every /proc entry of `uid`, zombies included."""
    return [entry.name for entry in os.scandir("/proc")
            if entry.name.isdigit() and _stat_uid(entry.path) == uid]


def _stat_uid(path: str) -> int | None:
    try:
        return os.stat(path).st_uid
    except FileNotFoundError:
        return None


def test_launcher_failures_exit_126_with_one_line(make_box):
    box = make_box(SLOT)
    missing = str(box.root / "missing")
    cases = {
        "cwd": box.config(cwd=missing),
        "landlock": box.config(landlock={"read": [missing], "write": []}),
        "rlimits": box.config(rlimits={"RLIMIT_NOFILE": [10, 2**40]}),
    }
    for key, config in cases.items():
        out = subprocess.run(argv(config, ["/bin/true"]), capture_output=True, text=True)
        assert out.returncode == EXIT_FAILED, key
        assert out.stderr.startswith(PREFIX) and out.stderr.count("\n") == 1, out.stderr
    out = subprocess.run(argv(box.config(), [str(box.root / "no-such-program")]),
                         capture_output=True, text=True)
    assert out.returncode == EXIT_FAILED and out.stderr.startswith(f"{PREFIX} cannot execute")


def test_bad_configs_are_refused_before_launch_naming_the_key():
    with pytest.raises(ValueError, match="uid and gid"):
        argv({"uid": SLOT_UID_BASE}, ["/bin/true"])
    with pytest.raises(ValueError, match="unknown key"):
        argv({"user": "nobody"}, ["/bin/true"])
    with pytest.raises(ValueError, match="RLIMIT_NOPE"):
        argv({"rlimits": {"RLIMIT_NOPE": 1}}, ["/bin/true"])
    with pytest.raises(ValueError, match="landlock.write"):
        argv({"landlock": {"write": "/tmp"}}, ["/bin/true"])


CLAIM = ("import sys; from overnight._confine.uids import slot_ids; "
         "print(*[slot_ids(s)[0] for s in range(3)], flush=True); sys.stdin.read()")


def _claimant() -> tuple[subprocess.Popen, list[int]]:
    """A harness (another process) holding the uids of its slots 0-2 until its stdin closes."""
    proc = subprocess.Popen([sys.executable, "-c", CLAIM], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    return proc, [int(u) for u in proc.stdout.readline().split()]


def test_each_harness_claims_uids_no_other_live_one_holds():
    # Two loops on one machine never share a slot uid: neither kills the other's runs.
    a, a_uids = _claimant()
    b, b_uids = _claimant()
    try:
        assert len(set(a_uids)) == 3 and not set(a_uids) & set(b_uids)
        assert all(SLOT_UID_BASE <= u <= SLOT_UID_LAST for u in a_uids + b_uids)
        assert slot_ids(0) == slot_ids(0) and slot_ids(0)[0] not in a_uids + b_uids
    finally:
        a.stdin.close()
        a.wait(timeout=10)
    c, c_uids = _claimant()  # a dead harness's uids are free again
    try:
        assert c_uids[0] == a_uids[0] and not set(c_uids) & set(b_uids)
    finally:
        for p in (b, c):
            p.stdin.close()
            p.wait(timeout=10)


