"""The confining launcher: become the slot's user, confine, then execute the experiment.

    python -I -S launch.py '<json config>' <command> [args...]

The harness (root) starts this file in a fresh interpreter; it drops to the slot's uid and
gid, forbids new privileges, lowers resource limits, confines the filesystem with Landlock,
changes directory and executes the command, which inherits every restriction. The config:

    {"uid": 60600, "gid": 60600,           # both or neither; need root unless already them
     "umask": 63,                          # 0o077
     "rlimits": {"RLIMIT_NPROC": 512,      # soft = hard, or [soft, hard]; -1 is unlimited
                 "RLIMIT_CORE": 0},
     "landlock": {"read": ["/usr", ...], "write": ["/work/run"], "execute_ok": true},
     "cwd": "/work/run"}

Every key is optional; `landlock` null means no Landlock. Any failure prints one line
starting with "overnight-confine:" to stderr and exits 126, before the command runs.

Stdlib only, and never imports overnight. Everything is imported before the uid changes: the
harness's interpreter may live where the slot's user cannot read (/root/.pyenv).
"""

from __future__ import annotations

import json
import os
import resource
import sys
from collections.abc import Mapping
from typing import Any, NoReturn

try:
    from . import landlock  # imported by the harness, as overnight._confine.launch
except ImportError:  # run as a script under -I: its own directory is not on sys.path
    import importlib.util

    _spec = importlib.util.spec_from_file_location(
        "_overnight_confine_landlock", os.path.join(os.path.dirname(__file__), "landlock.py"))
    assert _spec is not None and _spec.loader is not None
    landlock = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(landlock)

EXIT_FAILED = 126
PREFIX = "overnight-confine:"
KEYS = ("uid", "gid", "umask", "rlimits", "landlock", "cwd")
LANDLOCK_KEYS = ("read", "write", "execute_ok")


def validate(config: Mapping[str, Any]) -> None:
    """Raise ValueError, naming the key, for a config this launcher would refuse."""
    unknown = sorted(set(config) - set(KEYS))
    if unknown:
        raise ValueError(f"confine config: unknown key(s) {unknown}; known: {list(KEYS)}")
    for key in ("uid", "gid", "umask"):
        value = config.get(key)
        if value is not None and (not _is_int(value) or value < 0):
            raise ValueError(f"confine config: {key} must be an integer >= 0, got {value!r}")
    if (config.get("uid") is None) != (config.get("gid") is None):
        raise ValueError("confine config: uid and gid go together; give both or neither")
    for name, value in (config.get("rlimits") or {}).items():
        if not name.startswith("RLIMIT_") or not hasattr(resource, name):
            raise ValueError(f"confine config: rlimits.{name} is not a resource limit here")
        _limits(name, value)
    rules = config.get("landlock")
    if rules is not None:
        unknown = sorted(set(rules) - set(LANDLOCK_KEYS))
        if unknown:
            raise ValueError(f"confine config: unknown landlock key(s) {unknown}")
        for key in ("read", "write"):
            paths = rules.get(key, [])
            if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
                raise ValueError(f"confine config: landlock.{key} must be a list of paths")
    cwd = config.get("cwd")
    if cwd is not None and not isinstance(cwd, str):
        raise ValueError(f"confine config: cwd must be a path, got {cwd!r}")


def confine(config: Mapping[str, Any]) -> None:
    """Apply `config` to this process, in the order that keeps each step possible: groups
    and ids (needs root), no new privileges, limits, Landlock, umask, directory."""
    validate(config)
    if config.get("uid") is not None:
        become(config["uid"], config["gid"])
    landlock.no_new_privs()
    for name, value in (config.get("rlimits") or {}).items():
        try:
            resource.setrlimit(getattr(resource, name), _limits(name, value))
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot set {name} to {value!r}: {e}") from e
    rules = config.get("landlock")
    if rules is not None:
        landlock.restrict(rules.get("read", []), rules.get("write", []),
                          execute_ok=rules.get("execute_ok", True))
    if config.get("umask") is not None:
        os.umask(config["umask"])
    if config.get("cwd") is not None:
        try:
            os.chdir(config["cwd"])
        except OSError as e:
            raise ValueError(f"cannot enter cwd {config['cwd']!r}: {e.strerror}") from e


def become(uid: int, gid: int) -> None:
    """Drop every supplementary group and take `uid`/`gid` as real, effective and saved ids,
    then check that root cannot be regained."""
    if (os.getuid(), os.geteuid(), os.getgid(), os.getegid()) == (uid, uid, gid, gid):
        return
    if os.geteuid() != 0:
        raise PermissionError(f"switching to uid {uid} needs root; running as uid {os.geteuid()}")
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if uid != 0:
        try:
            os.setresuid(0, 0, 0)
        except PermissionError:
            return
        raise PermissionError(f"after switching to uid {uid} the process could become root again")


def main(argv: list[str]) -> NoReturn:
    if len(argv) < 3:
        _fail("usage: launch.py '<json config>' <command> [args...]")
    try:
        config = json.loads(argv[1])
    except ValueError as e:
        _fail(f"the config is not JSON: {e}")
    if not isinstance(config, dict):
        _fail("the config must be a JSON object")
    command = argv[2:]
    try:
        confine(config)
    except (OSError, ValueError, landlock.LandlockError) as e:
        _fail(str(e))
    try:
        os.execvp(command[0], command)
    except OSError as e:
        _fail(f"cannot execute {command[0]!r}: {e.strerror}")


def _limits(name: str, value: Any) -> tuple[int, int]:
    if _is_int(value):
        return value, value
    if (isinstance(value, list) and len(value) == 2 and all(_is_int(v) for v in value)):
        return value[0], value[1]
    raise ValueError(f"confine config: rlimits.{name} must be an integer or [soft, hard], "
                     f"got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fail(message: str) -> NoReturn:
    sys.stderr.write(f"{PREFIX} {message}\n")
    sys.stderr.flush()
    sys.exit(EXIT_FAILED)


if __name__ == "__main__":
    main(sys.argv)
