"""The tooz provider on the file backend, and its error paths with a fake client."""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest
from tooz import coordination as tooz_coordination

from remotefs_aa import exception
from remotefs_aa.coordination import tooz_provider
from remotefs_aa.coordination.tooz_provider import ToozLockProvider
from tests.functional.servers import free_port
from tests.unit.fakes import make_conf


@pytest.fixture
def file_provider(tmp_path):
    prov = ToozLockProvider(make_conf(backend_url=f"file://{tmp_path}/coord"))
    prov.start()
    yield prov
    prov.stop()


@pytest.mark.parametrize(
    ("url", "spans"),
    [
        ("file:///tmp/x", False),
        ("redis://127.0.0.1:6379", True),
        ("zookeeper://127.0.0.1:2181", True),
        ("etcd3+http://127.0.0.1:2379", True),
        ("memcached://127.0.0.1:11211", True),
    ],
)
def test_spans_hosts_follows_the_backend(url, spans):
    assert ToozLockProvider(make_conf(backend_url=url)).spans_hosts is spans


def test_real_file_driver_gets_a_heartbeat_thread_because_tooz_asks(file_provider):
    assert file_provider.requires_heartbeat
    assert file_provider._heartbeat_thread is not None
    assert file_provider._heartbeat_thread.is_alive()


def test_file_backend_locks_and_reports_ownership(file_provider):
    lock = file_provider.get_lock("remotefs_aa-v1")
    other = file_provider.get_lock("remotefs_aa-v1")
    assert lock.acquire()
    assert lock.is_still_owner()
    assert other.acquire(blocking=False) is False
    assert other.acquire(timeout=0.05) is False
    lock.release()
    assert not lock.is_still_owner()
    assert other.acquire(timeout=1)
    other.release()


def test_unreachable_backend_fails_start_fast_and_clearly():
    url = f"redis://127.0.0.1:{free_port()}"
    prov = ToozLockProvider(make_conf(backend_url=url))
    started = time.monotonic()
    with pytest.raises(exception.LockProviderStartFailed) as err:
        prov.start()
    assert time.monotonic() - started < 10
    assert "cannot reach lock backend redis://127.0.0.1:" in str(err.value)
    assert "backend_url" in str(err.value)
    assert not prov.started


