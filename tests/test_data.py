"""[run] data: files git ignores, read-only in every run, pinned per tag (nanoGPT's shape)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import git, rows
from shapes import nanogpt_data, nanogpt_like

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
    import re
    text = re.sub(r"^data = .*$", f'data = ["{path}"]', text, flags=re.M)
    (repo / "overnight.toml").write_text(text)
    git(repo, "commit", "-qam", "bad data")
    out = cli("run", "-t", "d", "-n", "1", cwd=repo, timeout=60)
    assert out.returncode == 2 and why in out.stderr, out.stderr
