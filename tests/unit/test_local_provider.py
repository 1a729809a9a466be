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


def test_start_leaves_no_file_and_clean_removes_a_free_lock_file(provider):
    import os

    assert os.listdir(provider.lock_path) == []  # the start probe is gone again
    lock = provider.get_lock("remotefs_aa-v1")
    assert lock.acquire()
    provider.clean("remotefs_aa-v1")  # held: left alone
    assert os.listdir(provider.lock_path) == ["remotefs_aa-v1"]
    lock.release()
    provider.clean("remotefs_aa-v1")
    provider.clean("remotefs_aa-never-used")
    assert os.listdir(provider.lock_path) == []


_WAITER = """
import sys, time
sys.path.insert(0, {repo!r})
from remotefs_aa.coordination.local import LocalLockProvider
from tests.unit.fakes import make_conf
lock = LocalLockProvider(make_conf(lock_path={path!r})).get_lock("remotefs_aa-v1")
print("waiting", flush=True)
assert lock.acquire()
print("got", flush=True)
time.sleep(3)
lock.release()
"""


def test_a_waiter_on_a_removed_lock_file_takes_the_lock_on_the_current_file(provider):
    """The race clean() must not open: a lock on an unlinked file excludes nobody."""
    import os
    import subprocess
    import sys

    from tests import REPO

    holder = provider.get_lock("remotefs_aa-v1")
    assert holder.acquire()
    waiter = subprocess.Popen(
        [sys.executable, "-c", _WAITER.format(repo=REPO, path=provider.lock_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert waiter.stdout.readline() == "waiting\n"
        time.sleep(0.5)  # it has opened the file and waits on it
        os.unlink(holder.path)  # what clean() does, under the lock
        holder.release()
        assert waiter.stdout.readline() == "got\n"
        # The waiter holds the lock on the file the name now stands for, so a
        # newcomer is excluded (on the unlinked file, it would not be).
        newcomer = provider.get_lock("remotefs_aa-v1")
        assert newcomer.acquire(blocking=False) is False
    finally:
        waiter.kill()
        waiter.wait()
