"""[run] results_tsv: the running tag's results.tsv kept up to date, atomically, git-ignored."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import git, spec_toml, train_py

from overnight.executors.local import LocalExecutor
from overnight.ledger import Ledger, Row, export_tsv
from overnight.proposers import make_proposer
from overnight.scheduler import Loop
from overnight.workspace import Workspace


def test_results_tsv_follows_the_loop_and_matches_export(make_repo, cli) -> None:
    repo = make_repo({"train.py": train_py(0.001)},
                     spec_toml("perturb", extra_run='results_tsv = "results.tsv"'))
    out = cli("run", "-t", "t", "-n", "4", cwd=repo)
    assert out.returncode == 0, out.stderr
    tsv = (repo / "results.tsv").read_text()
    exported = cli("export", "-t", "t", cwd=repo).stdout
    assert tsv == exported and tsv.startswith("commit\tval_loss\tmemory_gb\tstatus")
    assert len(tsv.splitlines()) == 5  # the header and four decided candidates
    assert git(repo, "status", "--porcelain") == ""  # git-ignored through .git/info/exclude


def test_a_link_placed_at_its_name_is_replaced_not_followed(make_repo, cli, tmp_path) -> None:
    repo = make_repo({"train.py": train_py(0.001)},
                     spec_toml("perturb", extra_run='results_tsv = "out.tsv"'))
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (repo / "out.tsv").symlink_to(victim)
    out = cli("run", "-t", "t", "-n", "2", cwd=repo)
    assert out.returncode == 0, out.stderr
    assert victim.read_text() == "precious\n"
    assert not (repo / "out.tsv").is_symlink() and "commit\t" in (repo / "out.tsv").read_text()


@pytest.mark.parametrize(("name", "why"), [
    ("train.py", "is a committed file"), ("../x.tsv", "inside the repository"),
    (".git/x.tsv", "git's or overnight's own state"), ("nowhere/x.tsv", "does not exist")])
def test_bad_results_tsv_paths_exit_2(make_repo, cli, name: str, why: str) -> None:
    repo = make_repo({"train.py": train_py(0.001)},
                     spec_toml("perturb", extra_run=f'results_tsv = "{name}"'))
    out = cli("run", "-t", "t", "-n", "1", cwd=repo)
    assert out.returncode == 2 and why in out.stderr, out.stderr
    assert not Path(repo / "x.tsv").exists()


class _Watching:
    """Reads results.tsv each time the loop reports a decision, as a user's `tail -f` would;
    after the second, puts a link to someone else's file at its name."""

    def __init__(self, path: Path, ledger: Ledger, victim: Path):
        self.path, self.ledger, self.victim = path, ledger, victim
        self.seen: list[str] = []

    def started(self, row: Row) -> None:
        pass

    def finished(self, row: Row, best: Row | None, done: int) -> None:
        text = self.path.read_text()
        assert text == export_tsv(self.ledger.experiments("t"), "val_loss"), f"after #{row.id}"
        self.seen.append(text)
        if len(self.seen) == 2:
            self.path.unlink()
            self.path.symlink_to(self.victim)

    def note(self, text: str) -> None:
        pass


def test_results_tsv_is_up_to_date_after_each_decision(make_repo, cli, tmp_path: Path) -> None:
    repo = make_repo({"train.py": train_py(0.001)},
                     spec_toml("perturb", judge="", extra_run='results_tsv = "results.tsv"'))
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    ws = Workspace.open(repo)
    ws.preflight()
    ledger = ws.ledger()
    executor = LocalExecutor(1)
    spec = ws.spec
    watching = _Watching(repo / "results.tsv", ledger, victim)
    try:
        Loop(ws.repo, spec, ledger, executor, "t",
             lambda files: make_proposer(spec, files, ws.repo, ws.state / "scratch"),
             max_experiments=6, reporter=watching, results_tsv=ws.results_tsv()).run()
    finally:
        executor.shutdown()
        ledger.close()
    assert len(watching.seen) >= 6 and len(set(watching.seen)) >= 4  # it grew as it went
    assert victim.read_text() == "precious\n"
    assert (repo / "results.tsv").read_text() == cli("export", "-t", "t", cwd=repo).stdout
    assert git(repo, "status", "--porcelain") == ""


def test_a_directory_is_no_results_tsv(make_repo, cli) -> None:
    repo = make_repo({"train.py": train_py(0.001)},
                     spec_toml("perturb", extra_run='results_tsv = "out"'))
    (repo / "out").mkdir()
    out = cli("run", "-t", "t", "-n", "1", cwd=repo)
    assert out.returncode == 2 and "is a directory" in out.stderr, out.stderr
