"""What the Cinder tests need on the pytest side: cinder.conf, the database, workers.

Nothing here imports Cinder: each Cinder process (a worker of
tests/functional/cinder_worker.py, or the real ``cinder-volume``) is a child
process, patched by eventlet or not as its environment says, and this module
only writes its config, makes its database with ``cinder-manage db sync`` and
reads what it prints.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests import REPO
from tests.functional.conftest import worker_env

BIN = os.path.dirname(sys.executable)
MODES = {"eventlet": {}, "threading": {"OS_CINDER_DISABLE_EVENTLET_PATCHING": "1"}}


def cinder_installed() -> None:
    """Fail (never skip) when Cinder is missing: README's test command installs it."""
    for tool in ("cinder-manage", "cinder-volume"):
        if not os.path.exists(os.path.join(BIN, tool)):
            pytest.fail(
                f"{tool} is not in {BIN}: Cinder is not installed; run tools/bootstrap.sh "
                f"--test (it installs remotefs_aa[test], which includes cinder)"
            )


def write_conf(
    directory: str,
    backend: str,
    driver: str,
    options: dict[str, object],
    *,
    host: str = "cinder-1",
    cluster: str | None = None,
    database: str | None = None,
    backend_url: str | None = None,
    coordination: dict[str, object] | None = None,
    default: dict[str, object] | None = None,
) -> str:
    """A cinder.conf for one backend of ours; its state under ``directory``/state."""
    state = os.path.join(directory, "state")
    os.makedirs(state, exist_ok=True)
    lines = [
        "[DEFAULT]",
        "transport_url = fake://",
        f"state_path = {state}",
        f"host = {host}",
        f"enabled_backends = {backend}",
        "auth_strategy = noauth",
        f"log_file = {os.path.join(directory, 'cinder.log')}",
        "debug = false",
    ]
    if cluster:
        lines.append(f"cluster = {cluster}")
    lines += [f"{k} = {v}" for k, v in (default or {}).items()]
    lines += [
        "[database]",
        f"connection = {database or 'sqlite:///' + os.path.join(directory, 'cinder.sqlite')}",
        "[coordination]",
        f"backend_url = {backend_url or 'file://' + os.path.join(state, 'coordination')}",
        "initial_reconnect_backoff = 0.05",
        "max_reconnect_backoff = 1.0",
        "heartbeat = 0.5",
    ]
    lines += [f"{k} = {v}" for k, v in (coordination or {}).items()]
    lines += [
        "[oslo_concurrency]",
        f"lock_path = {os.path.join(state, 'locks')}",
        "[privileged]",
        "mode = privsep",
        "root_helper =",
        f"[{backend}]",
        f"volume_driver = {driver}",
        f"volume_backend_name = {backend}",
    ]
    lines += [f"{k} = {v}" for k, v in options.items()]
    path = os.path.join(directory, "cinder.conf")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def db_sync(config: str) -> float:
    """``cinder-manage db sync``: Cinder's own schema and default volume type."""
    started = time.monotonic()
    proc = subprocess.run(
        [os.path.join(BIN, "cinder-manage"), "--config-file", config, "db", "sync"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"cinder-manage db sync failed: {proc.stderr[-3000:]}"
    return time.monotonic() - started


def env(mode: str) -> dict[str, str]:
    environ = worker_env()
    environ.pop("OS_CINDER_DISABLE_EVENTLET_PATCHING", None)
    environ.update(MODES[mode])
    return environ


def worker_argv(scenario: str, config: str, backend: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tests.functional.cinder_worker",
        scenario,
        "--config-file",
        config,
        "--backend",
        backend,
        *extra,
    ]


def start_worker(
    scenario: str, config: str, backend: str, *extra: str, mode: str = "eventlet"
) -> subprocess.Popen:
    return subprocess.Popen(
        worker_argv(scenario, config, backend, *extra),
        cwd=REPO,
        env=env(mode),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def result_of(proc: subprocess.Popen, timeout: float, config: str | None = None) -> dict:
    """Wait for a worker; fail with its stderr (and Cinder's log) unless it succeeded."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(
            f"worker {proc.pid} did not finish in {timeout} s:\n{err[-4000:]}{_log(config)}"
        )
    lines = [line for line in out.splitlines() if line.startswith("result ")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"worker exited {proc.returncode}:\n{err[-6000:]}\n{out[-2000:]}{_log(config)}")
    return json.loads(lines[-1][len("result ") :])


def run_worker(
    scenario: str,
    config: str,
    backend: str,
    *extra: str,
    mode: str = "eventlet",
    timeout: float = 120,
) -> dict:
    proc = start_worker(scenario, config, backend, *extra, mode=mode)
    return result_of(proc, timeout, config)


def _log(config: str | None) -> str:
    if not config:
        return ""
    path = os.path.join(os.path.dirname(config), "cinder.log")
    try:
        with open(path) as f:
            errors = [line for line in f if " ERROR " in line or "Traceback" in line]
    except OSError:
        return ""
    return "\ncinder.log errors:\n" + "".join(errors[-40:])
