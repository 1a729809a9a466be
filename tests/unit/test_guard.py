"""Lock name rendering, ordering and every error path of synchronized()."""

from __future__ import annotations

import logging
import threading
import time
from types import SimpleNamespace

import pytest

from remotefs_aa import coordination, exception
from remotefs_aa.coordination import guard
from tests.unit.fakes import MemoryProvider, make_conf


@pytest.fixture
def provider(memory_locks):
    return memory_locks


def vol(id_: str) -> SimpleNamespace:
    return SimpleNamespace(id=id_)


def test_names_are_prefixed_deduplicated_sorted():
    assert coordination.lock_names(["b", "a", "b", "remotefs_aa-a"]) == [
        "remotefs_aa-a",
        "remotefs_aa-b",
    ]


def test_templates_render_from_arguments_defaults_and_f_name():
    def create_cloned_volume(self, volume, src_vref, mode="x"):
        pass

    names = coordination.render_lock_names(
        ["{volume.id}", "{src_vref.id}", "{f_name}-{mode}"],
        create_cloned_volume,
        (object(), vol("v2")),
        {"src_vref": vol("v1")},
    )
    assert names == ["v2", "v1", "create_cloned_volume-x"]


def test_synchronized_takes_sorted_locks_and_releases_in_reverse(provider):
    seen = []

    class Driver:
        @coordination.synchronized("{volume.id}", "{src_vref.id}")
        def create_cloned_volume(self, volume, src_vref):
            seen.append(list(provider.acquired()))
            return "model-update"

    assert Driver().create_cloned_volume(vol("zz"), vol("aa")) == "model-update"
    assert seen == [["remotefs_aa-aa", "remotefs_aa-zz"]]
    assert provider.released() == ["remotefs_aa-zz", "remotefs_aa-aa"]


def test_same_volume_twice_is_locked_once(provider):
    @coordination.synchronized("{volume.id}", "{snapshot.volume_id}")
    def op(volume, snapshot):
        pass

    op(vol("v1"), SimpleNamespace(volume_id="v1"))
    assert provider.acquired() == ["remotefs_aa-v1"]


def test_unknown_template_argument_is_refused_at_decoration():
    with pytest.raises(exception.LockNameError, match="snapshot"):

        @coordination.synchronized("{snapshot.volume_id}")
        def op(volume):
            pass


def test_empty_template_field_is_refused():
    with pytest.raises(exception.LockNameError, match="empty field"):

        @coordination.synchronized("{}")
        def op(volume):
            pass


def test_no_templates_is_refused():
    with pytest.raises(exception.LockNameError):
        coordination.synchronized()


def test_unrenderable_attribute_is_a_clear_error_and_nothing_runs(provider):
    ran = []

    @coordination.synchronized("{volume.id}")
    def op(volume):
        ran.append(1)

    with pytest.raises(exception.LockNameError, match=r"\{volume.id\}.*AttributeError"):
        op(object())
    assert ran == [] and provider.acquired() == []


def test_busy_second_lock_releases_first_and_body_does_not_run(provider):
    provider.busy.add("remotefs_aa-b")
    ran = []

    @coordination.synchronized("{x}", "{y}", blocking=False)
    def op(x, y):
        ran.append(1)

    with pytest.raises(exception.LockBusy, match="remotefs_aa-b"):
        op("a", "b")
    assert ran == []
    assert provider.acquired() == ["remotefs_aa-a"]
    assert provider.released() == ["remotefs_aa-a"]


def test_timeout_raises_lock_timeout_naming_the_lock(provider):
    provider.busy.add("remotefs_aa-v1")
    ran = []

    @coordination.synchronized("{v}", timeout=0.05)
    def op(v):
        ran.append(1)

    with pytest.raises(exception.LockTimeout, match="remotefs_aa-v1.*timed out"):
        op("v1")
    assert ran == []


def test_spent_budget_makes_a_last_nonblocking_try(provider):
    provider.busy.add("remotefs_aa-b")
    with pytest.raises(exception.LockTimeout):
        with coordination.locked("a", "b", timeout=0.0, provider=provider):
            pytest.fail("body must not run")
    tries = [e for e in provider.events if e[0] == "try"]
    assert all(blocking is False for _t, _n, blocking, _to in tries)


def test_configured_timeout_is_the_default():
    prov = MemoryProvider(make_conf(lock_acquire_timeout=0.01))
    prov.start()
    prov.busy.add("remotefs_aa-v")
    with pytest.raises(exception.LockTimeout):
        with coordination.locked("v", provider=prov):
            pass


def test_backend_failure_releases_what_was_taken(provider):
    provider.broken.add("remotefs_aa-b")
    with pytest.raises(exception.LockBackendUnavailable):
        with coordination.locked("a", "b", "c", provider=provider):
            pytest.fail("body must not run")
    assert provider.acquired() == ["remotefs_aa-a"]
    assert provider.released() == ["remotefs_aa-a"]


def test_body_exception_propagates_and_locks_are_released(provider):
    @coordination.synchronized("{v}")
    def op(v):
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        op("v1")
    assert provider.released() == ["remotefs_aa-v1"]


