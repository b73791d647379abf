"""`overnight run` outlives its terminal: a closed stdout or a SIGHUP stops the output to
the terminal, never the loop; its own log under .overnight/ has every line."""

from __future__ import annotations

import signal
import subprocess

from conftest import CLI, rows, spec_toml, train_py, wait_until

SLOW = "import time\ntime.sleep(0.5)\n"


def test_a_closed_stdout_does_not_stop_the_loop(make_repo, cli_env) -> None:
    repo = make_repo({"train.py": train_py(0.001, SLOW)}, spec_toml("perturb"))
    proc = subprocess.Popen([*CLI, "run", "-t", "t", "-n", "4"], cwd=repo, env=cli_env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    proc.stdout.readline()  # `overnight run | head -1`
    proc.stdout.close()
    assert proc.wait(timeout=120) == 0
    assert len([r for r in rows(repo, "t") if r["status"] in ("keep", "discard")]) == 4
    log = (repo / ".overnight" / "run.log").read_text()
    assert "stopped: reached 4 runs" in log and "\x1b[" not in log


def test_a_hang_up_does_not_stop_the_loop(make_repo, cli_env) -> None:
    repo = make_repo({"train.py": train_py(0.001, SLOW)}, spec_toml("perturb"))
    proc = subprocess.Popen([*CLI, "run", "-t", "t", "-n", "4"], cwd=repo, env=cli_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: any(r["status"] == "running" for r in rows(repo, "t")), 60,
               "the first run")
    proc.send_signal(signal.SIGHUP)  # the SSH session dropped
    assert proc.wait(timeout=120) == 0
    assert len([r for r in rows(repo, "t") if r["status"] in ("keep", "discard")]) == 4
    assert not [r for r in rows(repo, "t") if r["status"] == "lost"]