@pytest.fixture
def silent_server():
    """A loopback port that accepts connections and never answers (a hung server)."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    yield server.getsockname()[1]
    server.close()


@pytest.mark.parametrize("scheme", ["zookeeper", "redis", "etcd3+http", "memcached"])
def test_an_unanswering_backend_fails_start_within_connect_timeout(scheme, silent_server, caplog):
    prov = ToozLockProvider(
        make_conf(backend_url=f"{scheme}://127.0.0.1:{silent_server}", connect_timeout=0.5)
    )
    started = time.monotonic()
    with pytest.raises(exception.LockProviderStartFailed, match="connect_timeout = 0.5 s"):
        prov.start()
    assert time.monotonic() - started < 1.5
    assert not prov.started


def test_a_refused_zookeeper_port_is_one_error_without_kazoo_retry_warnings(caplog):
    prov = ToozLockProvider(
        make_conf(backend_url=f"zookeeper://127.0.0.1:{free_port()}", connect_timeout=1)
    )
    _wait_for_abandoned_attempts()  # of earlier tests
    level = logging.getLogger("kazoo.client").level
    started = time.monotonic()
    with pytest.raises(exception.LockProviderStartFailed, match="connect_timeout = 1 s"):
        prov.start()
    assert time.monotonic() - started < 2  # kazoo alone: 10 s
    _wait_for_abandoned_attempts()  # kazoo gives up by itself soon after, still silenced
    assert [r for r in caplog.records if r.name.startswith("kazoo")] == []
    assert logging.getLogger("kazoo.client").level == level  # restored


def _wait_for_abandoned_attempts(limit=10.0):
    deadline = time.monotonic() + limit
    while tooz_provider._quiet_depth and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tooz_provider._quiet_depth == 0, "a connection attempt never ended"


def test_password_is_not_logged(caplog):
    prov = ToozLockProvider(make_conf(backend_url="redis://:s3cret@127.0.0.1:1"))
    assert "s3cret" not in prov.describe()


def test_backoff_is_jittered_doubling_and_bounded():
    prov = ToozLockProvider(
        make_conf(
            backend_url="file:///tmp/x", initial_reconnect_backoff=0.5, max_reconnect_backoff=3
        )
    )
    for attempt, ceiling in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 3.0), (10, 3.0), (500, 3.0)]:
        samples = [prov._backoff(attempt) for _ in range(200)]
        assert min(samples) >= ceiling / 2
        assert max(samples) <= ceiling
        assert len(set(samples)) > 1  # jittered


class FakeLock:
    def __init__(self, coord, name):
        self.coord, self.name = coord, name

    def acquire(self, blocking=True, timeout=None):
        if self.coord.down:
            raise tooz_coordination.ToozConnectionError("connection refused (fake)")
        if blocking is not False and self.coord.hang:
            self.coord.hanging.set()
            threading.Event().wait(30)  # a client that never gives up
        return True

    def release(self):
        return True

    def is_still_owner(self):
        return True


class FakeCoordinator:
    """Stands in for a tooz driver whose server goes away and comes back."""

    instances: list = []
    requires_beating = True

    def __init__(self, state):
        self.state = state
        self.hanging = threading.Event()
        FakeCoordinator.instances.append(self)

    @property
    def down(self):
        return self.state["down"]

    @property
    def hang(self):
        return self.state["hang"]

    def start(self, start_heart=False):
        if self.down:
            raise tooz_coordination.ToozConnectionError("connection refused (fake)")

    def stop(self):
        pass

    def heartbeat(self):
        if self.down:
            raise tooz_coordination.ToozConnectionError("heartbeat failed (fake)")
        return 1.0

    def get_lock(self, name):
        return FakeLock(self, name)


@pytest.fixture
def fake(monkeypatch):
    state = {"down": False, "hang": False}
    FakeCoordinator.instances = []
    monkeypatch.setattr(
        tooz_coordination, "get_coordinator", lambda url, member: FakeCoordinator(state)
    )
    conf = make_conf(
        backend_url="redis://127.0.0.1:1",
        heartbeat=0.05,
        initial_reconnect_backoff=0.05,
        max_reconnect_backoff=0.2,
    )
    prov = ToozLockProvider(conf)
    prov.start()
    yield prov, state
    prov.stop()


def test_heartbeat_thread_only_when_required(fake, monkeypatch):
    prov, _state = fake
    assert prov.requires_heartbeat and prov._heartbeat_thread.is_alive()
    monkeypatch.setattr(FakeCoordinator, "requires_beating", False)
    prov2 = ToozLockProvider(prov.conf)
    prov2.start()
    try:
        assert prov2._heartbeat_thread is None
    finally:
        prov2.stop()


def test_connection_loss_fails_fast_then_reconnects(fake):
    prov, state = fake
    state["down"] = True
    lock = prov.get_lock("remotefs_aa-v1")
    with pytest.raises(exception.LockBackendUnavailable, match="remotefs_aa-v1.*did not run"):
        lock.acquire()
    assert not prov.connected
    # While reconnecting, new locks fail at once instead of hanging.
    with pytest.raises(exception.LockBackendUnavailable, match="reconnecting"):
        prov.get_lock("remotefs_aa-v2")
    state["down"] = False
    deadline = time.monotonic() + 5
    while not prov.connected and time.monotonic() < deadline:
        time.sleep(0.02)
    assert prov.connected and prov.reconnects == 1
    again = prov.get_lock("remotefs_aa-v1")
    assert again.acquire()
    again.release()


def test_heartbeat_failure_starts_reconnect(fake):
    prov, state = fake
    state["down"] = True
    deadline = time.monotonic() + 5
    while prov.connected and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not prov.connected
    state["down"] = False


def test_lock_taken_before_loss_is_not_owned_after(fake):
    prov, state = fake
    lock = prov.get_lock("remotefs_aa-v1")
    assert lock.acquire()
    state["down"] = True
    with pytest.raises(exception.LockBackendUnavailable):
        prov.get_lock("remotefs_aa-v2").acquire()
    assert lock.is_still_owner() is False
    lock.release()  # logged, not raised: the backend lets it lapse
    state["down"] = False


def test_waiter_is_woken_when_the_connection_is_lost(fake):
    """A client that would wait through an outage does not hang its caller."""
    prov, state = fake
    prov.server_side_wait = True  # as for ZooKeeper: wait in the client
    state["hang"] = True
    lock = prov.get_lock("remotefs_aa-v1")
    lock._call_backend = _busy_then_hang(lock)
    errors = []
    t = threading.Thread(target=lambda: _capture(errors, lock.acquire), daemon=True)
    t.start()
    assert FakeCoordinator.instances[0].hanging.wait(5)
    prov._connection_lost("(test)", "testing", ConnectionError("gone"), prov._generation)
    t.join(5)
    assert not t.is_alive()
    assert errors and isinstance(errors[0], exception.LockBackendUnavailable)


def test_polling_waiter_is_woken_when_the_connection_is_lost(fake):
    prov, _state = fake
    assert not prov.server_side_wait  # redis:// polls
    lock = prov.get_lock("remotefs_aa-v1")
    lock._call_backend = lambda blocking, timeout: False  # always busy
    errors = []
    t = threading.Thread(target=lambda: _capture(errors, lock.acquire), daemon=True)
    t.start()
    time.sleep(0.1)
    assert t.is_alive()
    prov._connection_lost("(test)", "testing", ConnectionError("gone"), prov._generation)
    t.join(5)
    assert not t.is_alive()
    assert errors and isinstance(errors[0], exception.LockBackendUnavailable)


def test_polling_wait_honours_timeout(fake):
    prov, _state = fake
    lock = prov.get_lock("remotefs_aa-v1")
    calls = []
    lock._call_backend = lambda blocking, timeout: calls.append(blocking) or False
    started = time.monotonic()
    assert lock.acquire(timeout=0.3) is False
    took = time.monotonic() - started
    assert 0.3 <= took < 2
    assert all(b is False for b in calls) and len(calls) > 5  # short polls, never blocking


def _busy_then_hang(lock):
    original = lock._call_backend

    def call(blocking, timeout):
        if blocking is False:
            return False
        return original(blocking, timeout)

    return call


def _capture(errors, func):
    try:
        func()
    except Exception as exc:
        errors.append(exc)


def test_describe_error_uses_the_cause_when_message_is_empty():
    try:
        try:
            raise OSError("Connection refused")
        except OSError as inner:
            raise tooz_coordination.ToozConnectionError("") from inner
    except tooz_coordination.ToozConnectionError as exc:
        text = tooz_provider.describe_error(exc)
    assert text == "ToozConnectionError: OSError: Connection refused"


def test_missing_client_library_is_a_clear_error(monkeypatch):
    from stevedore import driver as stevedore_driver

    def broken(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'pymysql'")

    monkeypatch.setattr(stevedore_driver, "DriverManager", broken)
    prov = ToozLockProvider(make_conf(backend_url="mysql://root@127.0.0.1/test"))
    with pytest.raises(exception.PluginLoadFailed, match="needs the PyMySQL package.*pymysql"):
        _ = prov.spans_hosts


@pytest.mark.parametrize(
    ("url", "module", "package"),
    [
        ("zookeeper://127.0.0.1:1", "kazoo", "kazoo"),
        ("redis://127.0.0.1:1", "redis", "redis"),
        ("etcd3+http://127.0.0.1:1", "etcd3gw", "etcd3gw"),
        ("memcached://127.0.0.1:1", "pymemcache", "pymemcache"),
        ("mysql://root@127.0.0.1:1/x", "pymysql", "PyMySQL"),
        ("postgresql://u@127.0.0.1:1/x", "psycopg2", "psycopg2-binary"),
    ],
)
def test_a_missing_client_library_names_the_package_and_the_extra(tmp_path, url, module, package):
    """A real import failure (a stand-in package that cannot be imported shadows the real one)."""
    from tests import run_cli

    shim = tmp_path / "shim" / module
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text(
        f"raise ModuleNotFoundError(\"No module named '{module}'\", name='{module}')\n"
    )
    conf = tmp_path / "c.conf"
    conf.write_text(f"[DEFAULT]\nstate_path = {tmp_path}\n[coordination]\nbackend_url = {url}\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "shim")}
    proc = run_cli("--config-file", str(conf), "lock", "check", env=env)
    assert proc.returncode == 78, proc.stderr  # like an uninstalled plugin, not "unreachable"
    (line,) = proc.stderr.strip().splitlines()
    assert f"needs the {package} package" in line and f"pip install {package}" in line
    assert "remotefs_aa[backends]" in line
    assert "Check that the server runs" not in line


def test_file_backend_start_leaves_no_probe_file_and_clean_removes_lock_files(tmp_path):
    directory = tmp_path / "coord"
    prov = ToozLockProvider(make_conf(backend_url=f"file://{directory}"))
    prov.start()
    try:
        assert not list(directory.glob("remotefs_aa-probe-*"))
        lock = prov.get_lock("remotefs_aa-v1")
        assert lock.acquire()
        prov.clean("remotefs_aa-v1")  # held: left alone
        assert (directory / "remotefs_aa-v1").exists()
        lock.release()
        prov.clean("remotefs_aa-v1")
        prov.clean("remotefs_aa-never-used")
        assert not list(directory.glob("remotefs_aa-*"))
        assert prov.get_lock("remotefs_aa-v1").acquire(blocking=False)  # usable again
    finally:
        prov.stop()


# -- leases and fencing deadlines ------------------------------------------------


@pytest.mark.parametrize(
    ("url", "kind", "seconds", "margin"),
    [
        ("redis://h:1?lock_timeout=3", "per-lock", 3, 0.5),
        ("redis://h:1?timeout=40", "per-lock", 40, 4.0),
        ("redis://h:1", "per-lock", 30, 3.0),
        ("memcached://h:1?lock_timeout=3", "per-lock", 2, 0.5),  # whole seconds: N - 1
        ("etcd3+http://h:1?lock_timeout=20", "etcd", 20, 2.0),
        ("zookeeper://h:1?timeout=3", "session", 3, 0.5),
        ("zookeeper://h:1", "session", 10, 1.0),
        ("file:///tmp/x", "none", float("inf"), 0.0),
        ("mysql://root@h/db", "none", float("inf"), 0.0),
    ],
)
def test_lease_model_per_backend(url, kind, seconds, margin):
    lease = tooz_provider.lease_of(url, make_conf(backend_url=url).coordination)
    assert (lease.kind, lease.seconds, lease.margin) == (kind, seconds, margin)
    assert lease.deadline(100.0) == (100.0 + seconds - margin if kind != "none" else float("inf"))


def test_a_configured_margin_wins_and_a_heartbeat_too_slow_for_the_lease_is_refused():
    conf = make_conf(backend_url="redis://h:1?lock_timeout=3", lease_margin=1.0)
    assert tooz_provider.lease_of(conf.coordination.backend_url, conf.coordination).margin == 1.0
    prov = ToozLockProvider(make_conf(backend_url="redis://h:1?lock_timeout=3", heartbeat=2.6))
    with pytest.raises(exception.InvalidConfig, match="heartbeat <= 1.2"):
        prov._check_heartbeat_fits_lease()


class RenewingLock(FakeLock):
    """A fake per-lock backend: heartbeat() renews, or refuses once told to."""

    refuse = False

    def heartbeat(self):
        if RenewingLock.refuse:
            raise tooz_coordination.ToozError("Cannot reacquire a lock that's no longer owned")
        return True


def test_the_deadline_starts_at_the_acquire_and_moves_only_with_confirmed_renewals(
    fake, monkeypatch
):
    from remotefs_aa.coordination.guard import OperationFence
    from remotefs_aa.privsep import fence

    prov, _state = fake
    monkeypatch.setattr(FakeCoordinator, "get_lock", lambda self, name: RenewingLock(self, name))
    monkeypatch.setattr(RenewingLock, "refuse", False)
    before = fence.now()
    lock = prov.get_lock("remotefs_aa-v1")
    assert lock.acquire()
    lease = prov.lease  # redis, 30 s, margin 3 s
    assert before + lease.seconds - lease.margin <= lock.deadline <= fence.now() + 27
    guard = OperationFence(["remotefs_aa-v1"], [lock])
    first = guard.deadline
    time.sleep(0.2)  # a few heartbeats (every 0.05 s)
    assert guard.deadline > first  # renewed and confirmed: moved
    RenewingLock.refuse = True
    deadline = time.monotonic() + 5
    while guard.lost is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "no longer owned" in guard.lost
    with pytest.raises(exception.LeaseExpired, match="remotefs_aa-v1"):
        guard.check("qemu_img_commit")
    guard.close()
    lock.release()


def test_a_lost_connection_fences_every_operation_holding_a_lock(fake):
    from remotefs_aa.coordination.guard import OperationFence

    prov, state = fake
    lock = prov.get_lock("remotefs_aa-v1")
    assert lock.acquire()
    guard = OperationFence(["remotefs_aa-v1"], [lock])
    state["down"] = True
    deadline = time.monotonic() + 5
    while guard.lost is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "connection to the backend was lost" in guard.lost
    state["down"] = False
    guard.close()
    lock.release()
