"""Linux Landlock through ctypes: an unprivileged process confines its own filesystem access.

Landlock needs no namespaces and no privilege (Linux >= 5.13), so it works where Docker's
default seccomp profile forbids user namespaces and bubblewrap cannot run. A process builds a
ruleset (which access rights it handles, which paths keep which of them), then restricts
itself; the restriction is inherited by everything it executes or forks and can never be
lifted. Rights the running kernel does not know are left out, by ABI version:

    1 (5.13) execute, read, write, remove, make        4 (6.7)  TCP bind/connect (unused here)
    2 (5.19) refer: rename/link across directories     5 (6.10) ioctl on device files
    3 (6.2)  truncate                                   6 (6.12) scopes: abstract UNIX sockets,
                                                                 signals

Stdlib only, and never imports overnight: the launcher loads this file in a fresh interpreter.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat

# Generic syscall numbers, shared by x86_64, aarch64 and every architecture that joined the
# unified table (all but alpha).
_SYS_CREATE_RULESET = 444
_SYS_ADD_RULE = 445
_SYS_RESTRICT_SELF = 446

_CREATE_RULESET_VERSION = 1 << 0
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38

# Filesystem access rights (include/uapi/linux/landlock.h).
EXECUTE = 1 << 0
WRITE_FILE = 1 << 1
READ_FILE = 1 << 2
READ_DIR = 1 << 3
REMOVE_DIR = 1 << 4
REMOVE_FILE = 1 << 5
MAKE_CHAR = 1 << 6
MAKE_DIR = 1 << 7
MAKE_REG = 1 << 8
MAKE_SOCK = 1 << 9
MAKE_FIFO = 1 << 10
MAKE_BLOCK = 1 << 11
MAKE_SYM = 1 << 12
REFER = 1 << 13  # ABI 2
TRUNCATE = 1 << 14  # ABI 3
IOCTL_DEV = 1 << 15  # ABI 5
# Scopes (ABI 6): the domain cannot reach outside itself through these.
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0
SCOPE_SIGNAL = 1 << 1

_FS_BY_ABI = {
    1: EXECUTE | WRITE_FILE | READ_FILE | READ_DIR | REMOVE_DIR | REMOVE_FILE | MAKE_CHAR
    | MAKE_DIR | MAKE_REG | MAKE_SOCK | MAKE_FIFO | MAKE_BLOCK | MAKE_SYM,
    2: REFER,
    3: TRUNCATE,
    5: IOCTL_DEV,
}
# Rights that apply to a file itself; a rule on a non-directory may only grant these.
_FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV
_READ = READ_FILE | READ_DIR


class LandlockError(RuntimeError):
    """Landlock is unavailable, or a ruleset could not be built or enforced."""


class _RulesetAttr(ctypes.Structure):
    # The full ABI 6 layout; older kernels accept it as long as the fields they do not know
    # are zero.
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # __attribute__((packed)) in the kernel's header: 12 bytes
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.restype = ctypes.c_int


def abi() -> int:
    """The Landlock ABI version of the running kernel; 0 when Landlock is unavailable (see
    `unavailable_reason()`)."""
    return _probe()[0]


def unavailable_reason() -> str:
    """Why `abi()` is 0, in words a user can act on; "" when Landlock is available."""
    return _probe()[1]


def handled_fs(version: int) -> int:
    """Every filesystem right the given ABI version knows (all of them get restricted)."""
    rights = 0
    for since, bits in _FS_BY_ABI.items():
        if version >= since:
            rights |= bits
    return rights


def restrict(read: list[str], write: list[str], execute_ok: bool = True) -> None:
    """Confine this process (and all it later executes or forks) to reading beneath `read`
    and reading and writing beneath `write`; everything else on the filesystem is denied.

    Write grants every right: create, remove, rename within, truncate, and ioctl on device
    files (so GPU device nodes, opened read-write, belong in `write`). `execute_ok` lets
    files beneath both lists be executed; without it only files beneath `read` may be, so
    nothing the process writes can be executed (unless a `write` path lies beneath a `read`
    one: rules accumulate down the tree). With ABI >= 6 the process also cannot send signals
    to, or connect to abstract UNIX sockets of, processes outside its Landlock domain.

    Sets PR_SET_NO_NEW_PRIVS first. Call it from a single-threaded process: Landlock
    confines the calling thread only. Raises LandlockError when Landlock is unavailable or a
    path cannot be opened (every path must exist)."""
    version, reason = _probe()
    if version == 0:
        raise LandlockError(f"Landlock is unavailable: {reason}")
    handled = handled_fs(version)
    attr = _RulesetAttr(handled_access_fs=handled, handled_access_net=0,
                        scoped=SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if version >= 6 else 0)
    read_rights = _READ | EXECUTE
    write_rights = handled if execute_ok else handled & ~EXECUTE
    ruleset = _syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.sizeof(attr), 0)
    if ruleset < 0:
        raise LandlockError(f"landlock_create_ruleset failed: {_strerror()}")
    try:
        for path in read:
            _add_path(ruleset, path, read_rights & handled)
        for path in write:
            _add_path(ruleset, path, write_rights)
        no_new_privs()
        if _syscall(_SYS_RESTRICT_SELF, ruleset, 0) < 0:
            raise LandlockError(f"landlock_restrict_self failed: {_strerror()}")
    finally:
        os.close(ruleset)


def no_new_privs() -> None:
    """Set PR_SET_NO_NEW_PRIVS: no execve can grant privileges again (setuid bits and file
    capabilities stop working). Required by landlock_restrict_self for an unprivileged
    process; irreversible."""
    if _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise LandlockError(f"prctl(PR_SET_NO_NEW_PRIVS) failed: {_strerror()}")


def _add_path(ruleset: int, path: str, rights: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError as e:
        raise LandlockError(f"cannot open {path!r} for a Landlock rule: {e.strerror}") from e
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            rights &= _FILE_RIGHTS
        rule = _PathBeneathAttr(allowed_access=rights, parent_fd=fd)
        if _syscall(_SYS_ADD_RULE, ruleset, _RULE_PATH_BENEATH, ctypes.byref(rule), 0) < 0:
            raise LandlockError(f"landlock_add_rule for {path!r} failed: {_strerror()}")
    finally:
        os.close(fd)


def _probe() -> tuple[int, str]:
    machine = os.uname().machine
    if os.uname().sysname != "Linux" or machine.startswith("alpha"):
        return 0, f"Landlock is Linux-only, and not wired here ({os.uname().sysname} {machine})"
    version = _syscall(_SYS_CREATE_RULESET, None, 0, _CREATE_RULESET_VERSION)
    if version > 0:
        return version, ""
    code = ctypes.get_errno()
    if code == errno.ENOSYS:
        return 0, ("the kernel has no Landlock system calls (it needs Linux >= 5.13 built "
                   "with CONFIG_SECURITY_LANDLOCK), or a seccomp filter blocks them")
    if code == errno.EOPNOTSUPP:
        return 0, ("Landlock is built into the kernel but disabled at boot: add 'landlock' "
                   "to the kernel's lsm= parameter")
    if code == errno.EPERM:
        return 0, "a seccomp filter blocks the Landlock system calls (EPERM)"
    return 0, f"landlock_create_ruleset failed: {os.strerror(code)}"


def _syscall(number: int, *args: object) -> int:
    # syscall(2) is variadic and reads every argument as a long: widen the ints.
    wide = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    return _libc.syscall(ctypes.c_long(number), *wide)


def _strerror() -> str:
    code = ctypes.get_errno()
    return f"{errno.errorcode.get(code, code)} ({os.strerror(code)})"
