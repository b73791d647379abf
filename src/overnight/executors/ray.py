"""The Ray executor: each experiment is a Ray task that runs the runner on a worker.

    executor = RayExecutor(spec.ray)      # joins the cluster at [ray] address
    future = executor.submit(request)     # a RunResult, like the local executor's

The candidate's tree travels inside the request, through Ray's object store: no shared
file system is assumed. On the worker the task writes it into a run directory of its own
(under the worker's temporary directory), runs it with the same runner as a local slot (the
same box, deadline, integrity checks), and streams the output back as it comes: the harness
writes `run.log` in the run's directory on the head, so `overnight show` and the progress
lines work as for local runs. When the run ends the worker's log (bounded like a local one),
the attestation and the artifacts come back with the result, and the worker's directory is
removed.

Ray never retries (`max_retries=0`): the ledger owns retries, so a rerun is recorded and
never lands on another machine unnoticed. A worker or node that dies is a `lost` run, which
the loop reruns. `cancel_all` cancels every task; the box dies with its worker process
(bubblewrap's --die-with-parent), so nothing outlives a cancel.

Ray is an optional dependency (`pip install 'overnight[ray]'`), imported only here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import os
import queue
import shutil
import tarfile
import tempfile
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from overnight.errors import ConfigError
from overnight.executors import runner
from overnight.executors.base import CheckResult, Executor, RunRequest, RunResult

if TYPE_CHECKING:
    from overnight.spec import Hardware, RaySpec

BRING_BACK_MAX_BYTES = 256 << 20  # artifacts a run sends back to the head, at most
OUTPUTS_MAX_BYTES = 1 << 30  # files a run wrote in its work tree (checkpoints), at most
CANCEL_GRACE_SECONDS = 10  # after a polite cancel, before the worker is killed


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError('[run] executor = "ray" needs Ray: pip install \'overnight[ray]\' '
                          "(on the head and on every worker)") from None
    return ray


class RayExecutor(Executor):
    def __init__(self, cfg: RaySpec, grace: float = 5.0, hw: Hardware | None = None) -> None:
        ray = _ray()
        if not ray.is_initialized():
            try:
                ray.init(address=cfg.address, log_to_driver=False, logging_level="ERROR",
                         runtime_env=cfg.runtime_env or None)
            except ConnectionError as e:
                raise ConfigError(f"cannot join the Ray cluster at [ray] address = "
                                  f"{cfg.address!r}: {e}. Start one (`ray start --head`) or "
                                  "set the address of its head") from None
        self.cfg = cfg
        self.grace = grace
        self.cfg_named = bool(hw and hw.classes)
        self.classes = _classes(ray, hw.classes if hw else {})  # name -> resource ("": none)
        per_class = self._slots_per_class(ray)
        self._slot_classes = [c for c, n in per_class.items() for _ in range(n)]
        if cfg.max_slots is not None:
            self._slot_classes = _spread(per_class, cfg.max_slots)
        self.slots = len(self._slot_classes)
        if self.slots < 1:
            raise ConfigError(
                f"the Ray cluster has no room for one slot of {cfg.slot_resources} (it has "
                f"{_shown(ray.cluster_resources())}): add nodes with those resources, or set "
                "[ray] slot_resources to what a node has, e.g. { CPU = 1 }")
        self._run: dict[str, Any] = {}
        self._check: dict[str, Any] = {}
        self._warm = []
        for name, key in list(self.classes.items()):
            # A class's runs ask for a sliver of its resource, so Ray places them only on
            # its nodes: each class is measured against itself.
            self._add_class(ray, name, key)
            # Ray starts a worker process per concurrent task the first time (seconds each
            # on a busy node): start them now, while the baseline runs.
            options = _options({**cfg.slot_resources, **({key: 0.001} if key else {})})
            warm = ray.remote(_warm).options(max_retries=0, **options)
            self._warm += [warm.remote() for _ in range(per_class.get(name, 0))]
        self._pool = ThreadPoolExecutor(max_workers=256,  # one per run; the cluster may grow
                                        thread_name_prefix="overnight-ray")
        self._live: dict[int, Any] = {}  # experiment id -> its task (an ObjectRefGenerator)
        self._lock = threading.Lock()
        self._cancelled = threading.Event()

    @property
    def slot_classes(self) -> list[str]:
        return list(self._slot_classes)

    def grow(self) -> list[str]:
        """Slots on nodes that joined since the start (or the last call), unless
        [ray] max_slots fixes the number. A node that leaves takes its runs with it (they are
        lost and run again); its slots stay, their tasks waiting in Ray for room."""
        if self.cfg.max_slots is not None:
            return []
        ray = _ray()
        if not self.cfg_named:
            for name, key in _classes(ray, {}).items():
                if name not in self.classes and key:
                    self._add_class(ray, name, key)
        have = {c: self._slot_classes.count(c) for c in self.classes}
        new: list[str] = []
        for name, n in self._slots_per_class(ray).items():
            new += [name] * max(0, n - have.get(name, 0))
        self._slot_classes += new
        self.slots = len(self._slot_classes)
        return new

    def _add_class(self, ray: Any, name: str, key: str) -> None:
        self.classes[name] = key
        options = _options({**self.cfg.slot_resources, **({key: 0.001} if key else {})})
        self._run[name] = ray.remote(_run_remote).options(max_retries=0, **options)
        self._check[name] = ray.remote(_check_remote).options(max_retries=0, **options)

    def capacity(self) -> int:
        """How many slots the cluster holds now."""
        return sum(self._slots_per_class(_ray()).values())

    def _slots_per_class(self, ray: Any) -> dict[str, int]:
        """Slots of `slot_resources` each class's live nodes can hold."""
        out = {name: 0 for name in self.classes}
        for node in ray.nodes():
            if not node.get("Alive"):
                continue
            res = node.get("Resources", {})
            fits = min((math.floor(res.get(k, 0) / v) for k, v in self.cfg.slot_resources.items()
                        if v > 0), default=0)
            for name, key in self.classes.items():
                if not key or res.get(key, 0) > 0:
                    out[name] += fits
                    break
        return out

    # -- runs ---------------------------------------------------------------------------

    def submit(self, request: RunRequest) -> Future[RunResult]:
        return self._pool.submit(self._drive, request)

    def _drive(self, req: RunRequest) -> RunResult:
        ray = _ray()
        started = time.time()
        if self._cancelled.is_set():
            return RunResult("lost", None, started, started, reason="interrupted before start")
        _fresh_local(req.run_dir)
        task = self._run[self._class(req)].remote(_carry_env(req))
        with self._lock:
            self._live[req.experiment_id] = task
        result: RunResult | None = None
        try:
            with open(req.log_path, "ab", buffering=0) as log:
                for ref in task:
                    kind, *payload = ray.get(ref)
                    if kind == "log":
                        log.write(payload[0])
                    else:
                        result, bundle = payload
            if result is None:
                raise RuntimeError("the task ended without a result")
            req.tree.write(req.workdir)  # the work tree as it ran: the commit, then its outputs
            _unpack(bundle, req.run_dir, keep=set(req.tree.by_path))
            return result
        except Exception as e:  # noqa: BLE001 - every way a remote run can fail is `lost`
            return RunResult("lost", None, started, time.time(), reason=_why_lost(e, ray))
        finally:
            with self._lock:
                self._live.pop(req.experiment_id, None)

    def submit_checks(self, request: RunRequest, command: str,
                      timeout: float) -> Future[CheckResult]:
        def drive() -> CheckResult:
            ray = _ray()
            try:
                ok, reason, log = ray.get(self._check[self._class(request)].remote(
                    _carry_env(request), command, timeout))
            except Exception as e:  # noqa: BLE001
                return CheckResult(False, f"the checks could not run: {_why_lost(e, ray)}")
            path = request.run_dir / "checks.log"
            path.write_bytes(log)
            return CheckResult(ok, reason, path)

        return self._pool.submit(drive)

    def _class(self, req: RunRequest) -> str:
        return req.hw_class if req.hw_class in self._run else next(iter(self._run))

    def cancel_all(self) -> None:
        """Cancel every task: politely (the runner stops its process group, TERM then KILL),
        then, for a task still there after the grace, by killing its worker."""
        self._cancelled.set()
        ray = _ray()
        with self._lock:
            tasks = list(self._live.values())
        for task in tasks:
            _cancel(ray, task, force=False)
        deadline = time.monotonic() + self.grace + CANCEL_GRACE_SECONDS
        while time.monotonic() < deadline:
            with self._lock:
                if not self._live:
                    return
            time.sleep(0.1)
        with self._lock:
            tasks = list(self._live.values())
        for task in tasks:
            _cancel(ray, task, force=True)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