def test_release_failure_is_logged_not_raised(provider, caplog):
    provider.fail_release.add("remotefs_aa-b")

    @coordination.synchronized("{x}", "{y}")
    def op(x, y):
        return 42

    with caplog.at_level(logging.WARNING):
        assert op("a", "b") == 42
    assert provider.released() == ["remotefs_aa-b", "remotefs_aa-a"]
    assert "could not release lock remotefs_aa-b" in caplog.text


def test_no_provider_started_raises():
    guard.set_provider(None)

    @coordination.synchronized("{v}")
    def op(v):
        pass

    with pytest.raises(exception.LockProviderNotStarted, match="coordination.start"):
        op("x")


def test_wait_and_hold_are_logged_with_lock_names(provider, caplog):
    @coordination.synchronized("{volume.id}")
    def delete_snapshot(volume):
        pass

    with caplog.at_level(logging.DEBUG, logger="remotefs_aa.coordination.guard"):
        delete_snapshot(vol("v9"))
    text = caplog.text
    assert "acquired locks ['remotefs_aa-v9'], waited" in text
    assert "released locks ['remotefs_aa-v9'], held" in text
    assert "delete_snapshot" in text


def test_threads_are_excluded(provider):
    inside = []
    overlap = []

    @coordination.synchronized("{v}")
    def op(v):
        inside.append(1)
        if len(inside) > 1:
            overlap.append(1)
        time.sleep(0.001)
        inside.pop()

    threads = [threading.Thread(target=lambda: [op("same") for _ in range(20)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlap == []


def test_long_wait_is_warned_about(caplog):
    prov = MemoryProvider(make_conf(lock_wait_warning_interval=0.1))
    prov.start()
    holder = prov.get_lock("remotefs_aa-slow")
    assert holder.acquire()
    threading.Timer(0.35, holder.release).start()
    with caplog.at_level(logging.WARNING, logger="remotefs_aa.coordination.guard"):
        with coordination.locked("slow", provider=prov):
            pass
    assert "Still waiting for lock remotefs_aa-slow" in caplog.text


def test_synchronized_renders_keywords_defaults_and_varargs(provider):
    @coordination.synchronized("{volume.id}", "{f_name}-{mode}")
    def op(self, volume, mode="thin"):
        return mode

    assert op(None, volume=vol("k1")) == "thin"
    assert op(None, vol("p1"), mode="thick") == "thick"

    @coordination.synchronized("{volume.id}")
    def op_var(volume, *args, **kwargs):
        return args

    assert op_var(vol("va"), 1, 2) == (1, 2)
    assert provider.acquired() == [
        "remotefs_aa-k1",
        "remotefs_aa-op-thin",
        "remotefs_aa-op-thick",
        "remotefs_aa-p1",
        "remotefs_aa-va",
    ]


def test_missing_argument_is_a_clear_error_before_any_lock(provider):
    @coordination.synchronized("{volume.id}")
    def op(self, volume):
        pass

    with pytest.raises(TypeError, match="volume"):
        op(None)
    assert provider.acquired() == []


def test_retaking_a_lock_at_once_pauses_only_when_someone_asked_for_a_turn(monkeypatch):
    prov = MemoryProvider(make_conf(lock_handoff_interval=0.2))
    prov.start()
    slept: list[float] = []
    clock = [1000.0]
    monkeypatch.setattr(guard.time, "sleep", slept.append)
    monkeypatch.setattr(guard.time, "monotonic", lambda: clock[0])
    guard._RELEASED.clear()
    guard._CHECKED.clear()
    turn_name = "remotefs_aa-vol-1" + guard.TURN_SUFFIX

    def checks() -> int:
        return sum(1 for e in prov.events if e[0] == "try" and e[1] == turn_name)

    def step(name: str, later: float) -> None:
        clock[0] += later
        with coordination.locked(name, provider=prov):
            pass

    step("vol-1", 0)
    step("vol-2", 0.001)  # another name: no check, no pause
    assert slept == [] and checks() == 0
    step("vol-1", 0.001)  # the same name at once, nobody waiting: one check, no pause
    assert slept == [] and checks() == 1
    step("vol-1", 0.001)  # again within the interval of that check: not even a check
    assert checks() == 1
    # Another process waits, and says so by holding the turn lock.
    turn = prov.get_lock(turn_name)
    assert turn.acquire(blocking=False)
    step("vol-1", 0.001)  # still within the interval of the last check
    assert slept == []
    clock[0] += 0.25  # the last check is an interval old; the release is recent
    with coordination.locked("vol-1", provider=prov):
        pass
    step("vol-1", 0.001)
    assert slept == [0.2]
    turn.release()


def test_fair_providers_and_zero_interval_never_pause(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(guard.time, "sleep", slept.append)
    for prov in (MemoryProvider(make_conf(lock_handoff_interval=0.0)), MemoryProvider()):
        if prov.settings.handoff_interval:
            prov.fair = True
        prov.start()
        guard._RELEASED.clear()
        guard._CHECKED.clear()
        for _ in range(3):
            with coordination.locked("vol-1", provider=prov):
                pass
    assert slept == []
