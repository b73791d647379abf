"""[run] data: files git ignores, read-only in every run, pinned per tag (nanoGPT's shape)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import CLI, PYTHON, git, rows, spec_toml, train_py, wait_until
from shapes import nanogpt_data, nanogpt_like
from test_hostile import ledger_rows, log_of, make_harness

from overnight.data import Data
from overnight.spec import tomllib

COMMAND = "python train.py config/small.py"


def _nano(make_repo, extra_files: dict[str, str] | None = None) -> Path:
    repo = make_repo({**nanogpt_like(), "data/tiny/prepare.py": "# writes train.bin\n",
                      **(extra_files or {})})
    (repo / "data" / "tiny" / "train.bin").write_bytes(nanogpt_data())  # git-ignored
    assert git(repo, "status", "--porcelain") == ""
    return repo


def _init_and_commit(cli, repo: Path, *more: str) -> dict:
    out = cli("init", "--command", COMMAND, *more, cwd=repo)
    assert out.returncode == 0, out.stderr
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "spec")
    return tomllib.loads((repo / "overnight.toml").read_text())


@pytest.mark.parametrize("box", ["bwrap", "none"])
def test_ignored_data_reaches_every_run_read_only(make_repo, cli, box: str) -> None:
    repo = _nano(make_repo)
    spec = _init_and_commit(cli, repo)
    # init saw that the script reads data/ and that git ignores what is there.
    assert spec["run"]["data"] == ["data/tiny"]
    if box != "bwrap":
        text = (repo / "overnight.toml").read_text()
        text = text.replace("[run]\n", f'[run]\nsandbox = "{box}"\n')
        (repo / "overnight.toml").write_text(text)
        git(repo, "commit", "-qam", box)

    out = cli("run", "-t", "d", "-n", "4", cwd=repo, timeout=180)

    assert out.returncode == 0, out.stdout + out.stderr
    ran = rows(repo, "d")
    assert ran and all(r["metric"] is not None for r in ran), [r["reason"] for r in ran]
    assert (repo / "data" / "tiny" / "train.bin").read_bytes() == nanogpt_data()


def test_without_data_the_run_fails_and_says_what_to_do(make_repo, cli) -> None:
    repo = _nano(make_repo)
    _init_and_commit(cli, repo)
    text = (repo / "overnight.toml").read_text()
    (repo / "overnight.toml").write_text("\n".join(
        line for line in text.splitlines() if not line.startswith("data = ")) + "\n")
    git(repo, "commit", "-qam", "no data")
    out = cli("run", "-t", "d", "-n", "2", cwd=repo, timeout=120)
    assert out.returncode == 2
    assert "FileNotFoundError" in out.stderr or "No such file" in out.stderr


def test_a_run_cannot_change_the_data(make_repo, cli) -> None:
    attack = """
for p in ("data/tiny/train.bin",):
    for how in ("write", "unlink"):
        try:
            if how == "write":
                open(p, "wb").write(b"poisoned")
            else:
                os.unlink(p)
            print("CHANGED", p, how)
        except OSError as e:
            print("refused", p, how, type(e).__name__)
"""
    repo = _nano(make_repo)
    train = (repo / "train.py").read_text().replace(
        'exec(open("configurator.py").read())',
        'exec(open("configurator.py").read())\n' + attack)
    (repo / "train.py").write_text(train)
    git(repo, "commit", "-qam", "hostile")
    _init_and_commit(cli, repo)
    out = cli("run", "-t", "d", "-n", "1", cwd=repo, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    log = Path(rows(repo, "d")[0]["log_path"]).read_text()
    assert "CHANGED" not in log and log.count("refused") == 2, log
    assert (repo / "data" / "tiny" / "train.bin").read_bytes() == nanogpt_data()


def test_data_changed_mid_tag_halts_and_can_be_accepted(make_repo, cli) -> None:
    repo = _nano(make_repo)
    _init_and_commit(cli, repo)
    first = cli("run", "-t", "d", "-n", "1", cwd=repo, timeout=120)
    assert first.returncode == 0, first.stderr
    (repo / "data" / "tiny" / "train.bin").write_bytes(b"other data" * 10)

    out = cli("run", "-t", "d", "-n", "2", cwd=repo, timeout=120)
    assert out.returncode == 3, out.stdout + out.stderr
    assert "data/tiny/train.bin changed" in out.stderr and "--accept-spec-change" in out.stderr

    ok = cli("run", "-t", "d", "-n", "2", "--accept-spec-change", cwd=repo, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "data changed (accepted)" in ok.stdout


@pytest.mark.parametrize(("path", "why"), [
    ("data/missing", "does not exist"), ("../elsewhere", "inside the repository"),
    (".git", "never data"), ("train.py", "committed")])
def test_bad_data_paths_exit_2(make_repo, cli, path: str, why: str) -> None:
    repo = _nano(make_repo)
    _init_and_commit(cli, repo)
    text = (repo / "overnight.toml").read_text()
    text = re.sub(r"^data = .*$", f'data = ["{path}"]', text, flags=re.M)
    (repo / "overnight.toml").write_text(text)
    git(repo, "commit", "-qam", "bad data")
    out = cli("run", "-t", "d", "-n", "1", cwd=repo, timeout=60)
    assert out.returncode == 2 and why in out.stderr, out.stderr


# -- what a run can do to the data, box by box ------------------------------------------------

ATTACK = """
def attempt(what, fn):
    try:
        fn()
        print("CHANGED", what)
    except OSError as e:
        print("refused", what, type(e).__name__)