def _carry_env(req: RunRequest) -> RunRequest:
    """The worker's environment is not the harness's: the variables `[run] allow_env` lets
    the experiment see travel with the request, with the values they have here."""
    carried = {k: os.environ[k] for k in req.allow_env if k in os.environ}
    return dataclasses.replace(req, env={**carried, **req.env})


def _classes(ray: Any, named: dict[str, str]) -> dict[str, str]:
    """Class name -> the Ray resource its nodes have: as [hardware] classes says, or one
    class per accelerator type in the cluster (`accelerator_type:H100` -> "H100"), or a
    single class "cpu" ("" : no resource to ask for)."""
    if named:
        return dict(named)
    kinds = sorted({k.split(":", 1)[1] for n in ray.nodes() if n.get("Alive")
                    for k in n.get("Resources", {}) if k.startswith("accelerator_type:")})
    if kinds:
        return {kind: f"accelerator_type:{kind}" for kind in kinds}
    return {"cpu": ""}


def _spread(per_class: dict[str, int], cap: int) -> list[str]:
    """At most `cap` slots, taken from the classes in turn (each keeps a share)."""
    left = dict(per_class)
    out: list[str] = []
    while len(out) < cap and any(left.values()):
        for name in left:
            if left[name] and len(out) < cap:
                out.append(name)
                left[name] -= 1
    return out


