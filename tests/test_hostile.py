"""Hostile experiments against the default configuration: every door an agent-written
script could try. Each attack must be impossible (nothing changed) or caught, and never
silently change a recorded result.

Every test runs twice: with the harness as root (CI, most GPU containers) and as an
unprivileged user (`setpriv` to nobody, the harness on the system Python with this
checkout's packages), each against the real `overnight` CLI and real bubblewrap.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sysconfig
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from conftest import GIT_ENV

import overnight

SYSTEM_PYTHON = "/usr/bin/python3"  # readable by every user, unlike a venv under /root
NOBODY = 65534
SRC = str(Path(overnight.__file__).resolve().parents[1])
SITE = sysconfig.get_paths()["purelib"]
TAG = "t"


@dataclass
class Harness:
    """`overnight` run by `user` ("root" or "nobody") on repositories it owns, with the
    default sandbox or a forced one ("user": one unprivileged uid per slot)."""

    user: str
    base: Path
    sandbox: str = ""

    def repo(self, train: str, run_extra: str = "", files: dict[str, str] | None = None,
             extra: str = "", budget: float = 5, timeout: float = 20,
             protected: tuple[str, ...] = ()) -> Path:
        root = Path(tempfile.mkdtemp(dir=self.base))
        spec = textwrap.dedent(f"""\
            [objective]
            metric = "val_loss"
            direction = "lower"

            [run]
            command = "{SYSTEM_PYTHON} train.py"
            budget_seconds = {budget}
            timeout_seconds = {timeout}
            kill_grace_seconds = 1
            """) + (f'sandbox = "{self.sandbox}"\n' if self.sandbox and "sandbox =" not in
                    run_extra else "") + run_extra \
            + textwrap.dedent(f"""
            [files]
            editable = ["train.py"]
            protected = {json.dumps(list(protected))}

            [judge]
            mode = "greedy"

            [search]
            strategy = "grid"
            """) + extra
        for path, text in {"train.py": train, "overnight.toml": spec, **(files or {})}.items():
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_text(text)
        for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "i"]):
            subprocess.run(["git", *args], cwd=root, check=True, env={**os.environ, **GIT_ENV})
        self.own(root)
        return root

    def own(self, path: Path) -> None:
        if self.user == "nobody":
            subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(path)], check=True)

    def env(self, **extra: str) -> dict[str, str]:
        home = self.base / f"home-{self.user}"
        return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8",
                "GIT_CEILING_DIRECTORIES": str(self.base), **GIT_ENV,
                "PYTHONPATH": f"{SRC}:{SITE}", **extra}

    def argv(self, *args: str) -> list[str]:
        cli = [SYSTEM_PYTHON, "-m", "overnight.cli", *args]
        if self.user == "root":
            return cli
        return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cli]

    def start(self, repo: Path, *args: str, **env: str) -> subprocess.Popen:
        return subprocess.Popen(self.argv(*args), cwd=repo, env=self.env(**env),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)

    def run(self, repo: Path, *args: str, timeout: float = 120,
            **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(*args), cwd=repo, env=self.env(**env), timeout=timeout,
                              capture_output=True, text=True, check=False)


def make_harness(param: str) -> Harness:
    if not Path(SYSTEM_PYTHON).exists():
        pytest.fail(f"{SYSTEM_PYTHON} is needed to run the harness as an unprivileged user")
    base = Path(tempfile.mkdtemp(prefix="overnight-hostile-"))
    base.chmod(0o755)
    user, _, mode = param.partition(", sandbox ")
    h = Harness(user, base, mode)
    home = base / f"home-{h.user}"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("PRIVATE KEY of the harness's user\n")
    (home / ".netrc").write_text("machine example.com login me password hunter2\n")
    h.own(home)
    return h


@pytest.fixture(params=["root", "nobody", "root, sandbox user"])
def harness(request: pytest.FixtureRequest):
    """The harness as root and as nobody, boxed by bubblewrap (the default here); and as root
    with sandbox = "user", what a container that forbids namespaces gets."""
    h = make_harness(request.param)
    yield h
    shutil.rmtree(h.base, ignore_errors=True)


@pytest.fixture(params=["root", "nobody"])
def default_harness(request: pytest.FixtureRequest):
    """The harness as root and as nobody, with the default sandbox (`auto`)."""
    h = make_harness(request.param)
    yield h
    shutil.rmtree(h.base, ignore_errors=True)


def ledger_rows(repo: Path) -> list[dict]:
    db = sqlite3.connect(repo / ".overnight" / "ledger.sqlite")
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute("SELECT * FROM experiments ORDER BY id")]
    finally:
        db.close()


def log_of(row: dict) -> str:
    return Path(row["log_path"]).read_text()


def git_out(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "safe.directory=*", *args], cwd=repo, capture_output=True,
                          text=True,
                          check=True).stdout.strip()


# -- the truth: ledger, branch, hooks, spec, other runs, secrets ---------------------------------

REACH_FOR_THE_TRUTH = """\
import glob, os, sqlite3
run_dir = os.environ["OVERNIGHT_RUN_DIR"]
repo = run_dir.split("/.overnight/")[0]
LEARNING_RATE = 0.001

