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


def test_detach_returns_once_the_loop_holds_its_tag(make_repo, cli) -> None:
    import os

    import psutil
    from conftest import alive

    repo = make_repo({"train.py": train_py(0.001, SLOW)}, spec_toml("perturb"))
    port = _free_port()
    out = cli("run", "--detach", "-t", "t", "-n", "5", "--dash", "--dash-port", str(port),
              cwd=repo)
    assert out.returncode == 0, out.stdout + out.stderr
    token = (repo / ".overnight" / "dash.token").read_text().strip()
    assert f"dashboard: http://127.0.0.1:{port}/#token={token}" in out.stdout
    assert "in the background" in out.stdout and "status --follow" in out.stdout
    pid = int(out.stdout.split("(pid ")[1].split(")")[0])
    assert alive(pid) and os.getsid(pid) == pid  # a session of its own: no terminal to lose
    assert psutil.Process(pid).cmdline()[-7:-3] == ["-t", "t", "-n", "5"]
    again = cli("run", "--detach", "-t", "t", "-n", "5", cwd=repo)
    assert again.returncode == 2 and "another `overnight run`" in again.stderr, again.stderr
    follow = cli("status", "--follow", "-t", "t", cwd=repo, timeout=120)
    assert follow.returncode == 0, follow.stderr
    assert "following tag t" in follow.stdout and "the loop stopped" in follow.stdout
    assert "stop: reached 5 runs" in follow.stdout, follow.stdout
    assert "keep" in follow.stdout or "discard" in follow.stdout
    assert "loop        pid" in follow.stdout  # status says a loop runs the tag
    wait_until(lambda: not alive(pid), 10, "the loop to exit")
    assert len([r for r in rows(repo, "t") if r["status"] in ("keep", "discard")]) == 5
    assert "stopped: reached 5 runs" in (repo / ".overnight" / "run.log").read_text()
    idle = cli("status", "--follow", "-t", "t", cwd=repo)
    assert idle.returncode == 0 and "no loop is running tag t" in idle.stdout


def test_detach_says_why_a_loop_did_not_start(make_repo, cli) -> None:
    toml = spec_toml("perturb").replace('editable = ["train.py"]', 'editable = ["nope.py"]')
    repo = make_repo({"train.py": train_py()}, toml)
    out = cli("run", "--detach", "-n", "2", cwd=repo)
    assert out.returncode == 2 and "nope.py" in out.stderr, out.stdout + out.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
