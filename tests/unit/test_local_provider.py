"""The host-local provider: processes and threads of one host exclude each other."""

from __future__ import annotations

import multiprocessing
import threading
import time

import pytest

from remotefs_aa import coordination, exception
from remotefs_aa.coordination.local import LocalLockProvider
from tests.unit.fakes import make_conf


@pytest.fixture
def provider(tmp_path):
    prov = LocalLockProvider(make_conf(lock_provider="local", lock_path=str(tmp_path / "locks")))
    prov.start()
    yield prov
    prov.stop()


def test_declares_itself_host_local(provider):
    assert provider.spans_hosts is False
    assert "file locks in" in provider.describe()


def test_acquire_release_and_owner(provider):
    lock = provider.get_lock("remotefs_aa-v1")
    assert lock.acquire()
    assert lock.is_still_owner()
    lock.release()
    assert not lock.is_still_owner()


def test_second_holder_in_same_process_is_excluded(provider):
    first = provider.get_lock("remotefs_aa-v1")
    second = provider.get_lock("remotefs_aa-v1")
    assert first.acquire()
    assert second.acquire(blocking=False) is False
    started = time.monotonic()
    assert second.acquire(timeout=0.1) is False
    assert time.monotonic() - started >= 0.09
    first.release()
    assert second.acquire(blocking=False)
    second.release()


def _hold(path: str, ready, done) -> None:
    prov = LocalLockProvider(make_conf(lock_provider="local", lock_path=path))
    prov.start()
    lock = prov.get_lock("remotefs_aa-shared")
    lock.acquire()
    ready.set()
    done.wait(10)
    lock.release()


def test_other_process_is_excluded(provider):
    ctx = multiprocessing.get_context("spawn")
    ready, done = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold, args=(provider.lock_path, ready, done))
    proc.start()
    try:
        assert ready.wait(30)
        lock = provider.get_lock("remotefs_aa-shared")
        assert lock.acquire(blocking=False) is False
        done.set()
        assert lock.acquire(timeout=10)
        lock.release()
    finally:
        done.set()
        proc.join(10)


def test_release_of_unheld_lock_is_an_error(provider):
    with pytest.raises(exception.LockError, match="not held"):
        provider.get_lock("remotefs_aa-x").release()


def test_unwritable_lock_path_fails_start(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    prov = LocalLockProvider(make_conf(lock_provider="local", lock_path=str(blocker / "locks")))
    with pytest.raises(exception.LockProviderStartFailed, match="lock_path"):
        prov.start()


def test_synchronized_over_local_provider_with_threads(tmp_path):
    conf = make_conf(lock_provider="local", lock_path=str(tmp_path))
    coordination.start(conf)
    try:
        counter = {"n": 0}

        @coordination.synchronized("{name}")
        def bump(name):
            value = counter["n"]
            time.sleep(0.0005)
            counter["n"] = value + 1

        threads = [
            threading.Thread(target=lambda: [bump("c") for _ in range(25)]) for _ in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert counter["n"] == 100
    finally:
        coordination.stop()
