"""`overnight dash`: a live page over the ledger, on loopback, for looking in during the night.

It reads what the loop records (the ledger, git, the runs' logs) and acts only the way the
CLI does: a `control` event or a steering note in the ledger (overnight/human.py), which
the loop reads. It never runs a command, never serves a file by a name it was given, and
never shows a secret (runs never get any; the spec's are variable names, not values).

Who may look and act: whoever holds the token printed at start (also in
.overnight/dash.token, mode 0600). Every read of the ledger needs it (in the
X-Overnight-Token header, or the page's same-site cookie, which is how the chart image and
the event stream carry it): an experiment that can reach loopback (sandbox "user", or
network = true) must not read other runs through the page. An action needs it in the
header, which no other site's page can set. Only a Host the server was started for is
answered (a rebound DNS name pointing at 127.0.0.1 gets 421). Everything that comes from an
experiment or a model (descriptions, hypotheses, logs, diffs) is text on the page, set with
textContent, never markup; the chart is an <img> of an SVG, where no script runs.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import secrets
import sqlite3
import stat
import threading
import time
from importlib import resources
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from overnight.errors import ConfigError
from overnight.human import ACTIONS, loop_state, request
from overnight.ledger import Row, keeps_in_order
from overnight.status import NOT_COUNTED
from overnight.workspace import LEDGER_FILE, Workspace, default_tag

TOKEN_FILE = "dash.token"
TOKEN_HEADER = "x-overnight-token"
LOG_TAIL_BYTES = 16 * 1024
TICK_SECONDS = 1.0  # how often the event stream looks at the ledger
CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")
LOOPBACK = ("127.0.0.1", "localhost", "[::1]", "::1")


def write_token(state: Path) -> str:
    """A fresh token, in a file only this user can read (replaced on every start)."""
    token = secrets.token_urlsafe(24)
    path = state / TOKEN_FILE
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(token + "\n")
    return token


def allowed_hosts(host: str, port: int) -> set[str]:
    """The Host headers the page answers to: the address it listens on, and loopback's
    names when it listens there."""
    names = {host, f"[{host}]" if ":" in host and not host.startswith("[") else host}
    if host in LOOPBACK or host in ("0.0.0.0", "::"):
        names |= set(LOOPBACK)
    return {f"{n}:{port}" for n in names} | ({*names} if port == 80 else set())


class Dash:
    """The page's data and actions for one repository."""

    def __init__(self, ws: Workspace, tag: str | None, token: str, hosts: set[str]):
        self.ws, self.token, self.hosts = ws, token, hosts
        self.fixed_tag = tag
        self.port = 0  # set by the server once it listens (the cookie's name)
        self.page = resources.files(__package__).joinpath("page.html").read_text()
        self.script = resources.files(__package__).joinpath("app.js").read_text()

    # -- reading --------------------------------------------------------------------------

    def tag(self, asked: str | None) -> str:
        ledger = self.ws.ledger()
        try:
            tags = ledger.tags()
            tag = asked or self.fixed_tag or default_tag(ledger)
        finally:
            ledger.close()
        if tags and tag not in tags:
            raise ConfigError(f"no experiments with tag '{tag}'")
        return tag

    def state(self, tag: str) -> dict:
        ledger = self.ws.ledger()
        try:
            rows = ledger.experiments(tag)
            loop = loop_state(ledger, tag, self.ws.state)
            tags = ledger.tags()
            spent = ledger.spend(tag)
        finally:
            ledger.close()
        objective = self.ws.spec.objective
        keeps = keeps_in_order(rows)
        baseline = next((r for r in reversed(keeps) if r.is_baseline), None)
        return {
            "tag": tag, "tags": tags, "metric": objective.metric,
            "direction": objective.direction,
            "loop": {"running": loop.running, "paused": loop.paused,
                     "checkpoint": loop.checkpoint},
            "baseline": _brief(baseline), "best": _brief(keeps[-1] if keeps else None),
            "runs": sum(1 for r in rows if r.status not in NOT_COUNTED),
            "spent": {"tokens_in": spent[0], "tokens_out": spent[1], "usd": spent[2]},
            "rows": [_row(r) for r in rows],
            "now": time.time(),
        }

    def chart(self, tag: str) -> str:
        from overnight import chart

        ledger = self.ws.ledger()
        try:
            rows = ledger.experiments(tag)
        finally:
            ledger.close()
        return chart.svg(rows, self.ws.spec.objective, title=f"overnight/{tag}")

    def experiment(self, experiment_id: int) -> Row:
        ledger = self.ws.ledger()
        try:
            row = ledger.get(experiment_id)
        finally:
            ledger.close()
        if row is None:
            raise KeyError(experiment_id)
        return row

    def diff(self, row: Row) -> str:
        if row.is_baseline or not row.commit_sha or not row.parent:
            return "(the baseline: HEAD, unchanged)" if row.is_baseline else "(no commit)"
        return self.ws.repo.diff(row.parent, row.commit_sha)

    def log_tail(self, row: Row, size: int = LOG_TAIL_BYTES) -> str:
        """The end of a run's log: only a regular file under a runs directory, opened
        without following a link (a run may have put one where its log was)."""
        if not row.log_path:
            return ""
        from overnight.session import user_runs

        path = Path(row.log_path)
        roots = [self.ws.state / "runs", user_runs(self.ws)]
        real = Path(os.path.realpath(path))
        if not any(root.resolve() in real.parents for root in roots if root.exists()):
            return "(the log is not under a runs directory: not shown)"
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as e:
            return f"(no log: {e.strerror})"
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return "(the log is not a regular file: not shown)"
            f.seek(max(0, st.st_size - size))
            data = f.read(size)
        return data.decode("utf-8", errors="replace")

    def change_marker(self) -> int:
        """Grows with every write to the ledger (its journal's last entry)."""
        path = self.ws.state / LEDGER_FILE
        if not path.exists():
            return 0
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            return int(db.execute("SELECT COALESCE(MAX(seq), 0) FROM journal").fetchone()[0])
        except sqlite3.Error:
            return 0
        finally:
            db.close()

    # -- acting -----------------------------------------------------------------------------

    def authorized(self, req: Request) -> bool:
        """May act: the token in the header (a cross-site page cannot set one)."""
        return self._valid(req.headers.get(TOKEN_HEADER, ""))

    def may_read(self, req: Request) -> bool:
        """May read the ledger: the token in the header or in the page's cookie."""
        return self.authorized(req) or self._valid(req.cookies.get(self.cookie, ""))

    @property
    def cookie(self) -> str:
        return f"overnight_{self.port}"

    def _valid(self, given: str) -> bool:
        return bool(given) and hmac.compare_digest(given.encode(), self.token.encode())

    def act(self, tag: str, action: str, note: str) -> str:
        ledger = self.ws.ledger()
        try:
            if action == "steer":
                if not note.strip():
                    raise ConfigError("a steering note needs some text")
                ledger.add_note(note, tag)
                return f"noted for tag {tag}"
            return request(ledger, self.ws.state, tag, action, note, by="dashboard")
        finally:
            ledger.close()