def attempt(what, fn):
    try:
        fn()
        print("DONE", what)
    except Exception as e:
        print("FAILED", what, type(e).__name__)

def rewrite_ledger():
    db = sqlite3.connect(os.path.join(repo, ".overnight", "ledger.sqlite"))
    db.execute("UPDATE experiments SET metric = 50")
    db.commit()

def write(path, text, mode="w"):
    def go():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, mode) as f:
            f.write(text)
    return go

attempt("ledger", rewrite_ledger)
attempt("hook", write(os.path.join(repo, ".git", "hooks", "reference-transaction"),
                      "#!/bin/sh\\nenv > /tmp/stolen\\n"))
attempt("branch", write(os.path.join(repo, ".git", "refs", "heads", "overnight", "t"),
                        "0" * 40 + "\\n"))
attempt("spec", write(os.path.join(repo, "overnight.toml"), "[run]\\ncommand = 'evil'\\n", "a"))
attempt("other log", write(os.path.join(os.path.dirname(run_dir), "1", "run.log"),
                           "val_loss: 0.0001\\n", "a"))
for secret in ("~/.ssh/id_ed25519", "~/.netrc"):
    try:
        print("READ", secret, open(os.path.expanduser(secret)).read().strip())
    except OSError as e:
        print("FAILED", secret, type(e).__name__)
for name in ("OPENAI_API_KEY", "API_KEY", "GITHUB_PAT", "DATABASE_URL"):
    print("ENV", name, os.environ.get(name, "absent"))
stolen = []
for env in glob.glob("/proc/[0-9]*/environ"):
    try:
        if b"sk-harness" in open(env, "rb").read():
            stolen.append(env)
    except OSError:
        pass
print("PROC", "stolen" if stolen else "clean", len(glob.glob("/proc/[0-9]*")))
loss = 1.0 + abs(LEARNING_RATE - 0.004) * 100
print(f"val_loss: {loss:.6f}")
"""


def test_the_truth_is_out_of_reach(harness: Harness):
    repo = harness.repo(REACH_FOR_THE_TRUTH)
    spec_before = (repo / "overnight.toml").read_bytes()
    out = harness.run(repo, "run", "-t", TAG, "-n", "3",
                      OPENAI_API_KEY="sk-harness-1", API_KEY="sk-harness-2",
                      GITHUB_PAT="sk-harness-3", DATABASE_URL="postgres://u:sk-harness@db/x")
    assert out.returncode == 0, out.stdout + out.stderr
    rows = ledger_rows(repo)
    assert sorted(r["status"] for r in rows) == ["discard", "keep", "keep"]
    for r in rows:  # exactly what each run printed for its own learning rate
        lr = json.loads(r["knobs"])["LEARNING_RATE"]
        assert r["metric"] == pytest.approx(1.0 + abs(lr - 0.004) * 100, abs=1e-6)
    log = log_of(rows[1])
    for what in ("ledger", "hook", "branch", "spec", "other log"):
        # Either refused, or written into the box's private scratch space: not the truth.
        assert f"FAILED {what}" in log or f"DONE {what}" in log, log
    assert "READ" not in log
    assert "PROC clean" in log
    for name in ("OPENAI_API_KEY", "API_KEY", "GITHUB_PAT", "DATABASE_URL"):
        assert f"ENV {name} absent" in log
    # Nothing outside the box changed.
    assert (repo / "overnight.toml").read_bytes() == spec_before
    assert not (repo / ".git" / "hooks" / "reference-transaction").exists()
    assert "val_loss: 0.0001" not in log_of(rows[0])
    keeps = [r["kept_commit"] for r in rows if r["status"] == "keep"]
    assert git_out(repo, "rev-parse", f"overnight/{TAG}") == keeps[-1]
    assert not Path("/tmp/stolen").exists()


SANDBOX_FROM_INSIDE = """\
import os, socket, subprocess
LEARNING_RATE = 0.001
status = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
print("CAPS", status["CapEff"].strip(), status["CapBnd"].strip())
r = subprocess.run(["mount", "-o", "remount,rw", "/"], capture_output=True)
print("MOUNT", "ok" if r.returncode == 0 else "refused")
try:
    os.open("/proc/1/ns/mnt", os.O_RDONLY)
    target = os.readlink("/proc/1/exe")
