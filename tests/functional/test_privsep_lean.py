"""The lean privsep transport (remotefs_aa/privsep/lean.py) against real daemons.

Real ``remotefs-aa-privsep-helper`` and ``privsep-helper`` processes serve the
test contexts in privsep_contexts.py: concurrent callers get their own replies,
in-band log records arrive, errors cross over, a timed-out call does not
poison the channel, a daemon killed mid-call gives an error and the next call
a new daemon, and the helper refuses contexts that are not lean.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time

import pytest
from oslo_config import cfg
from oslo_privsep import comm

from remotefs_aa import exception
from remotefs_aa.privsep.lean import HELPER_NAME
from tests import REPO
from tests.functional import privsep_contexts as pc

pytestmark = pytest.mark.functional

BIN = os.path.dirname(sys.executable)


def _helper(name: str) -> str:
    return shlex.join(["env", f"PYTHONPATH={REPO}", os.path.join(BIN, name)])


@pytest.fixture
def lean():
    """The lean test context, started on first call by our helper; stopped after."""
    cfg.CONF.set_override("helper_command", _helper(HELPER_NAME), group=pc.LEAN_SECTION)
    pc.lean_ctx.set_client_mode(True)
    yield pc.lean_ctx
    pids = []
    if pc.lean_ctx.channel is not None and pc.lean_ctx.channel.running:
        pids.append(pc.echo(None)[1])
    pc.lean_ctx.stop()
    for pid in pids:
        _wait_gone(pid)
    cfg.CONF.clear_override("helper_command", group=pc.LEAN_SECTION)


def _wait_gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not os.path.exists(f"/proc/{pid}"), f"daemon {pid} still running"


def test_many_threads_each_get_their_own_reply(lean):
    pid = pc.echo("warm")[1]

    def call(i: int) -> tuple:
        # Mixed delays so replies come back out of order.
        return pc.echo({"i": i, "blob": "x" * (i % 7) * 1000}, delay=(i % 3) * 0.01)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(200)))
    for i, (value, daemon) in enumerate(results):
        assert value == {"i": i, "blob": "x" * (i % 7) * 1000}
        assert daemon == pid


def test_log_records_from_the_daemon_arrive(lean, caplog):
    with caplog.at_level(logging.WARNING):
        assert pc.log_and_return("hello") == "hello"
    assert any("from the daemon: hello" in r.getMessage() for r in caplog.records)


def test_errors_cross_over_with_their_type(lean):
    with pytest.raises(ValueError, match="bad thing"):
        pc.fail("bad thing")
    assert pc.echo(1)[0] == 1


def test_timed_out_call_errors_and_channel_keeps_working(lean):
    pc.echo(0)
    with pytest.raises(comm.PrivsepTimeout):
        lean.channel.remote_call(f"{pc.__name__}.echo", ("late", 0.5), {}, timeout=0.05)
    # The late reply is read and dropped; later calls get their own.
    for i in range(5):
        assert pc.echo(i)[0] == i
    time.sleep(0.6)
    assert pc.echo("after")[0] == "after"


def test_daemon_killed_mid_call_fails_that_call_and_restarts(lean):
    first = pc.echo(None)[1]
    error: list[BaseException] = []

    def slow() -> None:
        try:
            pc.echo("never", delay=30)
        except BaseException as exc:
            error.append(exc)

    caller = threading.Thread(target=slow)
    caller.start()
    time.sleep(0.3)
    os.kill(first, signal.SIGKILL)
    caller.join(timeout=10)
    assert not caller.is_alive(), "the call waiting on a dead daemon hung"
    # A clear error of our own, not an OSError a caller could take for the
    # entrypoint's own FileNotFoundError & co.
    assert error and isinstance(error[0], exception.PrivilegedDaemonLost), error
    assert not isinstance(error[0], OSError)
    assert f"lost the privileged daemon [{pc.LEAN_SECTION}]" in str(error[0])
    assert "retry" in str(error[0])
    _wait_gone(first)
    second = pc.echo("again")
    assert second[0] == "again" and second[1] != first


def test_lean_client_talks_to_the_stock_helper():
    cfg.CONF.set_override("helper_command", _helper("privsep-helper"), group=pc.LEAN_SECTION)
    pc.lean_ctx.set_client_mode(True)
    try:
        value, pid = pc.echo("stock daemon")
        assert value == "stock daemon"
        values = [pc.echo(i)[0] for i in range(20)]
        assert values == list(range(20))
    finally:
        pc.lean_ctx.stop()
        cfg.CONF.clear_override("helper_command", group=pc.LEAN_SECTION)
    _wait_gone(pid)


def test_our_helper_refuses_a_stock_context(tmp_path):
    proc = subprocess.run(
        [
            os.path.join(BIN, HELPER_NAME),
            "--privsep_context",
            f"{pc.__name__}.stock_ctx",
            "--privsep_sock_path",
            str(tmp_path / "nobody-listens"),
        ],
        env={**os.environ, "PYTHONPATH": REPO},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "is not a LeanContext" in proc.stderr