DATA = "data/tiny/train.bin"
attempt("write", lambda: open(DATA, "r+b").write(b"poisoned"))
attempt("truncate", lambda: os.truncate(DATA, 0))
attempt("chmod", lambda: os.chmod(DATA, 0o666))
attempt("unlink", lambda: os.unlink(DATA))
attempt("rename", lambda: os.rename("data/tiny", "data/moved"))
attempt("plant", lambda: open("data/tiny/planted.bin", "w").write("x"))
tokens = open(DATA, "rb").read()
loss += len(tokens) / 1e6
"""


@pytest.mark.parametrize("who", ["root", "nobody", "root, sandbox user"])
def test_a_boxed_run_cannot_change_the_data(who: str) -> None:
    if who != "root" and os.geteuid() != 0:
        pytest.skip("the harness as nobody, and sandbox \"user\", need root")
    h = make_harness(who)
    try:
        repo = h.repo(train_py(0.001, extra=ATTACK), 'data = ["data/tiny"]\n',
                      files={".gitignore": "data/\n"})
        (repo / "data" / "tiny").mkdir(parents=True)
        (repo / "data" / "tiny" / "train.bin").write_bytes(nanogpt_data())
        h.own(repo)
        repo.chmod(0o755)  # sandbox "user": the slot's uid reads the data where it is
        out = h.run(repo, "run", "-t", "d", "-n", "2")
        assert out.returncode == 0, out.stdout + out.stderr
        ran = ledger_rows(repo)
        assert len(ran) == 2 and all(r["metric"] is not None for r in ran), ran
        for r in ran:
            log = log_of(r)
            assert "CHANGED" not in log and log.count("refused") == 6, log
        assert (repo / "data" / "tiny" / "train.bin").read_bytes() == nanogpt_data()
        assert sorted(os.listdir(repo / "data")) == ["tiny"]
        assert os.listdir(repo / "data" / "tiny") == ["train.bin"]
    finally:
        shutil.rmtree(h.base, ignore_errors=True)


def test_without_a_box_a_run_that_writes_the_data_halts_the_loop(make_repo, cli) -> None:
    # sandbox = "none" links the data into the run: nothing stops a write, but the loop
    # stops before judging the run that made it (the baseline here: nothing is pinned yet).
    write = 'open("data/tiny/train.bin", "r+b").write(b"poisoned")\n'
    spec = spec_toml("grid", extra_run='sandbox = "none"\ndata = ["data/tiny"]')
    repo = make_repo({"train.py": train_py(0.001, extra=write), ".gitignore": "data/\n"}, spec)
    (repo / "data" / "tiny").mkdir(parents=True)
    (repo / "data" / "tiny" / "train.bin").write_bytes(nanogpt_data())
    out = cli("run", "-t", "d", "-n", "2", cwd=repo, timeout=120)
    assert out.returncode == 3, out.stdout + out.stderr
    assert "changed while the loop ran (data/tiny/train.bin changed)" in out.stderr, out.stderr
    assert [r["metric"] for r in rows(repo, "d")] == [None]  # not judged


def test_data_changed_while_the_loop_runs_halts_it(make_repo, cli_env) -> None:
    hold = 'time.sleep(0 if LEARNING_RATE == 0.001 else 3)\n'  # candidates take a while
    read = 'open("data/tiny/train.bin", "rb").read()\n'
    spec = spec_toml("grid", timeout=60, extra_run='data = ["data/tiny"]')
    repo = make_repo({"train.py": train_py(0.001, extra=read + hold),
                      ".gitignore": "data/\n"}, spec)
    (repo / "data" / "tiny").mkdir(parents=True)
    (repo / "data" / "tiny" / "train.bin").write_bytes(nanogpt_data())
    loop = subprocess.Popen([*CLI, "run", "-t", "d", "-n", "3"], cwd=repo, env=cli_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: any(r["status"] == "running" and not r["is_baseline"]
                               for r in rows(repo, "d")), 60, "a candidate running")
        (repo / "data" / "tiny" / "train.bin").write_bytes(b"new data" * 9)
        out, err = loop.communicate(timeout=90)  # checked when the candidate's run ends
    finally:
        loop.kill()
    assert loop.returncode == 3, out + err
    assert "data/tiny/train.bin changed" in err


def _link_out(repo: Path) -> None:
    outside = repo.parent / "elsewhere"
    outside.mkdir()
    (outside / "train.bin").write_bytes(b"x")
    (repo / "data" / "out").symlink_to(outside)


def _link_in(repo: Path) -> None:
    (repo / "data" / "tiny" / "more.bin").symlink_to("train.bin")


def _fifo_in(repo: Path) -> None:
    os.mkfifo(repo / "data" / "tiny" / "pipe.bin")


@pytest.mark.parametrize(("path", "make", "why"), [
    ("data/out", _link_out, "leads out of the repository"),
    ("data/tiny", _link_in, "data/tiny/more.bin is a symbolic link"),
    ("data/tiny", _fifo_in, "data/tiny/pipe.bin is not a regular file")])
def test_links_and_fifos_in_the_data_exit_2(make_repo, cli, path: str, make, why: str) -> None:
    repo = _nano(make_repo, {".gitignore": "data/*/*.bin\ndata/out\n"})
    _init_and_commit(cli, repo)
    make(repo)
    text = (repo / "overnight.toml").read_text()
    (repo / "overnight.toml").write_text(
        re.sub(r"^data = .*$", f'data = ["{path}"]', text, flags=re.M))
    git(repo, "commit", "-qam", "data")
    out = cli("run", "-t", "d", "-n", "1", cwd=repo, timeout=60)
    assert out.returncode == 2 and why in out.stderr, out.stderr
    assert rows(repo, "d") == []


@pytest.mark.skipif(os.geteuid() != 0, reason='sandbox "user" needs root')
def test_data_closed_to_other_users_exits_2_under_sandbox_user(make_repo, cli) -> None:
    repo = _nano(make_repo)
    _init_and_commit(cli, repo)
    (repo / "data" / "tiny" / "train.bin").chmod(0o600)
    text = (repo / "overnight.toml").read_text()
    (repo / "overnight.toml").write_text(text.replace("[run]\n", '[run]\nsandbox = "user"\n'))
    git(repo, "commit", "-qam", "user")
    out = cli("run", "-t", "d", "-n", "1", cwd=repo, timeout=60)
    assert out.returncode == 2 and "closed to other users" in out.stderr, out.stderr


def test_hashing_never_follows_a_link_or_blocks_on_a_fifo(tmp_path: Path) -> None:
    # What a run without a box could leave in a linked dataset for the harness to hash.
    (tmp_path / "train.bin").write_bytes(b"tokens")
    (tmp_path / "secret").symlink_to("/etc/hostname")
    (tmp_path / "dir").symlink_to("/etc")
    os.mkfifo(tmp_path / "pipe")
    digest = Data((("d", str(tmp_path)),)).digest()
    assert digest == {"d/dir": "a link to /etc", "d/pipe": "not a regular file",
                      "d/secret": "a link to /etc/hostname",
                      "d/train.bin": hashlib.sha256(b"tokens").hexdigest()}


def test_the_checks_and_the_evaluator_see_the_data_read_only(make_repo, cli) -> None:
    probe = """\