except OSError as e:
    target = type(e).__name__
print("PID1", target)
print("PIDS", sorted(int(p) for p in os.listdir("/proc") if p.isdigit()))
try:
    socket.create_connection(("127.0.0.1", int(os.environ["PROBE_PORT"])), timeout=3).close()
    print("NET reached")
except OSError as e:
    print("NET blocked", type(e).__name__)
# /dev/shm is shared by the runs of sandbox "user" (each its own uid): a name of its own.
SHM = f"/dev/shm/probe-{os.getpid()}"
for path in ("/tmp/probe", SHM, "probe.txt",
             os.path.join(os.environ["OVERNIGHT_ARTIFACTS"], "probe.txt"), "/usr/probe",
             "/etc/probe", os.path.expanduser("~/probe"), "/var/tmp/probe"):
    try:
        open(path, "w").write("x")
        print("WRITE ok", path)
    except OSError as e:
        print("WRITE refused", path, type(e).__name__)
if os.path.exists(SHM):
    os.unlink(SHM)
print(f"val_loss: {1.0 + abs(LEARNING_RATE - 0.004) * 100:.6f}")
"""


def test_the_box_seen_from_inside(harness: Harness):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.5)
    repo = harness.repo(SANDBOX_FROM_INSIDE, 'allow_env = ["PROBE_PORT"]\n')
    try:
        out = harness.run(repo, "run", "-t", TAG, "-n", "1",
                          PROBE_PORT=str(server.getsockname()[1]))
        if harness.sandbox != "user":  # without namespaces there is no network of its own
            with pytest.raises(TimeoutError):
                server.accept()  # nobody connected
    finally:
        server.close()
    assert out.returncode == 0, out.stdout + out.stderr
    log = log_of(ledger_rows(repo)[0])
    assert "CAPS 0000000000000000 " in log, log
    assert "MOUNT refused" in log
    assert "WRITE ok probe.txt" in log and "WRITE ok /dev/shm/probe" in log
    for refused in ("/usr/probe", "/etc/probe", "/var/tmp/probe"):
        assert f"WRITE refused {refused}" in log, log
    if harness.sandbox == "user":  # no namespaces: Landlock and a uid of its own
        assert "PID1 PermissionError" in log  # other processes are there, but not its to read
        assert "WRITE refused /tmp/probe" in log  # its $TMPDIR is its own, /tmp is not
        return
    assert "CAPS 0000000000000000 0000000000000000" in log, log
    pids = eval(log.split("PIDS ")[1].splitlines()[0])  # its own pid namespace: a handful
    assert len(pids) < 10 and 1 in pids
    assert "NET blocked" in log
    assert "WRITE ok /tmp/probe" in log
    assert not Path("/var/tmp/probe").exists() and not Path("/tmp/probe").exists()
    assert not (harness.base / f"home-{harness.user}" / "probe").exists()


# -- processes: daemons, the harness, the deadline ------------------------------------------------

DAEMON = """\
import os, sys, time
LEARNING_RATE = 0.001
marker = "overnight-hostile-daemon-" + os.environ["MARK"]
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execve("/bin/sleep", [marker, "300"], {})  # named for the test to find
    os._exit(0)
