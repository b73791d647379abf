"""Attestation of what an experiment's Python process executed: stdlib only, Python 3.9+.

Loaded by the sibling sitecustomize.py when OVERNIGHT_ATTEST_OUT is set, in a process started
as `python [options] script.py [args]` whose script lies under OVERNIGHT_ATTEST_ROOT. It writes
to OVERNIGHT_ATTEST_OUT (JSON, replaced atomically) what ran:

- main: the sha256 of the script's bytes that were compiled and executed. They are read
  once, here, and Python never reads the file itself: CPython asks sys.path_importer_cache
  for an importer of the script path before it opens the script (that is how it runs a zip
  file or a directory). We answer for our script, so CPython runs it through runpy with code
  that compiles the bytes we hashed. `_run_main` then makes `__main__` look exactly as a
  plain `python script.py` would (`__spec__` None, sys.path[0] the script's directory, ...).
- modules: {path: sha256} for every module imported from a file under the root (out of
  site-packages and the interpreter's prefix): the bytes hashed are the bytes compiled, and
  no __pycache__ file is read or written for them, so a stale .pyc cannot stand in.
- knobs: at exit, the runtime values of the script's UPPER_CASE module-level scalars, and of
  the names listed in OVERNIGHT_ATTEST_KNOBS (comma-separated: lowercase knobs).
- python, exit: the interpreter and how the script ended.

The file is written when the script starts (complete: false), again when a new module under
the root is imported, and last at exit (complete: true). A process killed by a signal leaves
the last partial file. When OVERNIGHT_ATTEST_OUT already exists (another process of the run
claimed it: a subprocess or a sibling worker running a script under the root), this process
writes `<stem>.<pid><suffix>` next to it instead.
"""

from __future__ import annotations

import _thread
import atexit
import math
import os
import sys
import time
from importlib.machinery import ModuleSpec, SourceFileLoader

try:  # the builtin sha256: importing hashlib loads OpenSSL, ~3-10 ms at every start
    from _sha2 import sha256  # Python 3.12+
except ImportError:
    try:
        from _sha256 import sha256  # Python <= 3.11
    except ImportError:
        from hashlib import sha256

OUT_ENV = "OVERNIGHT_ATTEST_OUT"
ROOT_ENV = "OVERNIGHT_ATTEST_ROOT"
KNOBS_ENV = "OVERNIGHT_ATTEST_KNOBS"
SCHEMA = 1
_UPPER = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_KNOB_CHARS = _UPPER | frozenset("0123456789_")
_MISSING = object()

# The one attestation of this process (a start-up hook is process-wide by nature) and the
# loader method it wraps.
_active: _Attestation | None = None
_original_get_code = SourceFileLoader.get_code


def install() -> None:
    """Attest this process if it runs a script under the root; else leave it untouched."""
    global _active
    if _active is not None:  # a second copy of our directory on sys.path
        return
    script = _script_argument()
    if script is None:
        return
    out = os.path.abspath(os.environ[OUT_ENV])  # the script may chdir before we write
    att = _Attestation(out, os.environ.get(ROOT_ENV) or os.getcwd(), script)
    if att.main_path is None:
        return
    try:
        with open(att.script_abs, "rb") as f:
            att.source = f.read()
        att.main_sha256 = sha256(att.source).hexdigest()
        att.startup_stat = _stat_key(att.script_abs)
    except OSError:
        return  # Python reports the unreadable script itself, as it always does
    _active = att
    SourceFileLoader.get_code = _get_code
    finder = _MainFinder()
    # CPython looks the script up by its absolute path (3.9+); the path as typed costs nothing.
    for key in {att.script_abs, script}:
        sys.path_importer_cache[key] = finder
    atexit.register(att.finish)
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=att.after_fork)


def _script_argument() -> str | None:
    """The script path when Python was started to run a .py file (not -c, -m, -i, stdin)."""
    if sys.flags.inspect or sys.flags.interactive:
        return None
    argv = sys.argv
    if not argv or argv[0] in ("", "-c", "-m", "-") or not argv[0].endswith(".py"):
        return None
    orig = getattr(sys, "orig_argv", None)  # 3.10+: the interpreter's own command line
    if orig is not None and orig[len(orig) - len(argv):] != argv:
        return None
    if not os.path.isfile(argv[0]):
        return None
    return argv[0]


