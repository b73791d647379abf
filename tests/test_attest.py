"""The attestation injected into experiment processes (src/overnight/_attest/).

Real interpreters running real scripts: every CPython 3.9-3.13 found on this machine besides
the one running the tests, since the hook runs inside the user's interpreter, not ours.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from overnight._attest import DIR, OUT_ENV, ROOT_ENV, environ, secondary_outputs

# Variables of the test runner's environment that would change how a child interpreter starts.
_SCRUB = ("PYTHONPATH", "PYTHONSAFEPATH", "PYTHONINSPECT", "PYTHONSTARTUP", "PYTHONHOME",
          "PYTHONDONTWRITEBYTECODE", "PYTHONNOUSERSITE", OUT_ENV, ROOT_ENV)


def _find_pythons() -> dict[tuple[int, ...], str]:
    """sys.executable, and one interpreter per other CPython 3.9-3.13 found here."""
    found = {sys.version_info[:2]: sys.executable}
    candidates = [shutil.which(f"python3.{minor}") for minor in range(9, 14)]
    pyenv = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates += sorted(glob.glob(os.path.join(pyenv, "versions", "3.*", "bin", "python3")))
    for exe in filter(None, candidates):
        try:
            out = subprocess.run([exe, "-c", "import sys; print(*sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode != 0 or not out.stdout.strip():
            continue
        version = tuple(int(x) for x in out.stdout.split())
        if (3, 9) <= version < (3, 14):
            found.setdefault(version, exe)
    return dict(sorted(found.items()))


VERSIONS = _find_pythons()
PYTHONS = [pytest.param(exe, id=f"py{v[0]}.{v[1]}") for v, exe in VERSIONS.items()]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env.update(extra)
    return env


def write(directory: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return directory


def run(workdir: Path, *args: str, python: str = sys.executable, attest: bool = True,
        pythonpath: tuple[Path, ...] = ()) -> subprocess.CompletedProcess:
    """`python args...` in workdir, attested (into workdir/../attest.json by default) or not."""
    env = clean_env()
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(map(str, pythonpath))
    if attest:
        env = environ(attestation_path(workdir), workdir, env)
    return subprocess.run([python, *args], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=60, check=False)


def attestation_path(workdir: Path) -> Path:
    return workdir.parent / "attest.json"


def load(workdir: Path) -> dict:
    return json.loads(attestation_path(workdir).read_text())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- what is recorded ---------------------------------------------------------------------

def test_main_hash_and_runtime_knobs(tmp_path: Path) -> None:
    work = write(tmp_path / "run", {"train.py": """\
        import math
        LR = 0.5
        STEPS = 100
        USE_AMP = True
        DEVICE = "cpu"
        WARMUP = float("inf")
        BAD = math.nan
        SHAPE = (1, 2)          # not a scalar: left out
        lower_case = 3          # not a knob: left out
        _PRIVATE = 4            # not a knob: left out
        HUGE = 10 ** 30         # wider than 64 bits: left out
        LR = LR * 2             # what counts is the value the run used
        print("lr", LR)
        """})
    proc = run(work, "train.py")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "lr 1.0\n"
    att = load(work)
    assert att["complete"] is True
    assert att["main"] == {"path": "train.py", "sha256": sha256(work / "train.py"), "exact": True}
    assert att["knobs"] == {
        "BAD": {"type": "float", "value": "nan"},
        "DEVICE": {"type": "str", "value": "cpu"},
        "LR": {"type": "float", "value": 1.0},
        "STEPS": {"type": "int", "value": 100},
        "USE_AMP": {"type": "bool", "value": True},
        "WARMUP": {"type": "float", "value": "inf"},
    }
    assert att["exit"] == {"how": "returned", "code": 0, "exception": None}
    assert att["python"]["executable"] == sys.executable
    assert att["python"]["argv"] == ["train.py"]
    assert att["python"]["version"] == sys.version


def test_local_modules_are_listed_with_their_hashes_and_nothing_else(tmp_path: Path) -> None:
    work = write(tmp_path / "run", {
        "train.py": """\
            import json, psutil   # stdlib and site-packages: not the experiment's code
            import model
            from pkg import layers
            print(model.WIDTH, layers.DEPTH)
            """,
        "model.py": "WIDTH = 64\n",
        "pkg/__init__.py": "",
        "pkg/layers.py": "from . import init\nDEPTH = init.DEPTH\n",
        "pkg/init.py": "DEPTH = 4\n",
        "data/unused.py": "raise RuntimeError('never imported')\n",
    })
    proc = run(work, "train.py")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "64 4\n"
    att = load(work)
    assert att["modules"] == {name: sha256(work / name) for name in
                              ("model.py", "pkg/__init__.py", "pkg/init.py", "pkg/layers.py")}
    assert att["reloads"] == {}
    assert not (work / "__pycache__").exists()  # nothing cached that could go stale


def test_a_stale_pycache_cannot_stand_in_for_the_source(tmp_path: Path) -> None:
    work = write(tmp_path / "run", {"train.py": "import model\nprint(model.SCALAR_LR)\n",
                                    "model.py": "SCALAR_LR = 0.5\n"})
    assert run(work, "train.py", attest=False).stdout == "0.5\n"  # writes __pycache__
    # A linter rewrites the module: same size, same mtime, so the .pyc still looks valid.
    stat = (work / "model.py").stat()
    (work / "model.py").write_text("SCALAR_LR = 0.3\n")
    os.utime(work / "model.py", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert run(work, "train.py", attest=False).stdout == "0.5\n"  # plain Python: stale code
    proc = run(work, "train.py")
    assert proc.stdout == "0.3\n", proc.stderr
    assert load(work)["modules"] == {"model.py": sha256(work / "model.py")}


def test_a_reload_with_other_bytes_is_recorded(tmp_path: Path) -> None:
    work = write(tmp_path / "run", {"train.py": """\
        import importlib, pathlib
        import model
        pathlib.Path("model.py").write_text("X = 2  # changed\\n")
        importlib.reload(model)
        print(model.X)
        """, "model.py": "X = 1\n"})
    first = sha256(work / "model.py")
    proc = run(work, "train.py")
    assert proc.stdout == "2\n", proc.stderr
    att = load(work)
    assert att["modules"] == {"model.py": first}
    assert att["reloads"] == {"model.py": [sha256(work / "model.py")]}


# -- exactness: the bytes hashed are the bytes that ran -----------------------------------

def test_script_rewritten_during_startup_runs_the_hashed_bytes(tmp_path: Path) -> None:
    """The window a hash-then-run design leaves open: a sitecustomize that runs after ours
    rewrites the script before Python would open it. Plain Python runs the new bytes; with
    the attestation, the bytes it hashed run, and the hash says so."""
    old = 'SCALAR_LR = 0.5\nprint("ran", SCALAR_LR)\n'
    new = 'SCALAR_LR = 0.3\nprint("ran", SCALAR_LR)\n'
    linter = write(tmp_path / "linter", {"sitecustomize.py": f"""\
        import pathlib
        pathlib.Path("train.py").write_text({new!r})
        """})
    work = write(tmp_path / "run", {"train.py": old})
    assert run(work, "train.py", attest=False, pythonpath=(linter,)).stdout == "ran 0.3\n"

    (work / "train.py").write_text(old)
    proc = run(work, "train.py", pythonpath=(linter,))
    assert proc.stdout == "ran 0.5\n", proc.stderr
    assert (work / "train.py").read_text() == new
    att = load(work)
    assert att["main"]["sha256"] == hashlib.sha256(old.encode()).hexdigest()
    assert att["main"]["sha256"] != sha256(work / "train.py")
    assert att["knobs"]["SCALAR_LR"] == {"type": "float", "value": 0.5}


def test_script_rewritten_while_running(tmp_path: Path) -> None:
    work = write(tmp_path / "run", {"train.py": """\
        import sys
        SCALAR_LR = 0.5
        print("started", flush=True)
        sys.stdin.readline()    # the test rewrites this file, then lets us go on
        print("ran", SCALAR_LR)
        """})
    old = sha256(work / "train.py")
    env = environ(attestation_path(work), work, clean_env())
    with subprocess.Popen([sys.executable, "train.py"], cwd=work, env=env, text=True,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE) as proc:
        assert proc.stdout.readline() == "started\n"
        partial = load(work)  # written before the script's first line ran
        assert partial["complete"] is False and partial["main"]["sha256"] == old
        text = (work / "train.py").read_text().replace("0.5", "0.3")
        (work / "train.py").write_text(text)
        out, _ = proc.communicate("go\n", timeout=30)
    assert out == "ran 0.5\n"
    att = load(work)
    assert att["complete"] is True
    assert att["main"]["sha256"] == old != sha256(work / "train.py")


@pytest.mark.parametrize("rewrite", [False, True], ids=["unchanged", "rewritten"])
def test_when_python_runs_the_file_itself_the_attestation_says_so(
        tmp_path: Path, rewrite: bool) -> None:
    """An interpreter that does not ask for an importer of the script (none known today;
    simulated here by a sitecustomize that drops ours) runs the file itself: the hash is of
    the bytes read at start-up, marked inexact, with whether the file changed by the end."""
    old, new = "LR = 0.5\nprint(LR)\n", "LR = 0.3\nprint(LR)\n"
    other = write(tmp_path / "other", {"sitecustomize.py": f"""\
        import pathlib, sys
        for key in [k for k in sys.path_importer_cache if k.endswith("train.py")]:
            del sys.path_importer_cache[key]
        if {rewrite!r}:
            pathlib.Path("train.py").write_text({new!r})
        """})
    work = write(tmp_path / "run", {"train.py": old})
    proc = run(work, "train.py", pythonpath=(other,))
    assert proc.stdout == ("0.3\n" if rewrite else "0.5\n"), proc.stderr
    att = load(work)
    assert att["main"] == {"path": "train.py", "sha256": hashlib.sha256(old.encode()).hexdigest(),
                           "exact": False, "unchanged_at_exit": not rewrite}
    assert att["knobs"] == {"LR": {"type": "float", "value": 0.3 if rewrite else 0.5}}
    assert att["complete"] is True and att["exit"] is None


def test_sigterm_leaves_the_partial_attestation(tmp_path: Path) -> None:
    work = write(tmp_path / "run", {"train.py": """\
        import sys
        import model
        print("started", flush=True)
        sys.stdin.readline()
        """, "model.py": "X = 1\n"})
    env = environ(attestation_path(work), work, clean_env())
    with subprocess.Popen([sys.executable, "train.py"], cwd=work, env=env, text=True,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE) as proc:
        assert proc.stdout.readline() == "started\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == -signal.SIGTERM
    att = load(work)
    assert att["complete"] is False and att["exit"] is None
    assert att["main"]["sha256"] == sha256(work / "train.py")
    assert att["modules"] == {"model.py": sha256(work / "model.py")}


# -- the script cannot tell: same output, same exit, same namespace -------------------------

INTROSPECT = """\
    import atexit, os, sys, threading, time
    import helper
    from pkg import sub
    print(__name__, __file__, __spec__, __package__, __cached__, __doc__)
    print(type(__loader__).__name__, __loader__.name, __loader__.path)
    print(sorted(k for k in globals() if k.startswith("__")))
    print(sys.argv, sys.path[0], os.getcwd())
    print(helper.__name__, helper.__file__, sub.VALUE, __debug__)
    atexit.register(lambda: print("atexit", "__file__" in globals(), LR, flush=True))
    def late():
        time.sleep(0.2)
        print("thread joined before exit", flush=True)
    threading.Thread(target=late).start()
    LR = 0.1
    if __name__ == "__main__":
        print("main block")
    sys.stdout.write("no newline at the end")