time.sleep(float(os.environ.get("HOLD", "0")))
print(f"val_loss: {1.0 + abs(LEARNING_RATE - 0.004) * 100:.6f}")
"""


def daemons(mark: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if any(f"overnight-hostile-daemon-{mark}" in a for a in p.info["cmdline"] or []):
            found.append(p)
    return found


def test_a_daemon_with_a_cleared_environment_dies_with_its_run(harness: Harness):
    mark = f"{harness.user}-{os.getpid()}-{time.monotonic_ns()}"
    repo = harness.repo(DAEMON, 'allow_env = ["MARK", "HOLD"]\n')
    seen = []
    proc = harness.start(repo, "run", "-t", TAG, "-n", "2", MARK=mark, HOLD="2")
    while proc.poll() is None:
        seen = seen or daemons(mark)
        time.sleep(0.05)
    assert proc.returncode == 0, proc.stdout.read() if proc.stdout else ""
    assert seen, "the daemon never started: the test would prove nothing"
    assert daemons(mark) == []


def test_kill_9_of_the_harness_takes_its_runs_with_it(harness: Harness):
    mark = f"k9-{harness.user}-{os.getpid()}-{time.monotonic_ns()}"
    repo = harness.repo(DAEMON, 'allow_env = ["MARK", "HOLD"]\n')
    proc = harness.start(repo, "run", "-t", TAG, "-n", "2", MARK=mark, HOLD="60")
    try:
        deadline = time.monotonic() + 30
        while not daemons(mark) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert daemons(mark), "the workload never started"
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()
    deadline = time.monotonic() + 10
    while daemons(mark) and time.monotonic() < deadline:
        time.sleep(0.1)
    if harness.sandbox != "user":
        assert daemons(mark) == []  # died with the harness, not left for a resume to find
    out = harness.run(repo, "run", "-t", TAG, "-n", "1", MARK=mark)
    assert out.returncode == 0, out.stdout + out.stderr
    assert [r["status"] for r in ledger_rows(repo)] == ["lost", "keep"]
    assert daemons(mark) == []  # sandbox "user": killed by its slot's uid on resume


STOP_THE_HARNESS = """\
import os, signal, subprocess, time
LEARNING_RATE = 0.001
# The harness is the parent of our /bin/sh: freeze it, and thaw it after the deadline.
sh = os.getppid()
harness = int(open(f"/proc/{sh}/stat").read().rsplit(")", 1)[1].split()[1])
subprocess.Popen(["/bin/sh", "-c", f"sleep 4; kill -CONT {harness}"], start_new_session=True)
try:
    os.kill(harness, signal.SIGSTOP)
    print("stopped the harness", harness)
except OSError as e:
    print("could not stop the harness", type(e).__name__)
time.sleep(3)
print(f"val_loss: {1.0 + abs(LEARNING_RATE - 0.004) * 100:.6f}")
"""


def test_a_frozen_harness_does_not_stretch_the_deadline(harness: Harness):
    """Boxed, the harness is not even in the experiment's world. Unboxed (an explicit
    opt-out), it can be frozen, and the run past its timeout is still a timeout."""
    repo = harness.repo(STOP_THE_HARNESS)
    out = harness.run(repo, "run", "-t", TAG, "-n", "1")
    assert out.returncode == 0, out.stdout + out.stderr
    log = log_of(ledger_rows(repo)[0])
    # Its shell's parent is the box's own pid 1: the harness is not in its world at all.
    assert "stopped the harness 1\n" in log or "could not stop the harness" in log, log

    unboxed = harness.repo(STOP_THE_HARNESS.replace("time.sleep(3)", "time.sleep(0.5)"),
                           'sandbox = "none"\n', budget=1, timeout=2)
    out = harness.run(unboxed, "run", "-t", TAG, "-n", "1")
    row = ledger_rows(unboxed)[0]
    assert "stopped the harness" in log_of(row), log_of(row)
    assert row["status"] == "timeout", (row["status"], row["reason"], out.stderr)
    assert out.returncode == 2  # the baseline did not produce a result


# -- files the harness reads ----------------------------------------------------------------------

SPECIAL_METRICS_FILE = """\
import os, sys
LEARNING_RATE = 0.001
kind = os.environ["KIND"]
if kind == "fifo":
    os.mkfifo("results.json")
elif kind == "sparse":
    with open("results.json", "wb") as f:
        f.truncate(1 << 30)
elif kind == "symlink":
    os.symlink("/etc/passwd", "results.json")
elif kind == "flood":
    print(f"val_loss: {1.0 + abs(LEARNING_RATE - 0.004) * 100:.6f}", flush=True)
    sys.stdout.write(("x" * 1023 + "\\n") * 3000)
    open("results.json", "w").write("{}")
