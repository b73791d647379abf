"""What an experiment may see: a scrubbed environment, and optionally a bubblewrap sandbox."""

from __future__ import annotations

import fnmatch
import shutil
from pathlib import Path

from overnight.errors import ConfigError

# Names that look like credentials. An experiment never needs the harness's API keys.
SECRET_PATTERNS = (
    "*_API_KEY", "*_APIKEY", "*_TOKEN", "*_SECRET", "*_SECRET_KEY", "*_SECRET_ACCESS_KEY",
    "*PASSWORD*", "*PASSWD*", "*_ACCESS_KEY", "*_ACCESS_KEY_ID", "*_PRIVATE_KEY",
    "*_CREDENTIALS", "*_CLIENT_SECRET", "*_SESSION_TOKEN", "*_CONNECTION_STRING",
    "AWS_*", "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_KEYFILE_JSON", "AZURE_*",
    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "KAGGLE_KEY", "NETRC", "SSH_AUTH_SOCK",
)


def is_secret(name: str) -> bool:
    upper = name.upper()
    return any(fnmatch.fnmatchcase(upper, p) for p in SECRET_PATTERNS)


def scrubbed_env(base: dict[str, str], allow: list[str]) -> tuple[dict[str, str], list[str]]:
    """`base` without secret-looking variables, except those allowed by name."""
    allowed = set(allow)
    removed = sorted(k for k in base if is_secret(k) and k not in allowed)
    return {k: v for k, v in base.items() if k not in removed}, removed


def require_bwrap() -> str:
    path = shutil.which("bwrap")
    if path is None:
        raise ConfigError(
            '[run] sandbox = "bwrap" but bubblewrap is not installed: install it '
            "(Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap) or set "
            'sandbox = "none"'
        )
    return path


def bwrap_argv(bwrap: str, workdir: Path, writable: list[Path],
               readable: list[Path] = ()) -> list[str]:
    """Read-only filesystem, writable run directories, a private /tmp, no network.

    Devices stay (GPUs live in /dev); the process stays in the harness's process group so a
    timeout still kills the whole tree. `readable` paths that live under /tmp (a virtual
    environment, the repository) are bound back, read-only, over the private /tmp.
    """
    argv = [bwrap, "--ro-bind", "/", "/", "--dev-bind", "/dev", "/dev", "--proc", "/proc",
            "--tmpfs", "/tmp", "--unshare-net", "--die-with-parent"]
    tmp = Path("/tmp")
    for path in readable:
        p = path.resolve()
        if p.exists() and (p == tmp or tmp in p.parents):
            argv += ["--ro-bind", str(p), str(p)]
    for path in [workdir, *writable]:
        p = str(path.resolve())
        argv += ["--bind", p, p]
    return argv + ["--chdir", str(workdir.resolve())]