import os, sys
data = open("data/tiny/train.bin", "rb").read()
try:
    open("data/tiny/train.bin", "r+b").write(b"x")
    sys.exit("the data was writable")
except OSError:
    pass
"""
    train = train_py(0.001, extra=(
        'open(os.path.join(os.environ["OVERNIGHT_ARTIFACTS"], "lr.txt"), "w")'
        '.write(str(LEARNING_RATE))'))
    evaluate = probe + (
        'lr = float(open(os.path.join(os.environ["OVERNIGHT_ARTIFACTS"], "lr.txt")).read())\n'
        'print(f"val_loss: {1 + abs(lr - 0.004) * 100 + len(data) / 1e6:.6f}")\n')
    spec = spec_toml("grid", extra_run=f'data = ["data/tiny"]\nchecks = "{PYTHON} probe.py"',
                     extra=f'\n[evaluate]\ncommand = "{PYTHON} eval.py"\n')
    repo = make_repo({"train.py": train, "probe.py": probe, "eval.py": evaluate,
                      ".gitignore": "data/\n"}, spec)
    (repo / "data" / "tiny").mkdir(parents=True)
    (repo / "data" / "tiny" / "train.bin").write_bytes(nanogpt_data())
    out = cli("run", "-t", "d", "-n", "3", cwd=repo, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    rs = rows(repo, "d")
    # The metric came from the evaluator, which read the data; a keep passed the checks.
    size = len(nanogpt_data()) / 1e6
    assert rs[0]["metric"] == pytest.approx(1.3 + size)
    assert [r["status"] for r in rs if not r["is_baseline"]].count("keep") >= 1, rs