def _brief(row: Row | None) -> dict | None:
    if row is None:
        return None
    return {"id": row.id, "value": row.value, "description": row.description}


def _row(r: Row) -> dict:
    return {
        "id": r.id, "status": r.status, "baseline": r.is_baseline, "repeat_of": r.repeat_of,
        "value": r.value, "metric": r.metric, "delta": r.delta, "runs": r.runs,
        "spread": r.spread, "description": r.description, "hypothesis": r.hypothesis,
        "reason": r.reason, "slot": r.slot, "hw_class": r.hw_class, "proposer": r.proposer,
        "started_at": r.started_at, "finished_at": r.finished_at, "cost_usd": r.cost_usd,
    }


def make_app(dash: Dash) -> Starlette:
    def page(req: Request) -> Response:
        return Response(dash.page, media_type="text/html; charset=utf-8")

    def script(req: Request) -> Response:
        return Response(dash.script, media_type="text/javascript; charset=utf-8")

    def refused() -> Response:
        return JSONResponse({"error": "this needs the dashboard's token (printed when `overnight "
                             f"dash` started, and in .overnight/{TOKEN_FILE}): open the "
                             "address it printed, or paste the token"}, status_code=401)

    def state(req: Request) -> Response:
        if not dash.may_read(req):
            return refused()
        try:
            tag = dash.tag(req.query_params.get("tag"))
        except ConfigError as e:
            return JSONResponse({"error": str(e)}, status_code=404)
        return JSONResponse(dash.state(tag))

    def chart(req: Request) -> Response:
        if not dash.may_read(req):
            return refused()
        try:
            tag = dash.tag(req.query_params.get("tag"))
        except ConfigError as e:
            return PlainTextResponse(str(e), status_code=404)
        return Response(dash.chart(tag), media_type="image/svg+xml")

    def _experiment(req: Request) -> Row | Response:
        if not dash.may_read(req):
            return refused()
        try:
            return dash.experiment(int(req.path_params["id"]))
        except (KeyError, ValueError):
            return PlainTextResponse("no such experiment", status_code=404)

    def diff(req: Request) -> Response:
        row = _experiment(req)
        if isinstance(row, Response):
            return row
        return PlainTextResponse(dash.diff(row))

    def log(req: Request) -> Response:
        row = _experiment(req)
        if isinstance(row, Response):
            return row
        return PlainTextResponse(dash.log_tail(row))

    async def events(req: Request) -> Response:
        if not dash.may_read(req):
            return refused()

        async def stream():  # noqa: ANN202
            last = -1
            beat = 0.0
            while not await req.is_disconnected():
                marker = await asyncio.to_thread(dash.change_marker)
                if marker != last:
                    last = marker
                    yield f"event: change\ndata: {marker}\n\n"
                elif time.monotonic() - beat > 2:
                    yield "event: tick\ndata: {}\n\n"  # running logs grow between writes
                    beat = time.monotonic()
                await asyncio.sleep(TICK_SECONDS)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"X-Accel-Buffering": "no"})

    async def action(req: Request) -> Response:
        if not dash.authorized(req):
            return JSONResponse({"error": "this action needs the dashboard's token (printed "
                                 "when `overnight dash` started, and in .overnight/"
                                 f"{TOKEN_FILE}): paste it in the token box"}, status_code=403)
        try:
            body = json.loads(await req.body() or b"{}")
            what = str(body.get("action", ""))
            note = str(body.get("note") or "")
        except (ValueError, AttributeError):
            return JSONResponse({"error": "send JSON: {\"action\": ..., \"note\": ...}"},
                                status_code=400)
        if what not in (*ACTIONS, "steer"):
            return JSONResponse({"error": f"unknown action {what!r}"}, status_code=400)
        try:
            tag = dash.tag(req.query_params.get("tag"))
            said = await asyncio.to_thread(dash.act, tag, what, note)
        except ConfigError as e:
            return JSONResponse({"error": str(e)}, status_code=409)
        return JSONResponse({"ok": said})

    app = Starlette(routes=[
        Route("/", page), Route("/app.js", script), Route("/api/state", state),
        Route("/chart.svg", chart), Route("/api/experiments/{id:int}/diff", diff),
        Route("/api/experiments/{id:int}/log", log), Route("/events", events),
        Route("/api/action", action, methods=["POST"]),
    ])
    return _Guard(app, dash)


