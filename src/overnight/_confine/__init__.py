"""The harness's handle on confinement without namespaces (`sandbox = "user"`).

Where bubblewrap cannot run (Docker's default seccomp profile forbids user namespaces) and
the harness is root, each slot's experiment runs as its own unprivileged uid (`uids.py`),
confined by Landlock (`landlock.py`) through a launcher started in a fresh interpreter
(`launch.py`). Those two files are stdlib only and never import overnight; this one and
`uids.py` are the harness's.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import launch

DIR = Path(__file__).resolve().parent

# What any program needs to read: binaries, libraries, configuration, /proc and /sys.
SYSTEM_READ = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc",
               "/proc", "/sys")
# Devices every program may open read-write; GPUs are opened read-write and take ioctls.
DEVICE_WRITE = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom",
                "/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools",
                "/dev/nvidia-modeset")


def launcher_path() -> str:
    """The launcher script, to run as `python -I -S <launcher_path()> <config> <command...>`
    by the harness's own interpreter, as root."""
    return str(DIR / "launch.py")


def argv(config: Mapping[str, Any], command: list[str], python: str = sys.executable) -> list[str]:
    """The argv that runs `command` confined by `config` (the keys are documented in
    launch.py). Raises ValueError, naming the key, for a config the launcher would refuse."""
    if not command:
        raise ValueError("confine: the command is empty")
    launch.validate(config)
    return [python, "-I", "-S", launcher_path(), json.dumps(dict(config)), *command]


def system_read_paths() -> list[str]:
    """The system directories of SYSTEM_READ that exist here, for Landlock's read list."""
    return [path for path in SYSTEM_READ if os.path.exists(path)]


def device_write_paths() -> list[str]:
    """The device files of DEVICE_WRITE and every /dev/nvidia<N> that exist here, for
    Landlock's write list (a slot that must not see other GPUs should leave theirs out)."""
    gpus = sorted(glob.glob("/dev/nvidia[0-9]*"))
    return [path for path in (*DEVICE_WRITE, *gpus) if os.path.exists(path)]