class _MainFinder:
    """Importer for the script path: gives runpy a spec for `__main__` whose code calls
    `_run_main`. Only `__main__`, only once: any other name falls through to sys.path."""

    def __init__(self) -> None:
        self.used = False

    def find_spec(self, fullname: str, target: object = None) -> ModuleSpec | None:
        if fullname != "__main__" or self.used or _active is None:
            return None
        self.used = True
        return ModuleSpec("__main__", self, origin=_active.script_abs)

    def get_code(self, fullname: str) -> object:
        return _STUB

    def invalidate_caches(self) -> None:
        pass


# Runs in __main__'s namespace and binds no name there.
_STUB = compile(f"__import__('sys').modules[{__name__!r}]._run_main()",
                "<overnight attestation>", "exec", dont_inherit=True)


def _run_main() -> None:
    """Run the script from the hashed bytes as CPython runs `python script.py`, and exit
    the way it would: tracebacks, exit codes and finalization stay the interpreter's own."""
    att = _active
    assert att is not None and att.source is not None
    globs = sys.modules["__main__"].__dict__
    try:
        att.take_over(globs)
    except Exception as err:  # noqa: BLE001 - a bug of ours must not stop the experiment
        _warn(f"attestation failed to start: {err!r}")
    try:
        code = compile(att.source, att.script_abs, "exec", dont_inherit=True)
        exec(code, globs)
    except SystemExit as exc:
        att.ended("exit", _exit_status(exc.code))
        raise  # CPython runs atexit, prints a non-int code, exits: __file__ stays, as here
    except KeyboardInterrupt:
        att.ended("interrupt", None, "KeyboardInterrupt")
        raise  # CPython ends the process with SIGINT, as it does for a script
    except BaseException as exc:  # noqa: BLE001 - an uncaught exception of the script
        att.ended("exception", 1, _describe(exc))
        _print_uncaught(exc)
        _forget_file(globs)
        raise SystemExit(1) from None
    att.ended("returned", 0)
    _flush_stdio()
    _forget_file(globs)


