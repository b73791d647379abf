"""Bad input and broken environments: one line that says what happened and what to do.

Every test drives the real `overnight` command and checks the exit code (2: bad input or
config, 1: the environment), that the message names the problem and the fix, and that no
traceback reaches the user.
"""

from __future__ import annotations

import io
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import CLI, create_repo, git, rows, spec_toml, train_py
from rich.console import Console

from overnight.ledger import Row
from overnight.report import ConsoleReporter
from overnight.spec import Objective
from overnight.text import printable

TAG = "t"
CliRun = Callable[..., subprocess.CompletedProcess]


def failed(out: subprocess.CompletedProcess, code: int, *phrases: str) -> str:
    """The one-line error of a run that exited with `code`, holding every phrase."""
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout, out.stderr
    message = out.stderr.strip()
    assert message.startswith("error: "), out.stderr
    for phrase in phrases:
        assert phrase in " ".join(message.split()), (phrase, message)
    return message


@pytest.fixture
def repo(make_repo: Callable[..., Path]) -> Path:
    return make_repo({"train.py": train_py(0.001)}, spec_toml("grid"))


@pytest.fixture
def ran(repo: Path, cli: CliRun) -> Path:
    """A repository whose ledger holds two experiments of tag t."""
    out = cli("run", "-t", TAG, "-n", "2", cwd=repo)
    assert out.returncode == 0, out.stderr
    return repo


def ledger(repo: Path) -> Path:
    return repo / ".overnight" / "ledger.sqlite"


# -- a user without root's powers over files -------------------------------------------------

# Root writes read-only files; the CLI runs without the capabilities that let it.
_UNPRIVILEGED = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner,"
                 "-linux_immutable", "--"] if os.geteuid() == 0 else []


