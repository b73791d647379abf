"""`overnight dash` on real loops: a real uvicorn server on loopback, real HTTP, and the page
in headless Chromium; the loop really pauses, takes notes and approves from the page."""

from __future__ import annotations

import re
import sqlite3
import stat
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from browser import page, screenshot
from conftest import CLI, rows, spec_toml, train_py, wait_until
from test_human import SLOW, events, human

from overnight.dashboard import TOKEN_FILE, Server
from overnight.ledger import Ledger
from overnight.workspace import Workspace

HOSTILE = '<img src=x onerror="document.title=\'pwned\'"><script>document.title="pwned"</script>'


@pytest.fixture
def finished_repo(make_repo, cli) -> Path:
    repo = make_repo({"train.py": train_py(0.001)}, spec_toml("perturb"))
    out = cli("run", "-t", "t", "-n", "3", cwd=repo)
    assert out.returncode == 0, out.stdout + out.stderr
    return repo


@pytest.fixture
def server(finished_repo: Path):
    srv = Server(Workspace.open(finished_repo), None, "127.0.0.1", 0)
    srv.start()
    wait_until(lambda: srv.server.started, 10, "the server")
    yield srv
    srv.stop()


def base(srv: Server) -> str:
    return f"http://127.0.0.1:{srv.port}"


def test_reads_and_actions_need_the_token(server: Server) -> None:
    token_file = Path(server.dash.ws.state) / TOKEN_FILE
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert token_file.read_text().strip() == server.token
    page_ = httpx.get(base(server) + "/")  # the page itself holds no data
    assert page_.status_code == 200 and "script-src 'self'" in page_.headers[
        "content-security-policy"]
    # An experiment that can reach loopback reads nothing without the token.
    for path in ("/api/state", "/chart.svg", "/events", "/api/experiments/1/diff",
                 "/api/experiments/1/log"):
        assert httpx.get(base(server) + path).status_code == 401, path
        assert httpx.get(base(server) + path, cookies={f"overnight_{server.port}": "guess"}
                         ).status_code == 401, path
    key = {"X-Overnight-Token": server.token}
    state = httpx.get(base(server) + "/api/state", headers=key).json()
    assert state["tag"] == "t" and len(state["rows"]) == len(rows(server.dash.ws.repo.root))
    chart = httpx.get(base(server) + "/chart.svg",
                      cookies={f"overnight_{server.port}": server.token})
    assert chart.text.startswith("<svg")
    # DNS rebinding: a name that resolves to 127.0.0.1 is still not this page's host.
    rebound = httpx.get(base(server) + "/api/state", headers={**key, "Host": "evil.example:80"})
    assert rebound.status_code == 421
    act = base(server) + "/api/action"
    assert httpx.post(act, json={"action": "pause"}).status_code == 403
    assert httpx.post(act, json={"action": "pause"},
                      headers={"X-Overnight-Token": "guess"}).status_code == 403
    other = httpx.post(act, json={"action": "pause"}, headers={
        "X-Overnight-Token": server.token, "Origin": "http://evil.example"})
    assert other.status_code == 403
    # With the token, an action on a tag no loop runs says so (the CLI's exit 2).
    idle = httpx.post(act, json={"action": "pause"}, headers={"X-Overnight-Token": server.token})
    assert idle.status_code == 409 and "no `overnight run` is running" in idle.json()["error"]
    steer = httpx.post(act, json={"action": "steer", "note": "try warmup"},
                       headers={"X-Overnight-Token": server.token})
    assert steer.status_code == 200
    db = sqlite3.connect(server.dash.ws.state / "ledger.sqlite")
    assert db.execute("SELECT text FROM notes").fetchall() == [("try warmup",)]
    db.close()
    assert httpx.post(act, json={"action": "rm -rf /"}, headers={
        "X-Overnight-Token": server.token}).status_code == 400