class _Guard:
    """Before anything: the Host must be one the server was started for (DNS rebinding),
    an action may not come from another origin; every answer gets the page's policy."""

    HEADERS = [(b"content-security-policy", CSP.encode()),
               (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
               (b"cache-control", b"no-store"), (b"x-frame-options", b"DENY")]

    def __init__(self, app: Starlette, dash: Dash):
        self.app, self.dash = app, dash

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        origin = headers.get("origin")
        refused = None
        if host not in self.dash.hosts:
            refused = (421, f"this dashboard does not answer to host {host!r}")
        elif scope["method"] != "GET" and origin is not None \
                and origin.split("://", 1)[-1] not in self.dash.hosts:
            refused = (403, "actions from another origin are refused")
        if refused is not None:
            return await PlainTextResponse(refused[1], status_code=refused[0])(
                scope, receive, send)

        async def secured(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self.HEADERS]
            await send(message)

        await self.app(scope, receive, secured)


class Server:
    """uvicorn on a thread (beside `overnight run --dash`) or in the foreground."""

    def __init__(self, ws: Workspace, tag: str | None, host: str, port: int):
        import socket

        import uvicorn

        ws.state.mkdir(parents=True, exist_ok=True)
        self.token = write_token(ws.state)
        self.dash = Dash(ws, tag, self.token, allowed_hosts(host, port))
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host.strip("[]"), port))
        except OSError as e:
            self.sock.close()
            raise ConfigError(f"the dashboard cannot listen on {host}:{port}: {e.strerror}; "
                              "pass another --port (or --dash-port)") from None
        self.port = self.sock.getsockname()[1]
        self.dash.port = self.port
        if port == 0:  # the port the system chose
            self.dash.hosts = allowed_hosts(host, self.port)
        self.host = host
        config = uvicorn.Config(make_app(self.dash), log_level="warning", access_log=False,
                                lifespan="off", timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        shown = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{shown}:{self.port}/#token={self.token}"

    def serve(self) -> None:
        """In the foreground, until Ctrl-C."""
        self.server.run(sockets=[self.sock])

    def start(self) -> None:
        """On a thread: the loop goes on in the foreground."""
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True, name="overnight-dash")
        self.thread.start()

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=5)