def cli_unprivileged(cli_env: dict[str, str], *args: str, cwd: Path
                     ) -> subprocess.CompletedProcess:
    if _UNPRIVILEGED and shutil.which("setpriv") is None:
        pytest.skip("needs setpriv to run the CLI without root's file capabilities")
    return subprocess.run([*_UNPRIVILEGED, *CLI, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, env=cli_env, check=False)


# -- disk full ---------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs: a disk that can be filled, unmounted afterwards whatever happens."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(path: Path) -> None:
    """Write `path` until the disk holding it is full."""
    chunk = b"\0" * (1 << 16)
    with open(path, "wb") as f:
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError:
            pass
    with open(path, "ab") as f:  # and the last bytes the buffered writes left free
        try:
            while True:
                os.write(f.fileno(), b"\0")
        except OSError:
            pass


def test_disk_full_status(small_disk: Path, cli: CliRun) -> None:
    repo = create_repo(small_disk / "repo", {"train.py": train_py(0.001)}, spec_toml("grid"))
    assert cli("run", "-t", TAG, "-n", "2", cwd=repo).returncode == 0
    fill(small_disk / "filler")
    failed(cli("status", cwd=repo), 1, f"the disk holding {repo / '.overnight'} is full",
           "free space and run the same command again")


# Fills the disk during the third experiment it runs, once.
FILLING = train_py(0.001, extra="""
import pathlib
counter = pathlib.Path(os.environ["COUNTER"])
n = int(counter.read_text()) + 1 if counter.exists() else 1
counter.write_text(str(n))
if n == 3:
    with open(os.environ["FILLER"], "wb") as f:
        try:
            while True:
                f.write(b"0" * 65536)
                f.flush()
        except OSError:
            pass
""")


def test_disk_full_during_run_loses_nothing_and_resumes(small_disk: Path, tmp_path: Path,
                                                        cli: CliRun) -> None:
    filler = small_disk / "filler"
    env = f'env = {{COUNTER = "{tmp_path / "count"}", FILLER = "{filler}"}}'
    # Unboxed, so that the script can fill the disk from outside its run directory, as any
    # other process on the machine could (test_hostile.py: a boxed run that fills it).
    env += '\nsandbox = "none"\nallow_env = ["COUNTER", "FILLER"]'
    repo = create_repo(small_disk / "repo", {"train.py": FILLING},
                       spec_toml("grid", extra_run=env))
    failed(cli("run", "-t", TAG, "-n", "5", cwd=repo), 1,
           f"the disk holding {repo / '.overnight'} is full",
           "free space and run the same command again", "nothing recorded is lost")
    filler.unlink()
    before = {r["id"]: r for r in rows(repo, TAG)}
    assert [r["status"] for r in before.values()][:2] == ["keep", "discard"]

    out = cli("run", "-t", TAG, "-n", "5", cwd=repo)
    assert out.returncode == 0, out.stderr
    after = rows(repo, TAG)
    for r in after:  # what was recorded before the disk filled is still there, unchanged
        if r["id"] in before and before[r["id"]]["status"] not in ("queued", "running"):
            assert r == before[r["id"]]
    statuses = [r["status"] for r in after]
    assert not {"queued", "running"} & set(statuses)
    assert len([s for s in statuses if s != "lost"]) == 5, statuses
    best = [r for r in after if r["status"] == "keep"][-1]
    assert git(repo, "rev-parse", f"overnight/{TAG}") == best["kept_commit"]


# -- the ledger: read-only, immutable, damaged, someone else's ---------------------------------


def test_read_only_ledger(ran: Path, cli_env: dict[str, str]) -> None:
    ledger(ran).chmod(0o444)
    failed(cli_unprivileged(cli_env, "run", "-t", TAG, "-n", "3", cwd=ran), 1,
           f"the file {ledger(ran)} is read-only", f"chmod u+w {ledger(ran)}")
    assert cli_unprivileged(cli_env, "status", cwd=ran).returncode == 0  # reading still works
    assert len(rows(ran, TAG)) == 2


def test_read_only_state_directory(ran: Path, cli_env: dict[str, str]) -> None:
    state = ran / ".overnight"
    state.chmod(0o555)
    try:
        failed(cli_unprivileged(cli_env, "run", "-t", TAG, "-n", "3", cwd=ran), 1,
               f"the directory {state} is read-only", f"chmod u+w {state}")
        failed(cli_unprivileged(cli_env, "status", cwd=ran), 1,
               f"the directory {state} is read-only", f"chmod u+w {state}")
    finally:
        state.chmod(0o755)


@pytest.fixture
def immutable_ledger(ran: Path) -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("chattr") is None:
        pytest.skip("needs root and chattr")
    done = subprocess.run(["chattr", "+i", str(ledger(ran))], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        pytest.skip(f"chattr +i does not work here: {done.stderr.strip()}")
    try:
        yield ran
    finally:
        subprocess.run(["chattr", "-i", str(ledger(ran))], check=True)


def test_immutable_ledger(immutable_ledger: Path, cli: CliRun) -> None:
    repo = immutable_ledger
    failed(cli("run", "-t", TAG, "-n", "3", cwd=repo), 1,
           f"{ledger(repo)} is immutable (chattr +i)", f"chattr -i {ledger(repo)}")
    assert cli("status", cwd=repo).returncode == 0
    assert len(rows(repo, TAG)) == 2


def test_damaged_ledger(ran: Path, cli: CliRun) -> None:
    path = ledger(ran)
    garbage = os.urandom(8192)
    path.write_bytes(garbage)
    failed(cli("status", cwd=ran), 2, f"{path} is damaged or not a SQLite database",
           f"mv {path} {path}.damaged")
    assert path.read_bytes() == garbage


def test_foreign_database(repo: Path, cli: CliRun) -> None:
    path = ledger(repo)
    path.parent.mkdir()
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE songs (title TEXT)")
    db.commit()
    db.close()
    failed(cli("run", "-t", TAG, "-n", "2", cwd=repo), 2,
           f"{path} is not an overnight ledger", "tables songs", f"mv {path} {path}.other")
    db = sqlite3.connect(path)
    tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master")]
    db.close()
    assert tables == ["songs"]  # left as it was


def test_foreign_experiments_table(repo: Path, cli: CliRun) -> None:
    path = ledger(repo)
    path.parent.mkdir()
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE experiments (name TEXT, score REAL)")
    db.commit()
    db.close()
    failed(cli("status", cwd=repo), 2, f"{path} is not an overnight ledger",
           "an experiments table without id, tag", "move it aside")


# -- overnight.toml ----------------------------------------------------------------------------


def test_spec_not_utf8(repo: Path, cli: CliRun) -> None:
    spec = repo / "overnight.toml"
    spec.write_bytes(spec.read_bytes().replace(b"val_loss", b"val_\xe9loss", 1))
    failed(cli("status", cwd=repo), 2, "overnight.toml is not UTF-8 text", "line 2",
           "save it as UTF-8")


def test_spec_is_a_directory(make_repo: Callable[..., Path], cli: CliRun) -> None:
    repo = make_repo({"train.py": train_py(0.001)})
    (repo / "overnight.toml").mkdir()
    failed(cli("run", cwd=repo), 2, f"{repo / 'overnight.toml'} is a directory",
           "move it away")


@pytest.mark.parametrize("bound", ["inf", "nan", "-inf"])
def test_search_bounds_must_be_finite(make_repo: Callable[..., Path], cli: CliRun,
                                      bound: str) -> None:
    toml = spec_toml("tpe", extra=f"[search.bounds]\nLEARNING_RATE = [0, {bound}]\n")
    repo = make_repo({"train.py": train_py(0.001)}, toml)
    failed(cli("run", "-t", TAG, "-n", "2", cwd=repo), 2, "[search] bounds",
           f"LEARNING_RATE = [0, {bound}]: bounds must be finite numbers")
    assert rows(repo) == []


# -- flags -------------------------------------------------------------------------------------


def test_repo_is_a_file(repo: Path, cli: CliRun) -> None:
    failed(cli("status", "--repo", "train.py", cwd=repo), 2, "--repo train.py is a file",
           "pass the directory of your repository")


def test_repo_missing(repo: Path, cli: CliRun) -> None:
    missing = repo / "nowhere"
    failed(cli("status", "--repo", str(missing), cwd=repo), 2,
           f"--repo {missing} does not exist", "pass the directory of your repository")


def test_export_into_missing_directory(ran: Path, cli: CliRun) -> None:
    target = ran / "out" / "results.tsv"
    failed(cli("export", "-o", str(target), cwd=ran), 2,
           f"the directory {target.parent} does not exist", f"mkdir -p {target.parent}")
    assert not target.parent.exists()


@pytest.mark.parametrize(("tag", "why"), [
    ("a..b", "cannot contain '..'"),
    ("x.lock", "cannot end with '.lock'"),
    ("night.", "cannot end with '.'"),
    ("a@{1}", "use letters, digits"),
    ("-x", "use letters, digits"),
])
def test_tag_must_name_a_branch(repo: Path, cli: CliRun, tag: str, why: str) -> None:
    failed(cli("run", "-t", tag, "-n", "2", cwd=repo), 2, f"--tag {tag!r}", why)
    assert rows(repo) == []
    assert git(repo, "branch", "--list", "overnight/*") == ""


# -- text from experiments and models reaches the terminal without control sequences ------------

ESCAPES = "\x1b]52;c;cm0gLXJmIH4=\x07\x1b[2J\x1b[H\x1b[5;10H\x9b1m\x1b]0;pwned\x1b\\\r"


def test_show_strips_control_sequences(ran: Path, cli: CliRun) -> None:
    row = rows(ran, TAG)[1]
    with open(row["log_path"], "a") as log:
        log.write(f"loss went {ESCAPES}down\n\tindented\n")
    # As a model's answer or an experiment's output would put them there: through the ledger.
    from overnight.workspace import Workspace

    led = Workspace.open(ran).ledger()
    led.update(row["id"], description=f"desc{ESCAPES}ription", hypothesis=f"hypo{ESCAPES}thesis",
               reason=f"rea{ESCAPES}son")
    led.close()
    for args in (("show", str(row["id"])), ("hypotheses",), ("status",)):
        out = cli(*args, cwd=ran)
        assert out.returncode == 0, out.stderr
        assert not set(out.stdout) & {"\x1b", "\x07", "\x9b", "\r"}, (args, repr(out.stdout))
    out = cli("show", str(row["id"]), cwd=ran)
    for shown in ("description", "hypothesis", "reason", "loss went", "down", "    indented"):
        assert shown in out.stdout


def test_progress_lines_strip_control_sequences() -> None:
    console = Console(file=io.StringIO(), force_terminal=False, width=200)
    ledger_stub = _NoLedger()
    reporter = ConsoleReporter(console, ledger_stub, Objective(metric="val_loss"), TAG, None)
    row = _row(description=f"lr{ESCAPES} up", reason=f"exit{ESCAPES} 1")
    reporter.started(row)
    reporter.finished(row, None, 1)
    reporter.note(f"note{ESCAPES}")
    printed = console.file.getvalue()
    assert "lr up" in printed and "exit 1" in printed and "note" in printed
    assert not set(printed) & {"\x1b", "\x07", "\x9b", "\r"}, repr(printed)


def test_printable_keeps_text_newlines_and_tabs() -> None:
    assert printable("a\tb\nc\r\nd é 日本") == "a\tb\nc\nd é 日本"
    assert printable("x\x1b]52;c;ZXZpbA==\nnext") == "x\nnext"  # unterminated: ends at its line
    assert printable("\x1b[31mred\x1b[0m \x1bc\x00\x7f") == "red "


class _NoLedger:
    def experiments(self, tag: str, statuses: tuple[str, ...] | None = None) -> list[Row]:
        return []


def _row(**values: object) -> Row:
    base = dict(
        id=1, tag=TAG, parent=None, commit_sha=None, status="crash", is_baseline=False,
        description="", hypothesis="", proposer="search", knobs={}, metric=None, metrics={},
        delta=None, reason="", returncode=1, peak_rss_mb=None, peak_vram_mb=None, slot=0,
        hardware="", log_path="", run_dir="", retry_of=None, kept_commit=None,
        runtime_knobs={}, integrity={}, fingerprint="", tokens_in=0, tokens_out=0,
        cost_usd=0.0, created_at=0.0, started_at=0.0, finished_at=1.0)
    return Row(**{**base, **values})