def _cancel(ray: Any, task: Any, force: bool) -> None:
    try:
        ray.cancel(task, force=force)
    except Exception:  # noqa: BLE001, S110 - already finished: nothing to cancel
        pass


def _why_lost(e: BaseException, ray: Any) -> str:
    exc = ray.exceptions
    if isinstance(e, exc.TaskCancelledError):
        return "interrupted (the loop was stopped)"
    if isinstance(e, (exc.WorkerCrashedError, exc.NodeDiedError, exc.ObjectLostError,
                      exc.OwnerDiedError)):
        return f"the Ray worker running it died ({type(e).__name__}): it runs again"
    return f"the Ray task failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"


def _options(resources: dict[str, float]) -> dict[str, Any]:
    """Ray task options asking for one slot's resources."""
    custom = {k: v for k, v in resources.items() if k not in ("CPU", "GPU", "memory")}
    out: dict[str, Any] = {"num_cpus": resources.get("CPU", 0),
                           "num_gpus": resources.get("GPU", 0)}
    if "memory" in resources:
        out["memory"] = resources["memory"]
    if custom:
        out["resources"] = custom
    return out


def _shown(resources: dict[str, float]) -> str:
    keep = {k: v for k, v in resources.items() if not k.startswith(("node:", "object_store"))}
    return ", ".join(f"{k} {v:g}" for k, v in sorted(keep.items())) or "nothing"


def _fresh_local(run_dir: Path) -> None:
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
    run_dir.mkdir(mode=0o700)


# -- on the worker ---------------------------------------------------------------------------


WORKER_RUNS = "overnight-ray-runs"


def worker_key(run_dir: Path) -> str:
    """The prefix of the worker directories of the head's run directory `run_dir`."""
    return hashlib.sha256(str(run_dir).encode()).hexdigest()[:16]


def _worker_dir(req: RunRequest) -> Path:
    base = Path(tempfile.gettempdir()) / WORKER_RUNS
    base.mkdir(mode=0o711, exist_ok=True)
    return base / f"{worker_key(req.run_dir)}-{uuid.uuid4().hex[:8]}"


def _warm() -> None:
    """Nothing: a task that makes Ray start a worker process (and import overnight in it)."""
    from overnight.executors import runner  # noqa: F401 - the import is the point


_NODES: dict[str, tuple[str, str]] = {}  # node id -> (accelerator type, address): per process


def hardware() -> str:
    """What this worker is: its accelerator type (Ray's `accelerator_type:*` resource) or
    CPU model, and its node."""
    import ray

    from overnight.executors.local import cpu_name

    ctx = ray.get_runtime_context()
    node = ctx.get_node_id()
    if node not in _NODES:  # ray.nodes() asks the head: once per worker process
        for n in ray.nodes():
            kinds = [k.split(":", 1)[1] for k in n.get("Resources", {})
                     if k.startswith("accelerator_type:")]
            _NODES[n.get("NodeID", "")] = (kinds[0] if kinds else "",
                                           n.get("NodeManagerAddress", ""))
    kind, address = _NODES.get(node, ("", ""))
    gpus = ctx.get_accelerator_ids().get("GPU", [])
    what = f"{kind} (gpu {','.join(gpus)})" if kind or gpus else f"{cpu_name()} (cpu)"
    return f"{what} on node {address or node[:8]}"