"""


@pytest.mark.parametrize("kind", ["fifo", "sparse", "symlink", "flood"])
def test_files_the_harness_reads_cannot_hang_or_bloat_it(harness: Harness, kind: str):
    repo = harness.repo(SPECIAL_METRICS_FILE, 'metrics_file = "results.json"\n'
                        'allow_env = ["KIND"]\n')
    t0 = time.monotonic()
    out = harness.run(repo, "run", "-t", TAG, "-n", "1", timeout=60, KIND=kind)
    assert time.monotonic() - t0 < 30
    row = ledger_rows(repo)[0]
    if kind == "flood":  # a metric line followed by 3 MB of output is still found
        assert out.returncode == 0, out.stdout + out.stderr
        assert row["status"] == "keep" and row["metric"] == pytest.approx(1.3)
    else:
        assert out.returncode == 2, out.stdout + out.stderr  # the baseline has no number
        assert row["status"] == "crash"
        assert "results.json" in row["reason"], row["reason"]
    assert "Traceback" not in out.stdout + out.stderr


EVALUATED = """\
import os
LEARNING_RATE = 0.001
run_dir = os.environ["OVERNIGHT_RUN_DIR"]
fake = "import sys\\nprint('val_loss: 0.0001')\\nsys.exit(0)\\n"
for where in (os.path.join(run_dir, "eval"), "eval", os.environ["OVERNIGHT_ARTIFACTS"], "."):
    try:
        os.makedirs(where, exist_ok=True)
        open(os.path.join(where, "json.py"), "w").write(fake)
    except OSError:
        pass
with open(os.path.join(os.environ["OVERNIGHT_ARTIFACTS"], "model.txt"), "w") as f:
    f.write(str(LEARNING_RATE))
print("val_loss: 0.0001")  # the script's own claim, set aside
"""

EVALUATOR = """\
import json, os
lr = float(open(os.path.join(os.environ["OVERNIGHT_ARTIFACTS"], "model.txt")).read())
print(json.dumps({"lr": lr}))
print(f"val_loss: {1.0 + abs(lr - 0.004) * 100:.6f}")
"""


def test_the_evaluator_runs_where_the_experiment_never_could_write(harness: Harness):
    repo = harness.repo(EVALUATED, "", {"eval.py": EVALUATOR}, protected=("eval.py",),
                        extra=f'\n[evaluate]\ncommand = "{SYSTEM_PYTHON} eval.py"\n')
    out = harness.run(repo, "run", "-t", TAG, "-n", "2")
    assert out.returncode == 0, out.stdout + out.stderr
    for r in ledger_rows(repo):  # the evaluator's numbers, not the script's 0.0001
        lr = json.loads(r["knobs"])["LEARNING_RATE"]
        assert r["metric"] == pytest.approx(1.0 + abs(lr - 0.004) * 100, abs=1e-6)


TOUCH_COMMITTED = """\
import os
LEARNING_RATE = 0.001
for what, fn in (("write", lambda: open("data.txt", "a").write("poison")),
                 ("replace", lambda: (open("tmp.txt", "w").write("poison"),
                                      os.replace("tmp.txt", "data.txt"))),
                 ("delete", lambda: os.unlink("data.txt")),
                 ("chmod", lambda: os.chmod("data.txt", 0o777)),
                 ("own source", lambda: open("train.py", "a").write("# changed")),
                 ("rename dir", lambda: os.rename("lib", "lib2"))):
    try:
        fn()
        print("DONE", what)
    except OSError as e:
        print("REFUSED", what, type(e).__name__)
print(f"val_loss: {1.0 + abs(LEARNING_RATE - 0.004) * 100:.6f}")
"""


def test_committed_files_cannot_change_in_the_box(harness: Harness):
    """Prevention, not detection: a swap-read-restore of a data file cannot even start."""
    repo = harness.repo(TOUCH_COMMITTED, "", {"data.txt": "clean\n", "lib/x.py": "X = 1\n"})
    out = harness.run(repo, "run", "-t", TAG, "-n", "1")
    assert out.returncode == 0, out.stdout + out.stderr
    row = ledger_rows(repo)[0]
    log = log_of(row)
    for what in ("write", "replace", "delete", "chmod", "own source", "rename dir"):
        assert f"REFUSED {what}" in log, log
    assert row["status"] == "keep" and not row["reason"].startswith("tampered")


# -- devices and limits ---------------------------------------------------------------------------

USE_DEVICE = """\
import os
LEARNING_RATE = 0.001
dev = os.environ["DEVICE"]
with open(dev, "wb") as f:  # a character device standing in for /dev/nvidia0
    f.write(b"kernel launch")
