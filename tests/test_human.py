"""The person in the loop, on real loops: pause, unpause, stop, checkpoints and approve, the
notify command, stuck detection (the search proposer changes tactics, a model is told)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from conftest import CLI, PYTHON, create_repo, rows, spec_toml, train_py, wait_until
from test_llm import TRAIN, FakeAPI, lr_answer
from test_llm_loop import spec as llm_spec

SLOW = "import time\ntime.sleep(0.6)\n"
NOTIFY = f"{PYTHON} -c \"import os; open('notified.txt', 'a').write(os.environ['OVERNIGHT_EVENT'] + ' ' + os.environ['OVERNIGHT_TAG'] + ' ' + os.environ['OVERNIGHT_REPORT'] + chr(10))\""  # noqa: E501


def events(repo: Path, tag: str, kind: str | None = None) -> list[dict]:
    if not (repo / ".overnight" / "ledger.sqlite").exists():
        return []
    db = sqlite3.connect(repo / ".overnight" / "ledger.sqlite", timeout=10)
    db.row_factory = sqlite3.Row
    try:
        found = [dict(r) for r in db.execute(
            "SELECT * FROM events WHERE tag = ? ORDER BY id", (tag,))]
    finally:
        db.close()
    return [e for e in found if kind is None or e["kind"] == kind]


def human(**keys: object) -> str:
    return "[human]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())


def start(repo: Path, env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen([*CLI, "run", "-t", "t", *args], cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finished(repo: Path) -> list[dict]:
    return [r for r in rows(repo, "t") if r["status"] not in ("queued", "running")]


def test_pause_holds_launches_and_unpause_resumes(make_repo, cli_env, cli) -> None:
    repo = make_repo({"train.py": train_py(0.001, SLOW)}, spec_toml("perturb"))
    assert cli("pause", cwd=repo).returncode == 2  # no experiments, no loop
    proc = start(repo, cli_env, "-n", "8")
    try:
        wait_until(lambda: len(finished(repo)) >= 2, 60, "two runs")
        out = cli("pause", cwd=repo)
        assert out.returncode == 0, out.stderr
        assert "launches nothing new" in out.stdout
        wait_until(lambda: events(repo, "t", "paused"), 10, "the loop to pause")
        wait_until(lambda: not [r for r in rows(repo, "t") if r["status"] == "running"], 20,
                   "what runs to finish")
        held = len(rows(repo, "t"))
        time.sleep(3)
        assert len(rows(repo, "t")) == held, "nothing is launched while paused"
        assert json.loads(events(repo, "t", "control")[0]["message"])["by"] == "cli"
        assert cli("unpause", cwd=repo).returncode == 0
        assert proc.wait(timeout=120) == 0, proc.stdout.read()
    finally:
        proc.kill()
    assert len([r for r in rows(repo, "t") if r["status"] in ("keep", "discard")]) == 8
    assert events(repo, "t", "unpaused")
    assert cli("unpause", cwd=repo).returncode == 2  # the loop is gone


def test_stop_finishes_what_runs_and_stop_now_kills_it(make_repo, cli_env, cli) -> None:
    repo = make_repo({"train.py": train_py(0.001, SLOW)}, spec_toml("perturb"))
    proc = start(repo, cli_env)  # no -n: it would run until stopped
    try:
        wait_until(lambda: len(finished(repo)) >= 2, 60, "two runs")
        assert cli("stop", cwd=repo).returncode == 0
        assert proc.wait(timeout=60) == 0
        out = proc.stdout.read()
    finally:
        proc.kill()
    assert "stopped: stopped by `overnight stop` (cli)" in out, out
    assert not [r for r in rows(repo, "t") if r["status"] in ("lost", "running", "queued")]
    assert events(repo, "t", "stop")[-1]["message"].startswith("stopped by")

    proc = start(repo, cli_env)
    try:
        wait_until(lambda: [r for r in rows(repo, "t") if r["status"] == "running"], 60,
                   "a run")
        assert cli("stop", "--now", cwd=repo).returncode == 0
        assert proc.wait(timeout=60) == 130  # as Ctrl-C
    finally:
        proc.kill()
    assert not [r for r in rows(repo, "t") if r["status"] in ("running", "queued")]


def test_a_checkpoint_waits_for_approval_and_notifies(make_repo, cli_env, cli) -> None:
    toml = spec_toml("perturb") + human(checkpoint_every="3 experiments", notify=NOTIFY)
    repo = make_repo({"train.py": train_py(0.001, SLOW)}, toml)
    proc = start(repo, cli_env, "-n", "5")
    try:
        wait_until(lambda: events(repo, "t", "checkpoint"), 90, "the checkpoint")
        assert events(repo, "t", "checkpoint")[0]["message"] == "3 runs"
        assert not [r for r in rows(repo, "t") if r["status"] == "running"]
        held = len(rows(repo, "t"))
        notified = wait_until(lambda: (repo / "notified.txt").exists()
                              and (repo / "notified.txt").read_text(), 10, "notify")
        assert notified.startswith("checkpoint t"), notified
        report = Path(notified.split()[2])  # written at the checkpoint, for the person
        assert report.name == "report.html" and report.is_file()
        assert (report.parent / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        time.sleep(2.5)
        assert len(rows(repo, "t")) == held, "nothing runs while it waits for approval"
        out = cli("approve", "try a smaller learning rate", cwd=repo)
        assert out.returncode == 0, out.stderr
        assert proc.wait(timeout=120) == 0, proc.stdout.read()
    finally:
        proc.kill()
    assert events(repo, "t", "approved")
    counted = [r for r in rows(repo, "t") if r["status"] not in ("rejected", "lost")]
    assert len(counted) == 5
    lines = (repo / "notified.txt").read_text().splitlines()
    assert [line.split()[0] for line in lines] == ["checkpoint", "end"]
    db = sqlite3.connect(repo / ".overnight" / "ledger.sqlite")
    assert ("try a smaller learning rate",) in db.execute("SELECT text FROM notes").fetchall()
    db.close()
    out = cli("approve", cwd=repo)
    assert out.returncode == 2 and "no `overnight run` is running" in out.stderr


def test_approve_with_nothing_pending_says_so(make_repo, cli_env, cli) -> None:
    repo = make_repo({"train.py": train_py(0.001, SLOW)}, spec_toml("perturb"))
    proc = start(repo, cli_env, "-n", "4")
    try:
        wait_until(lambda: finished(repo), 60, "the baseline")
        out = cli("approve", cwd=repo)
        assert out.returncode == 2 and "nothing to approve" in out.stderr, out.stderr
        assert proc.wait(timeout=120) == 0
    finally:
        proc.kill()


def test_the_search_proposer_changes_tactics_when_stuck(make_repo, cli) -> None:
    # The baseline is the optimum: nothing can be kept.
    toml = spec_toml("perturb") + human(stuck_after=3, notify=NOTIFY)
    repo = make_repo({"train.py": train_py(0.004)}, toml)
    out = cli("run", "-t", "t", "-n", "9", cwd=repo, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    stuck = events(repo, "t", "stuck")
    assert [e["message"].split()[0] for e in stuck] == ["3", "6"], stuck
    cands = [r for r in rows(repo, "t") if not r["is_baseline"]]
    assert not any(r["hypothesis"].startswith("stuck") for r in cands[:3])
    assert all(r["hypothesis"].startswith("stuck after") for r in cands[3:]), \
        [r["hypothesis"] for r in cands]
    assert "stuck:" in out.stdout
    lines = (repo / "notified.txt").read_text().splitlines()
    assert [line.split()[0] for line in lines] == ["stuck", "stuck", "end"]


def test_a_stuck_model_is_told_which_ideas_failed(tmp_path: Path, cli) -> None:
    api = FakeAPI("openai")
    try:
        repo = create_repo(tmp_path / "r", {"train.py": TRAIN},
                           llm_spec(api.base_url) + human(stuck_after=2))
        api.answer(lr_answer("0.001", hypothesis="a lower rate is steadier"))
        api.answer(lr_answer("0.0005", hypothesis="an even lower rate"))
        api.answer(lr_answer("0.003", hypothesis="go the other way"))
        out = cli("run", "-t", "t", "-n", "4", cwd=repo, env={"OPENAI_API_KEY": "k"},
                  timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        prompts = ["\n".join(m["content"] for m in r.body["messages"]) for r in api.received]
    finally:
        api.server.shutdown()
    assert "You are stuck" not in prompts[1]
    assert "You are stuck: the last 2 ideas did not improve" in prompts[2]
    assert "a lower rate is steadier" in prompts[2] and "an even lower rate" in prompts[2]


def test_notify_runs_when_the_baseline_fails(make_repo, cli) -> None:
    toml = spec_toml("perturb") + human(notify=NOTIFY)
    repo = make_repo({"train.py": train_py(0.001, "raise SystemExit(3)")}, toml)
    out = cli("run", "-t", "t", "-n", "3", cwd=repo)
    assert out.returncode == 2, out.stdout + out.stderr
    assert (repo / "notified.txt").read_text().split()[0] == "baseline_failed"


def test_a_failing_notify_is_said_and_never_stops_the_loop(make_repo, cli) -> None:
    toml = spec_toml("perturb") + human(notify="exit 7", stuck_after=1)
    repo = make_repo({"train.py": train_py(0.004)}, toml)
    out = cli("run", "-t", "t", "-n", "3", cwd=repo)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[human] notify exited with 7" in out.stdout


@pytest.mark.parametrize("bad", ["often", "3 days", "-2h"])
def test_a_bad_checkpoint_every_is_refused(make_repo, cli, bad: str) -> None:
    repo = make_repo({"train.py": train_py()}, spec_toml("perturb") + human(
        checkpoint_every=bad))
    out = cli("run", "-n", "1", cwd=repo)
    assert out.returncode == 2 and "[human] checkpoint_every" in out.stderr, out.stderr