def test_a_log_replaced_by_a_link_is_not_followed(server: Server, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("the harness's secret")
    row = rows(server.dash.ws.repo.root)[-1]
    log = Path(row["log_path"])
    if not log.exists():
        log.parent.mkdir(parents=True, exist_ok=True)
    log.unlink(missing_ok=True)
    log.symlink_to(secret)
    key = {"X-Overnight-Token": server.token}
    got = httpx.get(f"{base(server)}/api/experiments/{row['id']}/log", headers=key)
    assert got.status_code == 200 and "secret" not in got.text
    assert httpx.get(f"{base(server)}/api/experiments/99999/log", headers=key
                     ).status_code == 404


def test_untrusted_text_is_shown_never_run(server: Server) -> None:
    ws = server.dash.ws
    ledger = Ledger(ws.state / "ledger.sqlite", head=ws.repo.root / ".git" / "overnight" /
                    "ledger-head")
    try:
        rid = ledger.insert("x", "discard", description=HOSTILE, hypothesis=HOSTILE,
                            reason=HOSTILE, metric=1.5)
    finally:
        ledger.close()
    with page() as pg:
        pg.goto(f"{base(server)}/?tag=x#token={server.token}")
        pg.wait_for_selector(f"#ledger tr[data-id='{rid}']")
        pg.click(f"#ledger tr[data-id='{rid}']")
        pg.wait_for_function("document.querySelector('#detail-facts').textContent.length > 0")
        assert pg.title() == "overnight"
        assert pg.query_selector("img[src=x]") is None
        assert HOSTILE in pg.text_content(f"#ledger tr[data-id='{rid}']")
        assert HOSTILE in pg.text_content("#detail-facts")
        assert pg.evaluate("location.hash") == ""  # the token left the address bar


def _start_with_dash(repo: Path, env: dict[str, str], *args: str) -> tuple[subprocess.Popen,
                                                                           str]:
    proc = subprocess.Popen([*CLI, "run", "-t", "t", "--dash", "--dash-port", "0", *args],
                            cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        m = re.search(r"dashboard: (http://\S+)", line)
        if m:
            return proc, m.group(1)
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError("the dashboard's address was never printed")


def _drain(proc: subprocess.Popen) -> None:
    """Keep reading the loop's output so that it never blocks on a full pipe."""
    import threading

    threading.Thread(target=proc.stdout.read, daemon=True).start()


def test_the_page_follows_a_running_loop_and_acts_on_it(make_repo, cli_env) -> None:
    toml = spec_toml("perturb") + human(checkpoint_every="4 experiments")
    repo = make_repo({"train.py": train_py(0.001, SLOW)}, toml)
    proc, url = _start_with_dash(repo, cli_env, "-n", "7")
    _drain(proc)
    try:
        with page() as pg:
            pg.goto(url)
            pg.wait_for_selector("#ledger tbody tr[data-id]", timeout=60_000)
            shown = pg.eval_on_selector_all("#ledger tbody tr[data-id]", "rs => rs.length")
            # A finished experiment appears without a reload.
            pg.wait_for_function(f"document.querySelectorAll('#ledger tbody tr[data-id]')"
                                 f".length > {shown}", timeout=60_000)
            pg.wait_for_function("document.querySelector('#chart').complete && "
                                 "document.querySelector('#chart').naturalWidth > 0",
                                 timeout=15_000)
            # The checkpoint holds the loop; Approve (with a note) lets it go on.
            pg.wait_for_function("document.querySelector('#state').textContent"
                                 ".includes('waiting for approval')", timeout=90_000)
            screenshot(pg, "dashboard-checkpoint")
            pg.fill("#note", "prefer smaller steps")
            pg.click("#approve")
            wait_until(lambda: events(repo, "t", "approved"), 15, "the approval")
            assert events(repo, "t", "control")[-1]["message"].count("dashboard")
            # Pause from the page: nothing new starts.
            pg.click("#pause")
            wait_until(lambda: events(repo, "t", "paused"), 15, "the pause")
            wait_until(lambda: not [r for r in rows(repo, "t") if r["status"] == "running"],
                       30, "what runs to finish")
            held = len(rows(repo, "t"))
            pg.wait_for_function("document.querySelector('#state').textContent == 'paused'",
                                 timeout=15_000)
            time.sleep(2.5)
            assert len(rows(repo, "t")) == held
            # Steer from the page: a note for the proposer.
            pg.fill("#note", "try a larger learning rate")
            pg.click("#steer")
            pg.wait_for_function("document.querySelector('#said').textContent"
                                 ".includes('noted')", timeout=15_000)
            # Without the token, an action is refused and nothing changes.
            pg.fill("#token", "")
            pg.click("#unpause")
            pg.wait_for_function("document.querySelector('#said').className == 'error'",
                                 timeout=15_000)
            assert "token" in pg.text_content("#said")
            time.sleep(1.5)
            assert not events(repo, "t", "unpaused") and len(rows(repo, "t")) == held
            screenshot(pg, "dashboard")
            pg.fill("#token", (repo / ".overnight" / TOKEN_FILE).read_text().strip())
            pg.click("#unpause")
            wait_until(lambda: events(repo, "t", "unpaused"), 15, "the unpause")
        assert proc.wait(timeout=120) == 0
    finally:
        proc.kill()
    notes = sqlite3.connect(repo / ".overnight" / "ledger.sqlite").execute(
        "SELECT text FROM notes ORDER BY id").fetchall()
    assert notes == [("prefer smaller steps",), ("try a larger learning rate",)]
    counted = [r for r in rows(repo, "t") if r["status"] not in ("rejected", "lost")]
    assert len(counted) == 7


def test_dash_refuses_a_port_in_use(finished_repo: Path, cli) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = cli("dash", "--port", str(port), cwd=finished_repo)
    assert out.returncode == 2 and "cannot listen" in out.stderr, out.stderr
    assert cli("dash", "--tag", "nope", cwd=finished_repo).returncode == 2
