"""Fixtures that start real lock backends on loopback and write configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests import REPO
from tests.functional import servers

BACKENDS = ["file", "redis", "zookeeper", "etcd", "memcached", "mysql", "postgresql"]


class Backend:
    """A running lock backend plus what a config file needs to use it."""

    def __init__(self, kind: str, server: servers.Server | None, state_root: str) -> None:
        self.kind = kind
        self.server = server
        self.state_root = state_root

    @property
    def lock_expiry(self) -> float:
        return self.server.lock_expiry if self.server else 0.0

    def url(self, state_path: str) -> str:
        if self.server is None:
            return f"file://{self.state_root}/coordination"
        return self.server.url

    def write_config(self, directory: str, **extra: object) -> str:
        """A config file for this backend; ``extra`` go to [coordination]."""
        state = os.path.join(directory, "state")
        coordination = {
            "lock_provider": "tooz",
            "backend_url": self.url(state),
            "initial_reconnect_backoff": 0.05,
            "max_reconnect_backoff": 1.0,
            "heartbeat": 0.5,
        }
        coordination.update(extra)
        path = os.path.join(directory, f"{self.kind}.conf")
        with open(path, "w") as f:
            f.write(f"[DEFAULT]\nstate_path = {state}\n[coordination]\n")
            for key, value in coordination.items():
                f.write(f"{key} = {value}\n")
        return path


@pytest.fixture(scope="module", params=BACKENDS)
def backend(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Backend]:
    kind = request.param
    root = str(tmp_path_factory.mktemp(f"backend-{kind}"))
    if kind == "file":
        yield Backend(kind, None, root)
        return
    cls = servers.SERVERS[kind]
    if not cls.available():
        pytest.fail(f"{kind} server binary {cls.binary!r} is not installed; run tools/bootstrap.sh")
    server = cls(workdir=os.path.join(root, "server"))
    os.makedirs(server.workdir, exist_ok=True)
    try:
        server.start()
        yield Backend(kind, server, root)
    finally:
        server.cleanup()


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def spawn_worker(*args: str, **popen: object) -> subprocess.Popen:
    """Start ``python -m tests.functional.lockworker ARGS`` in the repo root."""
    return subprocess.Popen(
        [sys.executable, "-m", "tests.functional.lockworker", *args],
        cwd=REPO,
        env=worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def finish(proc: subprocess.Popen, timeout: float) -> dict:
    """Wait for a worker; fail with its stderr if it failed; parse its JSON."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"worker did not finish within {timeout} s; stderr:\n{err[-3000:]}")
    assert proc.returncode == 0, f"worker exited {proc.returncode}; stderr:\n{err[-3000:]}"
    return json.loads(out.strip().splitlines()[-1])


def record(name: str, **values: object) -> None:
    """Print a measurement and append it to $RFSAA_RESULTS (JSON lines)."""
    line = json.dumps({"measure": name, **values})
    print(line)
    path = os.environ.get("RFSAA_RESULTS")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


# The unprivileged service user and its sudo rule, for every functional test.
from tests.functional.unprivileged import (  # noqa: E402, F401
    rootwrap_dir,
    service_user,
    service_venv,
)
