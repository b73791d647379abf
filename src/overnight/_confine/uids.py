"""One unprivileged uid per slot, and ending every process of such a uid.

A slot's uid owns nothing and needs no /etc/passwd entry. Killing by uid reaches what an
experiment started however it hid: a double-forked `setsid` daemon that cleared its
environment still runs as the slot's uid, and only root (the harness) or that uid can signal
it. So the harness ends a run with `kill_uid`, then waits with `await_exit`, and kills any
leftovers of a slot's uid before starting the next run on it.
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

from overnight.errors import OvernightError

# systemd's uid conventions (systemd.io/UIDS-GIDS) leave 60578-61183 unassigned: above
# regular users (1000-60000), systemd-homed and nspawn's bind-users, below DynamicUser=
# (61184-65519) and nobody (65534). Staying under 65536 keeps the uids valid in containers
# whose user namespace maps only 0-65535 (rootless Docker, Podman).
SLOT_UID_BASE = 60600
SLOT_UID_LAST = 61183

# Runs as root in a fresh interpreter, becomes `uid`, then kill(-1): the kernel signals
# exactly the processes that uid may signal (real or saved uid equal to it), in one pass
# over the process table that no fork can race; never the caller itself.
_KILLER = """\
import os, sys
uid, sig = int(sys.argv[1]), int(sys.argv[2])
os.setgroups([])
os.setresuid(uid, uid, uid)
try:
    os.kill(-1, sig)
except ProcessLookupError:
    pass  # nothing runs as uid
"""


# Each harness claims its slots' uids, one lock file per uid held for as long as it lives:
# two loops on one machine (two repositories, two tags) never share a uid, so neither kills
# the other's runs when it ends its own, nor can one's experiment reach the other's files.
# The OS drops a dead harness's locks; the next claimant kills what it left running.
CLAIMS = Path(os.environ.get("OVERNIGHT_UID_CLAIMS")
              or ("/run/lock" if os.path.isdir("/run/lock") else "/tmp")) / "overnight-uids"
_claimed: dict[int, tuple[int, int]] = {}  # slot -> (uid, the lock's descriptor)
_claiming = threading.Lock()


def slot_ids(slot: int) -> tuple[int, int]:
    """(uid, gid) of slot `slot` of this harness: a uid of SLOT_UID_BASE..SLOT_UID_LAST that
    no other live harness on this machine holds, the same for the slot while this one runs."""
    with _claiming:
        if slot in _claimed:
            uid = _claimed[slot][0]
            return uid, uid
        folder = _claims_folder()
        taken = {uid for uid, _ in _claimed.values()}
        for uid in range(SLOT_UID_BASE, SLOT_UID_LAST + 1):
            if uid in taken:
                continue
            fd = os.open(folder / str(uid), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            _claimed[slot] = (uid, fd)
            return uid, uid
    raise OvernightError(f"every slot uid ({SLOT_UID_BASE}-{SLOT_UID_LAST}) is held by other "
                         "overnight loops on this machine: stop one, or use fewer slots")


def _claims_folder() -> Path:
    """The claims' folder: root's alone (a run, another uid, must not be able to hold or
    remove a claim)."""
    CLAIMS.mkdir(mode=0o700, parents=False, exist_ok=True)
    st = os.lstat(CLAIMS)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise OvernightError(f"{CLAIMS} must be a directory of this user's with mode 0700 (it "
                             "records which slot uids each overnight loop holds): remove it "
                             "and run again")
    return CLAIMS


def procs_of_uid(uid: int) -> list[int]:
    """Pids of the live processes whose real, effective or saved uid is `uid`; zombies (dead,
    waiting for their parent to collect them) are left out."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status") as f:
                status = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue  # it exited while we looked
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        if fields.get("State", "").startswith(("Z", "X")):
            continue
        if str(uid) in fields.get("Uid", "").split()[:3]:
            found.append(int(entry.name))
    return sorted(found)


def kill_uid(uid: int, sig: int = signal.SIGKILL, python: str = sys.executable) -> None:
    """Send `sig` to every process running as `uid` (none is fine). Needs root; refuses
    root's uid and the harness's own. `python` runs the short-lived killer as root (the
    harness's interpreter is fine). Then wait with `await_exit(procs_of_uid(uid), ...)`.

    The dead stay zombies until their parent, or the init that adopted them, collects them,
    and zombies still count against the uid's RLIMIT_NPROC: the harness's container needs an
    init that reaps (Docker's --init, tini), or the harness must be a child subreaper."""
    if uid == 0 or uid == os.getuid():
        raise ValueError(f"kill_uid({uid}) would kill the harness or root's processes")
    if os.geteuid() != 0:
        raise PermissionError(f"kill_uid({uid}) needs root; running as uid {os.geteuid()}")
    done = subprocess.run([python, "-I", "-S", "-c", _KILLER, str(uid), str(int(sig))],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if done.returncode != 0:
        raise OSError(f"kill_uid({uid}): the killer failed: {done.stderr.strip()}")


def await_exit(pids: list[int], timeout: float) -> list[int]:
    """Wait until every process of `pids` has exited (it need not be our child), at most
    `timeout` seconds; return those still running."""
    deadline = time.monotonic() + timeout
    fds: dict[int, int] = {}
    try:
        for pid in pids:
            try:
                fds[os.pidfd_open(pid)] = pid
            except ProcessLookupError:
                continue
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        waiting = set(fds)
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for fd, _ in poller.poll(left * 1000):
                poller.unregister(fd)
                waiting.discard(fd)
        return sorted(fds[fd] for fd in waiting)
    finally:
        for fd in fds:
            os.close(fd)