class _Attestation:
    """What this process ran, and the file it goes to."""

    def __init__(self, out: str, root: str, script: str) -> None:
        self.out = out
        self.pid = os.getpid()
        self.argv = list(sys.argv)  # as started: the script may rewrite sys.argv
        self.lock = _thread.RLock()
        self.root_abs = os.path.abspath(root)
        self.root_real = os.path.realpath(root)
        # A venv or the interpreter inside the run directory (uv makes .venv there) is not
        # the experiment's code.
        self.excluded = tuple({
            form + os.sep
            for prefix in (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix)
            for form in (os.path.abspath(prefix), os.path.realpath(prefix))
            if _inside(form, self.root_abs) is not None or _inside(form, self.root_real) is not None
        })
        self.dirs: dict[str, str | None] = {}
        self.script_arg = script
        self.script_abs = os.path.abspath(script)
        self.main_path = self.relpath(self.script_abs)
        self.source: bytes | None = None
        self.main_sha256 = ""
        self.startup_stat: tuple[int, int, int] | None = None
        self.main_globals: dict | None = None
        self.taken_over = False
        self.target: str | None = None  # the file this process writes, once claimed
        self.modules: dict[str, str] = {}
        self.reloads: dict[str, list[str]] = {}
        self.exit: dict | None = None
        self.started_at = time.time()
        self.warned = False

    # -- where files are ------------------------------------------------------------

    def relpath(self, path: str) -> str | None:
        """`path` relative to the root ('/'-separated), or None when it is not under it."""
        directory, name = os.path.split(path)
        rel = self.dirs.get(directory, _MISSING)
        if rel is _MISSING:
            rel = self.dirs[directory] = self._reldir(directory)
        if rel is None:
            return None
        return f"{rel}/{name}" if rel else name

    def _reldir(self, directory: str) -> str | None:
        # Strings only, no realpath per directory: sys.path entries are absolute, and the
        # script's directory is a real path, hence the two forms of the root.
        absolute = os.path.abspath(directory)
        if (absolute + os.sep).startswith(self.excluded):
            return None
        rel = _inside(absolute, self.root_abs)
        if rel is None:
            rel = _inside(absolute, self.root_real)
        if rel is None or {"site-packages", "dist-packages"} & set(rel.split("/")):
            return None
        return rel

    # -- the run --------------------------------------------------------------------

    def take_over(self, globs: dict) -> None:
        """Make __main__ and sys.path what `python script.py` gives, then write the start."""
        self.taken_over = True
        self.main_globals = globs
        for key in {self.script_abs, self.script_arg}:
            sys.path_importer_cache.pop(key, None)
        globs["__file__"] = self.script_abs
        globs["__cached__"] = None
        globs["__loader__"] = SourceFileLoader("__main__", self.script_abs)
        globs["__package__"] = None
        globs["__spec__"] = None
        # runpy put the script itself first on sys.path; Python puts its directory there
        # (symlinks resolved), or nothing with -P / PYTHONSAFEPATH.
        if sys.path and sys.path[0] in (self.script_abs, self.script_arg):
            if getattr(sys.flags, "safe_path", False):
                del sys.path[0]
            else:
                sys.path[0] = os.path.dirname(os.path.realpath(self.script_abs))
        self.write(final=False)

    def record_module(self, rel: str, data: bytes) -> None:
        digest = sha256(data).hexdigest()
        with self.lock:
            known = self.modules.get(rel)
            if known is None:
                self.modules[rel] = digest
            elif known != digest and digest not in self.reloads.get(rel, []):
                self.reloads.setdefault(rel, []).append(digest)
            else:
                return
            if self.target is not None:
                self.write(final=False)

    def ended(self, how: str, code: int | None, exception: str | None = None) -> None:
        self.exit = {"how": how, "code": code, "exception": exception}

    def finish(self) -> None:
        """atexit: the last word, after the script's own atexit handlers and threads."""
        self.write(final=True)

    def after_fork(self) -> None:
        """A forked child (a DataLoader worker...) writes nothing; a thread of the parent
        may have held the lock at the fork, so the child gets a fresh one."""
        self.lock = _thread.RLock()

    # -- the file -------------------------------------------------------------------

    def document(self, final: bool) -> dict:
        assert self.source is not None
        main = {"path": self.main_path, "sha256": self.main_sha256, "exact": self.taken_over}
        if not self.taken_over:
            # Python ran the file itself (an interpreter we do not know): the hash is of
            # the bytes read at start-up, and we can only say the file did not change.
            main["unchanged_at_exit"] = self._unchanged()
        globs = self.main_globals
        if globs is None:
            globs = getattr(sys.modules.get("__main__"), "__dict__", {})
        return {
            "schema": SCHEMA,
            "complete": final,
            "main": main,
            "modules": dict(sorted(self.modules.items())),
            "reloads": {k: list(v) for k, v in sorted(self.reloads.items())},
            "knobs": knobs(globs) if final else {},
            "python": {
                "version": sys.version,
                "implementation": sys.implementation.name,
                "executable": sys.executable,
                "pid": self.pid,
                "argv": self.argv,
                "orig_argv": list(getattr(sys, "orig_argv", [])),
            },
            "exit": self.exit,
            "started_at": self.started_at,
            "written_at": time.time(),
        }

    def _unchanged(self) -> bool:
        try:
            with open(self.script_abs, "rb") as f:
                same = f.read() == self.source
            return same and _stat_key(self.script_abs) == self.startup_stat
        except OSError:
            return False

    def write(self, final: bool) -> None:
        import json  # here, not at start-up: it costs more than everything else we import

        if os.getpid() != self.pid:  # a forked child: the file is its parent's
            return
        with self.lock:
            try:
                text = json.dumps(self.document(final), indent=1, allow_nan=False)
                if self.target is None:
                    self.target = self._claim()
                tmp = f"{self.target}.tmp.{self.pid}"
                with open(tmp, "w", encoding="utf-8") as f:
                    f.write(text + "\n")
                os.replace(tmp, self.target)
            except Exception as err:  # noqa: BLE001 - never break the experiment's imports
                if not self.warned:
                    self.warned = True
                    _warn(f"cannot write the attestation {self.target or self.out}: {err}")

    def _claim(self) -> str:
        """OVERNIGHT_ATTEST_OUT for the first process of the run, `<stem>.<pid><suffix>`
        next to it for any other (a subprocess or sibling running a script of the run)."""
        directory = os.path.dirname(self.out)
        if directory:
            os.makedirs(directory, exist_ok=True)
        try:
            os.close(os.open(self.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            return self.out
        except FileExistsError:
            stem, suffix = os.path.splitext(self.out)
            return f"{stem}.{self.pid}{suffix}"


def _inside(path: str, root: str) -> str | None:
    """`path` relative to `root` ('' for root itself, '/'-separated), None if outside."""
    if path == root:
        return ""
    if path.startswith(root.rstrip(os.sep) + os.sep):
        return path[len(root.rstrip(os.sep)) + 1:].replace(os.sep, "/")
    return None


def _get_code(self: SourceFileLoader, fullname: str) -> object:
    """SourceFileLoader.get_code for files under the root: compile the bytes we hash, and
    never read or write __pycache__ for them. Any other file: the original method."""
    att = _active
    path = self.get_filename(fullname)
    rel = att.relpath(path) if att is not None else None
    if rel is None:
        return _original_get_code(self, fullname)
    data = self.get_data(path)
    att.record_module(rel, data)
    return self.source_to_code(data, path)


def knobs(globs: dict) -> dict[str, dict]:
    """UPPER_CASE names (and those in OVERNIGHT_ATTEST_KNOBS) bound to a bool, int, float or
    str: {name: {type, value}}. Non-finite floats become "nan", "inf", "-inf"; ints wider
    than 64 bits are left out."""
    found = {}
    named = frozenset(os.environ.get(KNOBS_ENV, "").split(","))
    for name, value in list(globs.items()):
        upper = name[:1] in _UPPER and all(c in _KNOB_CHARS for c in name)
        if not (upper or (type(name) is str and name in named)):
            continue
        if isinstance(value, bool):
            kind, value = "bool", bool(value)
        elif isinstance(value, int):
            kind, value = "int", int(value)
            if value.bit_length() > 64:
                continue
        elif isinstance(value, float):
            kind, value = "float", float(value)
            if not math.isfinite(value):
                value = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        elif isinstance(value, str):
            kind, value = "str", str(value)
        else:
            continue
        found[name] = {"type": kind, "value": value}
    return dict(sorted(found.items()))


# -- exiting like CPython ---------------------------------------------------------------

def _exit_status(code: object) -> int:
    """The process exit status CPython gives SystemExit(code)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF  # what the operating system keeps of exit(code)
    return 1


def _describe(exc: BaseException) -> str:
    name = type(exc).__qualname__
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ is the script's, not ours
        text = "<unprintable>"
    return f"{name}: {text}" if text else name


def _print_uncaught(exc: BaseException) -> None:
    """What CPython does with an exception that ends the script: sys.last_* and
    sys.excepthook, with our frame taken off the traceback so the output is the same."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    exc.__traceback__ = tb
    sys.last_type, sys.last_value, sys.last_traceback = type(exc), exc, tb
    if sys.version_info >= (3, 12):
        sys.last_exc = exc
    try:
        sys.excepthook(type(exc), exc, tb)
    except BaseException as hook_error:  # noqa: BLE001 - CPython reports both, so do we
        sys.stderr.write("Error in sys.excepthook:\n")
        sys.__excepthook__(type(hook_error), hook_error, hook_error.__traceback__)
        sys.stderr.write("\nOriginal exception was:\n")
        sys.__excepthook__(type(exc), exc, tb)


def _flush_stdio() -> None:
    """CPython flushes stdout and stderr when the script returns, ignoring errors."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001, S110 - as CPython: a closed or broken stream
            pass


def _forget_file(globs: dict) -> None:
    """CPython removes __file__ and __cached__ from __main__ once the script returned or
    raised (not on SystemExit): atexit handlers see the same namespace with us."""
    globs.pop("__file__", None)
    globs.pop("__cached__", None)


def _stat_key(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


def _warn(message: str) -> None:
    try:
        sys.stderr.write(f"overnight attestation: {message}\n")
    except Exception:  # noqa: BLE001, S110 - no stderr: nowhere left to say it
        pass
