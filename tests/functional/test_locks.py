"""Lock providers against real backends, from several real processes.

Every test here starts its processes with ``python -m
tests.functional.lockworker`` (or the ``remotefs-aa`` CLI) and checks an
outcome that only real mutual exclusion produces: an exact counter, a lock
freed after its holder was SIGKILLed, an error instead of unprotected work
while the backend is down, no deadlock between {A, B} and {B, A}.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests import run_cli
from tests.functional.conftest import (
    BACKENDS,
    REPO,
    Backend,
    finish,
    record,
    spawn_worker,
    worker_env,
)

pytestmark = pytest.mark.functional

PROCS = 4
SERVER_BACKENDS = [b for b in BACKENDS if b != "file"]


def _counter(tmp_path: os.PathLike) -> str:
    path = os.path.join(tmp_path, "counter")
    with open(path, "w") as f:
        f.write("0")
    return path


def _read(path: str) -> int:
    with open(path) as f:
        return int(f.read())


def _count_in_parallel(conf: str, counter: str, iterations: int) -> float:
    """PROCS workers each increment ``counter`` ``iterations`` times; seconds taken."""
    start = time.monotonic()
    procs = [
        spawn_worker(
            *("count", "--config", conf, "--counter", counter),
            *("--iterations", str(iterations), "--pause", "0.002"),
        )
        for _ in range(PROCS)
    ]
    for proc in procs:
        finish(proc, timeout=180)
    return time.monotonic() - start


def test_synchronized_counter_is_exact(backend: Backend, tmp_path: os.PathLike) -> None:
    counter = _counter(tmp_path)
    iterations = 25
    took = _count_in_parallel(backend.write_config(str(tmp_path)), counter, iterations)
    record(
        "counter",
        backend=backend.kind,
        procs=PROCS,
        increments=PROCS * iterations,
        seconds=round(took, 2),
    )
    assert _read(counter) == PROCS * iterations


def test_lock_run_counter_is_exact(backend: Backend, tmp_path: os.PathLike) -> None:
    """The CLI's ``lock run`` excludes other ``lock run`` processes."""
    conf = backend.write_config(str(tmp_path))
    counter = _counter(tmp_path)
    rounds = 3
    incr = (
        "import sys, time; p = sys.argv[1]; v = int(open(p).read()); "
        "time.sleep(0.02); open(p, 'w').write(str(v + 1))"
    )
    script = (
        f"for i in $(seq {rounds}); do "
        f"{sys.executable} -m remotefs_aa.cmd.main --config-file {conf} lock run counter "
        f'-- {sys.executable} -c "{incr}" {counter} || exit $?; done'
    )
    procs = [
        subprocess.Popen(
            ["bash", "-c", script], cwd=REPO, env=worker_env(), stderr=subprocess.PIPE, text=True
        )
        for _ in range(PROCS)
    ]
    for proc in procs:
        _out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    assert _read(counter) == PROCS * rounds


def test_lock_run_passes_exit_status(backend: Backend, tmp_path: os.PathLike) -> None:
    conf = backend.write_config(str(tmp_path))
    result = run_cli(
        "--config-file", conf, "lock", "run", "status", "--", "sh", "-c", "exit 7", env=worker_env()
    )
    assert result.returncode == 7, result.stderr


def test_counter_without_locks_loses_updates(tmp_path: os.PathLike) -> None:
    """The same workload with a provider that locks nothing is caught.

    Proof that the exact-count tests above would fail if locking broke.
    """
    conf = os.path.join(tmp_path, "nolock.conf")
    with open(conf, "w") as f:
        f.write(
            f"[DEFAULT]\nstate_path = {tmp_path}/state\n[coordination]\n"
            "lock_provider = tests.functional.nolock.NoLockProvider\n"
        )
    counter = _counter(tmp_path)
    iterations = 25
    _count_in_parallel(conf, counter, iterations)
    assert _read(counter) < PROCS * iterations


