"""The Ray executor on a real local Ray cluster (ray.cluster_utils.Cluster): two nodes with
CPU slots, custom resources standing in for two GPU types."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import CLI, alive, git, rows, spec_toml, train_py, wait_until
from ray.cluster_utils import Cluster
from test_scheduler import HANG, TAG, UNBOXED, Background, wait_for_hanging_candidate

from overnight.executors.ray import WORKER_RUNS, worker_key


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"fast": 2}})
    c.add_node(num_cpus=2, resources={"big": 2})
    c.wait_for_nodes()
    yield c
    c.shutdown()


def _ray_spec(address: str, extra_ray: str = "", extra_run: str = "", **kw: object) -> str:
    return spec_toml(**kw, extra_run='executor = "ray"\n' + extra_run) + (
        f'[ray]\naddress = "{address}"\nslot_resources = {{ CPU = 1 }}\n{extra_ray}')


def test_a_loop_runs_on_ray_workers(make_repo, cli, cluster: Cluster) -> None:
    repo = make_repo({"train.py": train_py(0.001)},
                     _ray_spec(cluster.address, strategy="perturb"))
    out = cli("run", "-t", "r", "-n", "5", cwd=repo, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Ray slot(s) of CPU 1" in out.stdout
    ran = rows(repo, "r")
    assert len(ran) == 5 and all(r["status"] in ("keep", "discard") for r in ran), \
        [(r["status"], r["reason"]) for r in ran]
    for r in ran:
        assert "on node" in r["hardware"], r["hardware"]
        log = Path(r["log_path"]).read_text()
        assert "val_loss:" in log  # streamed back and written on the head
        assert json.loads(r["integrity"])["sandbox"]
    # Every worker's run directory was removed once its results came back.
    workers = Path(tempfile.gettempdir()) / WORKER_RUNS
    for r in ran:
        key = worker_key(Path(r["log_path"]).parent)
        assert not list(workers.glob(f"{key}-*")), r["id"]


def test_a_node_that_dies_mid_experiment_loses_it_and_it_runs_again(make_repo, cli_env,
                                                                     tmp_path) -> None:
    """The node running the baseline is removed while it runs: the run is `lost` and runs
    again on the node that is left; the ledger and the branch agree."""
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    doomed = c.add_node(num_cpus=1)
    c.wait_for_nodes()
    try:
        slow = train_py(0.001, extra="time.sleep(float(os.environ.get('SLOW', '0')))")
        repo = make_repo({"train.py": slow}, _ray_spec(
            c.address, strategy="perturb", budget=30, timeout=60,
            extra_run='env = { SLOW = "6" }\n'))
        proc = subprocess.Popen([*CLI, "run", "-t", "d", "-n", "2"], cwd=repo, env=cli_env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_until(lambda: any(r["status"] == "running" for r in rows(repo, "d")),
                 timeout=60, what="the baseline to start")
        time.sleep(1.5)
        c.add_node(num_cpus=1)
        c.remove_node(doomed)
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, out
        ran = rows(repo, "d")
        lost = [r for r in ran if r["status"] == "lost"]
        assert len(lost) == 1 and lost[0]["is_baseline"], [(r["status"], r["reason"]) for r in ran]
        assert "worker running it died" in lost[0]["reason"] or "node" in lost[0]["reason"]
        redone = [r for r in ran if r["retry_of"] == lost[0]["id"]]
        assert len(redone) == 1 and redone[0]["status"] == "keep"
        measured = [r for r in ran if r["status"] in ("keep", "discard")]
        assert len(measured) == 2  # nothing lost, nothing counted twice
        keeps = [r["kept_commit"] for r in ran if r["status"] == "keep"]
        assert git(repo, "rev-parse", "overnight/d") == keeps[-1]
    finally:
        c.shutdown()


@pytest.fixture
def background(cli_env: dict[str, str], tmp_path: Path) -> Iterator[Background]:
    bg = Background(cli_env, tmp_path)
    yield bg
    bg.cleanup()


def test_ctrl_c_cancels_ray_tasks_and_resume_redoes_them(make_repo, cli, cluster: Cluster,
                                                         background: Background) -> None:
    repo = make_repo({"train.py": train_py(0.001, HANG)}, _ray_spec(
        cluster.address, strategy="grid", grace=1, extra_run=UNBOXED + "\n"))
    proc = background(repo, "-n", "3", TEST_HANG="candidates")
    hung, pids = wait_for_hanging_candidate(repo, background)

    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=30) == 130, background.output()
    assert time.monotonic() - t0 < 10
    for pid in pids:  # the script and the child it started, on the worker
        wait_until(lambda pid=pid: not alive(pid), 10, f"experiment process {pid} to be gone")
    row = next(r for r in rows(repo, TAG) if r["id"] == hung["id"])
    assert row["status"] == "lost" and "interrupted" in row["reason"], row["reason"]
    assert not [r for r in rows(repo, TAG) if r["status"] in ("queued", "running")]

    out = cli("run", "-t", TAG, "-n", "3", cwd=repo, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    rs = rows(repo, TAG)
    redo = [r for r in rs if r["retry_of"] == hung["id"]]
    assert len(redo) == 1 and redo[0]["status"] in ("keep", "discard")
    assert len([r for r in rs if r["status"] != "lost"]) == 3


CLASSES = '[hardware]\nclasses = { fast = "fast", big = "big" }\n'


def test_each_class_has_its_own_baseline_and_measures_a_new_incumbent(make_repo, cli,
                                                                       cluster: Cluster):
    """Two kinds of node (custom resources stand in for H100 and H200): each class gets the
    baseline's run, and after a keep the new incumbent is measured on the other class before
    that class judges anything new."""
    toml = _ray_spec(cluster.address, strategy="perturb") + CLASSES
    repo = make_repo({"train.py": train_py(0.001)}, toml)
    out = cli("run", "-t", "c", "-n", "10", cwd=repo, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "(1 fast, 2 big)" in out.stdout
    rs = rows(repo, "c")
    assert {r["hw_class"] for r in rs} == {"fast", "big"}
    base = rs[0]
    assert base["is_baseline"] and base["status"] == "keep"
    other = {"fast": "big", "big": "fast"}[base["hw_class"]]
    assert [r["hw_class"] for r in rs if r["repeat_of"] == base["id"]] == [other]
    keeps = [r for r in rs if r["status"] == "keep" and not r["is_baseline"]]
    assert keeps, [(r["status"], r["description"]) for r in rs]
    ends = sorted(k["finished_at"] for k in keeps)
    for k in keeps:
        there = {"fast": "big", "big": "fast"}[k["hw_class"]]
        measured = [r for r in rs if r["repeat_of"] == k["id"] and r["hw_class"] == there]
        until = next((t for t in ends if t > k["finished_at"]), float("inf"))
        # Children of k that ran on the other class while k was the incumbent: each started
        # only once k had a number there.
        children = [r for r in rs if r["parent"] == k["commit_sha"] and r["repeat_of"] is None
                    and r["hw_class"] == there and r["started_at"]
                    and r["started_at"] < until]
        for c in children:
            assert measured and measured[0]["finished_at"] <= c["started_at"], (k, c)
        if k is not keeps[-1]:  # a later keep: the loop went on, so k was measured there
            assert measured, k


def test_screen_then_confirm_tiers(make_repo, cli, cluster: Cluster):
    toml = (_ray_spec(cluster.address, strategy="perturb", judge="") + CLASSES
            + 'screen = "fast"\nconfirm = "big"\n')
    repo = make_repo({"train.py": train_py(0.001)}, toml)
    out = cli("run", "-t", "s", "-n", "14", cwd=repo, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    rs = rows(repo, "s")
    base = rs[0]
    assert base["hw_class"] == "big"  # the reference: the confirm class
    firsts = [r for r in rs if r["repeat_of"] is None and not r["is_baseline"]
              and r["started_at"]]
    assert firsts and all(r["hw_class"] == "fast" for r in firsts)
    keeps = [r for r in rs if r["status"] == "keep" and not r["is_baseline"]]
    assert keeps, [(r["status"], r["hw_class"], r["reason"]) for r in rs]
    for k in keeps:  # every keep was confirmed on the confirm class, never on a screen draw
        assert any(r["repeat_of"] == k["id"] and r["hw_class"] == "big"
                   and r["status"] == "repeat" for r in rs), k
    status = cli("status", "-t", "s", cwd=repo).stdout
    assert "classes     numbers compare only within a class; big is the reference" in status
    assert "    big        baseline 1.300000 (3 runs)" in status
    assert "    fast       baseline" in status
    bad = make_repo({"train.py": train_py(0.001)}, _ray_spec(cluster.address) + CLASSES
                    + 'screen = "fast"\nconfirm = "big"\nreference = "fast"\n')
    refused = cli("run", "-t", "s", "-n", "2", cwd=bad)
    assert refused.returncode == 2 and "the reference is the confirm class" in refused.stderr


def test_kill_9_of_the_harness_kills_its_ray_tasks_and_resume_redoes_them(
        make_repo, cli, cli_env, cluster: Cluster) -> None:
    """The harness dies without a word: Ray owns its tasks and ends them with it, and the
    box dies with its worker (bwrap --die-with-parent); the next run marks the run lost and
    redoes it once. (An unboxed run, sandbox = "none", has no box to die with.)"""
    hang = "import time\nif LEARNING_RATE != 0.001:\n    time.sleep(300)\n"
    repo = make_repo({"train.py": train_py(0.001, hang)},
                     _ray_spec(cluster.address, strategy="grid", grace=1))
    proc = subprocess.Popen([*CLI, "run", "-t", TAG, "-n", "3"], cwd=repo, env=cli_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def hung() -> dict | None:
        return next((r for r in rows(repo, TAG) if r["status"] == "running"
                     and not r["is_baseline"] and r["run_dir"]), None)

    row = wait_until(hung, 60, "a candidate to be running")
    key = worker_key(Path(row["run_dir"]))
    workers = str(Path(tempfile.gettempdir()) / WORKER_RUNS / f"{key}-")

    def boxed() -> list[int]:
        found = []
        for p in psutil.process_iter():
            try:
                if p.cwd().startswith(workers):
                    found.append(p.pid)
            except psutil.Error:
                continue
        return found

    wait_until(boxed, 60, "the experiment to start on its worker")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    wait_until(lambda: not boxed(), 90, "the experiment to die with the harness's task")

    out = cli("run", "-t", TAG, "-n", "3", cwd=repo, timeout=120)  # redone: a timeout now
    assert out.returncode == 0, out.stdout + out.stderr
    rs = rows(repo, TAG)
    lost = next(r for r in rs if r["id"] == row["id"])
    assert lost["status"] == "lost"
    assert [r["retry_of"] for r in rs].count(row["id"]) == 1


def test_slots_follow_a_cluster_that_grows(make_repo, cli_env) -> None:
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    c.wait_for_nodes()
    try:
        slow = train_py(0.001, extra="time.sleep(float(os.environ.get('SLOW', '0')))")
        repo = make_repo({"train.py": slow}, _ray_spec(
            c.address, strategy="perturb", budget=30, timeout=60,
            extra_run='env = { SLOW = "1.5" }\n'))
        proc = subprocess.Popen([*CLI, "run", "-t", "g", "-n", "12"], cwd=repo, env=cli_env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_until(lambda: any(r["status"] == "running" for r in rows(repo, "g")),
                   timeout=60, what="the first run")
        c.add_node(num_cpus=2)
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, out
        assert "on 1 Ray slot(s)" in out and "the cluster grew: 2 more slot(s)" in out
        slots = {r["slot"] for r in rows(repo, "g") if r["started_at"]}
        assert slots == {0, 1, 2}, slots
    finally:
        c.shutdown()


def test_a_kept_runs_checkpoint_comes_back_to_the_head(make_repo, cli, cluster: Cluster):
    saves = train_py(0.001, extra="open('ckpt.bin', 'wb').write(b'weights' * 1000)")
    repo = make_repo({"train.py": saves}, _ray_spec(cluster.address, strategy="grid"))
    out = cli("run", "-t", "k", "-n", "3", cwd=repo, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    kept = [r for r in rows(repo, "k") if r["status"] == "keep"]
    assert kept
    for r in kept:  # keep_workdirs = "kept": the work tree as it ran, outputs included
        work = Path(r["run_dir"]) / "work"
        assert (work / "ckpt.bin").read_bytes() == b"weights" * 1000
        assert (work / "train.py").read_text().strip() == git(
            repo, "show", f"{r['commit_sha']}:train.py")
