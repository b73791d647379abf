"""[run] results_tsv: the running tag's results.tsv kept up to date, atomically, git-ignored."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import git, spec_toml, train_py


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