"""

SCRIPTS = {
    "introspect": (INTROSPECT, 0),
    "sys_exit_3": ("import atexit, sys\n"
                   "atexit.register(lambda: print('atexit', '__file__' in globals()))\n"
                   "print('before')\nsys.exit(3)\n", 3),
    "sys_exit_message": ("import sys\nsys.exit('fatal: no data')\n", 1),
    "uncaught": ("""\
        import atexit
        atexit.register(lambda: print("atexit", "__file__" in globals()))
        def load(path):
            try:
                return open(path).read()
            except OSError as err:
                raise ValueError(f"cannot load {path}") from err
        print("loading")
        load("/nonexistent/data.bin")
        """, 1),
    # (Python 3.9 words an error at the very end of the file differently when compiling a
    # string than when reading a file: "unexpected EOF" at line 3 vs line 2.)
    "syntax_error": ("print('hi')\nx = = 1\nprint('never')\n", 1),
    "excepthook": ("""\
        import sys
        def hook(kind, value, tb):
            print("custom hook:", kind.__name__, value, tb.tb_frame.f_code.co_name)
        sys.excepthook = hook
        raise RuntimeError("boom")
        """, 1),
    "unicode_and_cookie": ("# -*- coding: latin-1 -*-\nprint('caf\xe9')\n", 0),
}

HELPERS = {
    "helper.py": "print('helper imported as', __name__)\n",
    "pkg/__init__.py": "",
    "pkg/sub.py": "from . import leaf\nVALUE = leaf.VALUE\n",
    "pkg/leaf.py": "VALUE = 'leaf'\n",
}


def _scenario(tmp_path: Path, name: str) -> Path:
    text, _ = SCRIPTS[name]
    work = write(tmp_path / "run", HELPERS)
    if name == "unicode_and_cookie":
        (work / "train.py").write_bytes(text.encode("latin-1"))
    else:
        write(work, {"train.py": text})
    return work


@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_the_script_sees_no_difference(tmp_path: Path, python: str, name: str) -> None:
    work = _scenario(tmp_path, name)
    plain = run(work, "train.py", "--lr", "0.1", python=python, attest=False)
    shutil.rmtree(work / "__pycache__", ignore_errors=True)
    shutil.rmtree(work / "pkg" / "__pycache__", ignore_errors=True)
    attested = run(work, "train.py", "--lr", "0.1", python=python)
    assert (attested.returncode, attested.stdout, attested.stderr) == \
        (plain.returncode, plain.stdout, plain.stderr)
    assert plain.returncode == SCRIPTS[name][1], plain.stderr
    att = load(work)
    assert att["complete"] is True
    assert att["main"]["sha256"] == sha256(work / "train.py")
    assert att["exit"]["code"] == plain.returncode


@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("flags", [("-u",), ("-O",), ("-B", "-X", "dev"), ("-W", "error"),
                                   ("-P",)], ids=lambda f: "".join(f))
def test_interpreter_options_are_respected(tmp_path: Path, python: str,
                                           flags: tuple[str, ...]) -> None:
    if flags == ("-P",) and next(v for v, exe in VERSIONS.items() if exe == python) < (3, 11):
        pytest.skip("-P is Python 3.11+")
    work = _scenario(tmp_path, "introspect")
    write(work, {"train.py": """\
        import sys
        print(sys.flags.optimize, [p for p in sys.path if not p.endswith("_attest")][:2])
        assert False, "asserts are on"
        """})
    plain = run(work, *flags, "train.py", python=python, attest=False)
    attested = run(work, *flags, "train.py", python=python)
    assert (attested.returncode, attested.stdout, attested.stderr) == \
        (plain.returncode, plain.stdout, plain.stderr)
    assert load(work)["main"]["exact"] is True


def test_keyboard_interrupt_still_ends_the_process_by_sigint(tmp_path: Path) -> None:
    work = write(tmp_path / "run", {"train.py": "print('x')\nraise KeyboardInterrupt\n"})
    plain = run(work, "train.py", attest=False)
    attested = run(work, "train.py")
    assert plain.returncode == attested.returncode == -signal.SIGINT
    assert attested.stderr.endswith('line 2, in <module>\n    raise KeyboardInterrupt\n'
                                    'KeyboardInterrupt\n')
    assert load(work)["exit"] == {"how": "interrupt", "code": None,
                                  "exception": "KeyboardInterrupt"}


def test_multiprocessing_spawn_children_find_the_main_module(tmp_path: Path) -> None:
    work = write(tmp_path / "run", {"train.py": """\
        import multiprocessing as mp
        import model

        def square(x):
            return model.SCALE * x * x

        if __name__ == "__main__":
            with mp.get_context("spawn").Pool(2) as pool:
                print(sum(pool.map(square, range(10))))
        """, "model.py": "SCALE = 2\n"})
    proc = run(work, "train.py")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "570\n"
    att = load(work)
    assert att["complete"] is True and att["modules"] == {"model.py": sha256(work / "model.py")}
    assert secondary_outputs(attestation_path(work)) == []  # the children wrote nothing


def test_a_subprocess_running_another_script_writes_its_own_file(tmp_path: Path) -> None:
    work = write(tmp_path / "run", {
        "train.py": """\
            import subprocess, sys
            print("eval said", subprocess.run([sys.executable, "eval.py"], check=True,
                                              capture_output=True, text=True).stdout.strip())
            """,
        "eval.py": "EVAL_BATCH = 8\nprint('ok')\n",
    })
    proc = run(work, "train.py")
    assert proc.stdout == "eval said ok\n", proc.stderr
    assert load(work)["main"]["path"] == "train.py"
    (other,) = secondary_outputs(attestation_path(work))
    child = json.loads(other.read_text())
    assert child["main"] == {"path": "eval.py", "sha256": sha256(work / "eval.py"),
                             "exact": True}
    assert child["knobs"] == {"EVAL_BATCH": {"type": "int", "value": 8}}


# -- where it does nothing ----------------------------------------------------------------

def test_without_the_variable_nothing_is_written_and_nothing_changes(tmp_path: Path) -> None:
    work = write(tmp_path / "run", {"train.py": """\
        import importlib.machinery
        import model
        print(importlib.machinery.SourceFileLoader.get_code.__module__, model.X)
        """, "model.py": "X = 1\n"})
    plain = run(work, "train.py", attest=False)
    hooked = run(work, "train.py", attest=False, pythonpath=(DIR,))
    assert hooked.returncode == 0, hooked.stderr
    assert (hooked.stdout, hooked.stderr) == (plain.stdout, plain.stderr)
    assert plain.stdout.endswith("importlib_external 1\n")  # importlib's own loader
    assert (work / "__pycache__").exists()  # bytecode caching as usual
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("args", [
    ("-c", "import model; print(model.X)"),
    ("-m", "model"),
    ("-i", "model.py"),
    ("outside/train.py",),
], ids=["-c", "-m", "-i", "script-outside-root"])
def test_only_scripts_under_the_root_are_attested(tmp_path: Path, args: tuple[str, ...]) -> None:
    work = write(tmp_path / "run", {"model.py": "X = 1\nprint(X)\n"})
    write(tmp_path, {"outside/train.py": "import sys\nsys.path.insert(0, 'run')\n"
                                         "import model\n"})
    cwd = tmp_path if args[0].startswith("outside") else work
    env = environ(attestation_path(work), work, clean_env())
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60, check=False, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert "1" in proc.stdout
    assert not attestation_path(work).exists()


# -- chaining to the sitecustomize we hide ------------------------------------------------

@pytest.mark.parametrize("attest", [True, False], ids=["attested", "plain"])
def test_the_hidden_sitecustomize_still_runs(tmp_path: Path, attest: bool) -> None:
    theirs = write(tmp_path / "distro", {"sitecustomize.py": """\
        import os
        os.environ["DISTRO_HOOK"] = "ran"
        print("distro sitecustomize", flush=True)
        def helper():
            return "theirs"
        """})
    work = write(tmp_path / "run", {"train.py": """\
        import os, sitecustomize
        print(os.environ.get("DISTRO_HOOK"), sitecustomize.helper(), sitecustomize.__file__)
        """})
    # the harness puts our directory first: PYTHONPATH=<ours>:<theirs>
    pythonpath = (theirs,) if attest else (DIR, theirs)
    env = clean_env(PYTHONPATH=os.pathsep.join(map(str, pythonpath)))
    if attest:
        env = environ(attestation_path(work), work, env)
    proc = subprocess.run([sys.executable, "train.py"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ("distro sitecustomize\n"
                           f"ran theirs {theirs / 'sitecustomize.py'}\n")
    assert attestation_path(work).exists() == attest


def test_an_error_in_the_hidden_sitecustomize_is_reported_as_python_would(
        tmp_path: Path) -> None:
    theirs = write(tmp_path / "distro", {"sitecustomize.py": "raise RuntimeError('broken')\n"})
    work = write(tmp_path / "run", {"train.py": "print('ran')\n"})
    plain = run(work, "train.py", attest=False, pythonpath=(theirs,))
    attested = run(work, "train.py", pythonpath=(theirs,))
    assert "Error in sitecustomize" in plain.stderr
    assert (attested.stdout, attested.stderr) == (plain.stdout, plain.stderr)
    assert load(work)["complete"] is True


# -- uv -----------------------------------------------------------------------------------

UV = shutil.which("uv") or shutil.which("uv", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(UV is None, reason="uv is not installed")
def test_uv_run(tmp_path: Path) -> None:
    uv = str(UV)
    work = write(tmp_path / "run", {
        "pyproject.toml": """\
            [project]
            name = "experiment"
            version = "0.0.0"
            requires-python = ">=3.9"
            dependencies = []
            """,
        "train.py": "import model\nLR = 0.5\nprint('lr', LR * model.SCALE)\n",
        "model.py": "SCALE = 2\n",
    })
    env = environ(attestation_path(work), work, clean_env(
        UV_OFFLINE="1", UV_NO_CONFIG="1", UV_PYTHON=sys.executable,
        UV_PYTHON_DOWNLOADS="never", UV_CACHE_DIR=str(tmp_path / "uv-cache")))
    proc = subprocess.run([uv, "run", "train.py"], cwd=work, env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "lr 1.0\n"
    att = load(work)
    assert att["main"] == {"path": "train.py", "sha256": sha256(work / "train.py"),
                           "exact": True}
    assert att["modules"] == {"model.py": sha256(work / "model.py")}  # not .venv's files
    assert Path(att["python"]["executable"]).parent.parent == work / ".venv"
    assert att["knobs"] == {"LR": {"type": "float", "value": 0.5}}