def _run_remote(req: RunRequest):  # noqa: ANN202 - a generator of ("log", bytes) then result
    """The Ray task: run `req` here, yielding its output as it comes, then the result."""
    import ray

    local = dataclasses.replace(req, run_dir=_worker_dir(req))
    chunks: queue.SimpleQueue[bytes] = queue.SimpleQueue()
    cancel = threading.Event()
    box: dict[str, Any] = {}
    gpus = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])

    def go() -> None:
        box["result"] = runner.run(local, cancel, hardware(), ",".join(gpus) or None,
                                   on_output=chunks.put)

    thread = threading.Thread(target=go, name="overnight-run", daemon=True)
    thread.start()
    try:
        while thread.is_alive() or not chunks.empty():
            batch = _drain(chunks, 0.25)
            if batch:
                yield ("log", batch)
        yield ("result", box["result"], _pack(local))
    except BaseException:  # cancelled: stop the run (TERM, grace, KILL) before going
        cancel.set()
        thread.join(timeout=req.kill_grace_seconds + 5)
        raise
    finally:
        shutil.rmtree(local.run_dir, ignore_errors=True)


def _check_remote(req: RunRequest, command: str, timeout: float) -> tuple[bool, str, bytes]:
    import ray

    local = dataclasses.replace(req, run_dir=_worker_dir(req))
    local.run_dir.mkdir(mode=0o700)
    gpus = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
    try:
        done = runner.check(local, command, timeout, threading.Event(), ",".join(gpus) or None)
        log = done.log_path.read_bytes() if done.log_path and done.log_path.exists() else b""
        return done.ok, done.reason, log
    finally:
        shutil.rmtree(local.run_dir, ignore_errors=True)


def _drain(chunks: queue.SimpleQueue[bytes], wait: float) -> bytes:
    out = bytearray()
    try:
        out += chunks.get(timeout=wait)
        while len(out) < (1 << 20):
            out += chunks.get_nowait()
    except queue.Empty:
        pass
    return bytes(out)


def _pack(local: RunRequest) -> bytes:
    """What comes back to the head: the bounded log, the attestation, the artifacts (up to
    BRING_BACK_MAX_BYTES), as a tar of regular files only."""
    out = io.BytesIO()
    budget = BRING_BACK_MAX_BYTES
    with tarfile.open(fileobj=out, mode="w") as tar:
        for rel in ("run.log", "eval.log", "attest", "artifacts"):
            path = local.run_dir / rel
            files = [path] if path.is_file() else sorted(p for p in path.rglob("*")) \
                if path.is_dir() else []
            for f in files:
                if f.is_symlink() or not f.is_file():
                    continue
                size = f.stat().st_size
                if size > budget:
                    continue
                budget -= size
                tar.add(f, arcname=str(f.relative_to(local.run_dir)), recursive=False)
        _pack_outputs(tar, local)
    return out.getvalue()


def _pack_outputs(tar: tarfile.TarFile, local: RunRequest) -> None:
    """The files the run wrote in its work tree (a checkpoint: "in the morning, a better
    model"), smallest first within OUTPUTS_MAX_BYTES; what does not fit is listed in
    `outputs-left-behind.txt`."""
    committed = set(local.tree.by_path)
    data = {rel for rel, _ in local.data}
    found = []
    for f in local.workdir.rglob("*"):
        rel = f.relative_to(local.workdir).as_posix()
        if rel in committed or "__pycache__" in rel.split("/") or f.is_symlink() \
                or not f.is_file() or any(rel == d or rel.startswith(d + "/") for d in data):
            continue
        found.append((f.stat().st_size, rel, f))
    budget, left = OUTPUTS_MAX_BYTES, []
    for size, rel, f in sorted(found):
        if size > budget:
            left.append(f"{rel} ({size} bytes)")
            continue
        budget -= size
        tar.add(f, arcname=f"work/{rel}", recursive=False)
    if left:
        note = ("Left on the worker (over the bring-back limit):\n" + "\n".join(left)).encode()
        info = tarfile.TarInfo("outputs-left-behind.txt")
        info.size = len(note)
        tar.addfile(info, io.BytesIO(note))


def _unpack(bundle: bytes, run_dir: Path, keep: set[str] = frozenset()) -> None:
    """Write what a worker sent back into the run's directory on the head: regular files
    with plain relative names only (a tar can name anything), never over a committed file
    of the work tree (`keep`)."""
    with tarfile.open(fileobj=io.BytesIO(bundle), mode="r") as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            if not member.isfile() or member.name.startswith("/") or ".." in parts:
                continue
            if parts[0] == "work" and "/".join(parts[1:]) in keep:
                continue
            dest = run_dir.joinpath(*parts)
            dest.parent.mkdir(parents=True, exist_ok=True)
            root = run_dir.resolve()
            if root not in dest.parent.resolve().parents and dest.parent.resolve() != root:
                continue  # a committed link on the way leads out: never written through
            data = tar.extractfile(member)
            if data is None:
                continue
            if dest.is_symlink():
                dest.unlink()
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                shutil.copyfileobj(data, f)
            os.replace(tmp, dest)