print("DEVICE ok", os.path.exists(dev))
print(f"val_loss: {1.0 + abs(LEARNING_RATE - 0.004) * 100:.6f}")
"""


def test_gpu_device_nodes_are_bound_through(harness: Harness):
    dev_dir = Path(tempfile.mkdtemp(dir=harness.base))
    dev_dir.chmod(0o755)
    node = dev_dir / "nvidia0"
    os.mknod(node, 0o666 | 0o020000, os.makedev(1, 3))  # char device 1:3, as /dev/null
    node.chmod(0o666)
    repo = harness.repo(USE_DEVICE, f'devices = ["{node}"]\nallow_env = ["DEVICE"]\n')
    out = harness.run(repo, "run", "-t", TAG, "-n", "1", DEVICE=str(node))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "DEVICE ok True" in log_of(ledger_rows(repo)[0])


FILL_TMP = """\
import os
LEARNING_RATE = 0.001
try:
    with open("/tmp/big", "wb") as f:
        for _ in range(64):
            f.write(b"x" * (1 << 20))
    print("TMP unbounded")
except OSError as e:
    print("TMP full", e.errno)
print(f"val_loss: {1.0 + abs(LEARNING_RATE - 0.004) * 100:.6f}")
"""


def test_the_private_tmp_has_a_size(harness: Harness):
    repo = harness.repo(FILL_TMP, "tmp_size_mb = 8\n")
    out = harness.run(repo, "run", "-t", TAG, "-n", "1")
    assert out.returncode == 0, out.stdout + out.stderr
    log = log_of(ledger_rows(repo)[0])
    if harness.sandbox == "user":  # no private /tmp without namespaces: it has $TMPDIR
        assert "TMP full 13" in log, log  # EACCES: /tmp is not among its paths
    else:
        assert "TMP full 28" in log, log  # ENOSPC in the box, not on the harness's disk


FORK_BOMB = """\
import os, time
LEARNING_RATE = 0.001
children = []
try:
    for _ in range(400):
        pid = os.fork()
        if pid == 0:
            time.sleep(30)
            os._exit(0)
        children.append(pid)
    print("FORKS unbounded", len(children))
except OSError as e:
    print("FORKS bounded at", len(children), e.errno)
print(f"val_loss: {1.0 + abs(LEARNING_RATE - 0.004) * 100:.6f}")
"""


def test_a_run_has_a_process_limit(harness: Harness):
    from overnight.executors.cgroups import pids_root

    repo = harness.repo(FORK_BOMB, "max_processes = 64\n")
    out = harness.run(repo, "run", "-t", TAG, "-n", "1")
    assert out.returncode == 0, out.stdout + out.stderr
    log = log_of(ledger_rows(repo)[0])
    if harness.user == "root":
        assert pids_root() is not None, "root can make a pids cgroup here"
        assert "FORKS bounded at" in log, log
        assert int(log.split("FORKS bounded at ")[1].split()[0]) < 64
    else:  # no cgroup to delegate to an unprivileged harness: `doctor` says so
        assert "FORKS" in log


def test_auto_takes_the_best_the_machine_allows_or_refuses(default_harness: Harness):
    """Where namespaces are forbidden (bwrap fails as in Docker): root gets sandbox "user";
    anyone else is refused with a message that says how to fix it or opt out."""
    harness = default_harness
    fake = harness.base / "bwrap"
    fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && { echo bubblewrap 0.8.0; exit 0; }\n"
                    "echo 'bwrap: No permissions to create new namespace' >&2; exit 1\n")
    fake.chmod(0o755)
    repo = harness.repo(SANDBOX_FROM_INSIDE, 'allow_env = ["PROBE_PORT"]\n')
    out = harness.run(repo, "run", "-t", TAG, "-n", "1", OVERNIGHT_BWRAP=str(fake),
                      PROBE_PORT="9")
    doctor = harness.run(repo, "doctor", OVERNIGHT_BWRAP=str(fake))
    if harness.user == "root":
        assert out.returncode == 0, out.stdout + out.stderr
        assert "isolation user" in out.stdout
        assert "CAPS 0000000000000000" in log_of(ledger_rows(repo)[0])
        assert doctor.returncode == 1 and 'partial, by sandbox "user"' in doctor.stdout
    else:
        assert out.returncode == 2, out.stdout + out.stderr
        assert "no isolation is possible here" in out.stderr
        assert 'sandbox = "none"' in out.stderr and "overnight doctor" in out.stderr
        assert doctor.returncode == 2 and "none possible" in doctor.stdout
        forced = harness.repo(SANDBOX_FROM_INSIDE, 'sandbox = "user"\n')
        out = harness.run(forced, "run", "-t", TAG, "-n", "1")
        assert out.returncode == 2 and "needs the harness to run as root" in out.stderr