def test_killed_holder_releases_lock(backend: Backend, tmp_path: os.PathLike) -> None:
    """SIGKILL the holder: another process gets the lock after the expiry."""
    conf = backend.write_config(str(tmp_path))
    ready = os.path.join(tmp_path, "ready")
    holder = spawn_worker("hold", "--config", conf, "--name", "victim", "--ready", ready)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(ready):
            assert holder.poll() is None, holder.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "holder never took the lock"
            time.sleep(0.05)
        # The lock is really held: a non-blocking attempt elsewhere fails.
        busy = run_cli(
            "--config-file", conf, "lock", "run", "-n", "victim", "--", "true", env=worker_env()
        )
        assert busy.returncode == 75, busy.stderr
        assert "remotefs_aa-victim" in busy.stderr
        margin = 10.0
        waiter = spawn_worker(
            "acquire",
            "--config",
            conf,
            "--name",
            "victim",
            "--timeout",
            str(backend.lock_expiry + margin),
        )
        time.sleep(0.5)  # let the waiter queue up behind the holder
        holder.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        result = finish(waiter, timeout=backend.lock_expiry + margin + 30)
        took = time.monotonic() - killed_at
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.communicate()
    record(
        "sigkill_takeover",
        backend=backend.kind,
        expiry_s=backend.lock_expiry,
        seconds_after_kill=round(took, 2),
        waiter_waited_s=round(result["waited"], 2),
    )
    assert took <= backend.lock_expiry + margin


def test_ab_and_ba_never_deadlock(backend: Backend, tmp_path: os.PathLike) -> None:
    """{A, B} and {B, A} are taken in one sorted order, so both finish."""
    conf = backend.write_config(str(tmp_path), lock_acquire_timeout=60)
    counter = _counter(tmp_path)
    iterations = 20
    procs = [
        spawn_worker(
            "pair",
            "--config",
            conf,
            "--counter",
            counter,
            "--iterations",
            str(iterations),
            "--first",
            first,
            "--second",
            second,
            "--pause",
            "0.002",
        )
        for first, second in (("alpha", "beta"), ("beta", "alpha"))
    ]
    for proc in procs:
        finish(proc, timeout=240)
    assert _read(counter) == 2 * iterations


def _line(proc: subprocess.Popen, timeout: float) -> dict:
    """Next JSON line from a worker, failing instead of hanging."""
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout):
        proc.kill()
        pytest.fail(f"worker said nothing for {timeout} s; stderr: {proc.stderr.read()[-3000:]}")
    line = proc.stdout.readline()
    if not line:
        pytest.fail(f"worker exited {proc.wait()}; stderr: {proc.stderr.read()[-3000:]}")
    return json.loads(line)


def _say(proc: subprocess.Popen) -> None:
    proc.stdin.write("go\n")
    proc.stdin.flush()


@pytest.mark.parametrize("backend", SERVER_BACKENDS, indirect=True)
def test_backend_outage_fails_locks_then_recovers(backend: Backend, tmp_path: os.PathLike) -> None:
    """Stop the server under a holder and a waiter; restart it.

    While it is down, taking a lock raises LockBackendUnavailable and the
    protected code does not run; after the restart the same processes lock
    again without being restarted themselves.
    """
    assert backend.server is not None
    conf = backend.write_config(str(tmp_path))
    common = ("--config", conf, "--name", "outage", "--recover-within", "60")
    holder = spawn_worker("outage", "--role", "holder", *common, stdin=subprocess.PIPE)
    waiter = None
    try:
        assert _line(holder, 60)["state"] == "holding"
        waiter = spawn_worker("outage", "--role", "waiter", *common, stdin=subprocess.PIPE)
        assert _line(waiter, 60)["state"] == "waiting"
        time.sleep(0.5)
        backend.server.stop()
        stopped = time.monotonic()
        _say(holder)
        assert _line(holder, 60)["state"] == "outage-seen"
        assert _line(waiter, 60)["state"] == "outage-seen"
        waiter_failed = time.monotonic() - stopped
        backend.server.start()
        _say(holder)
        _say(waiter)
        held = _line(holder, 90)
        waited = _line(waiter, 90)
    finally:
        if backend.server.proc is None or backend.server.proc.poll() is not None:
            backend.server.start()
        for proc in (holder, waiter):
            if proc is not None and proc.poll() is None:
                proc.kill()
            if proc is not None:
                proc.communicate()
    record(
        "outage",
        backend=backend.kind,
        waiter_error_after_stop_s=round(waiter_failed, 2),
        holder_recovered_after_restart_s=round(held["recovered_after"], 2),
        waiter_recovered_after_restart_s=round(waited["recovered_after"], 2),
    )
    for result in (held, waited):
        assert result["during_outage"] == "LockBackendUnavailable", result
        assert "unreachable" in result["message"] or "failed" in result["message"]
        assert backend.server.kind in result["message"] or "127.0.0.1" in result["message"]
        assert result["body_ran_during_outage"] == []
        assert result["recovered"], result
        assert result["reconnects"] >= 1
    assert held["still_owner"] is False
