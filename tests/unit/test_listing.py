"""What the CLI shows of a share: every volume, an unreadable one with its error."""

from __future__ import annotations

import pytest

from remotefs_aa.drivers.local import LocalDriver
from remotefs_aa.image import chain as ch
from tests.unit.fakes import make_conf
from tests.unit.test_chain import D, FakeIO, GiB


def _driver(io):
    conf = make_conf()
    conf.set_override("local_shares", [D])
    driver = LocalDriver(conf, host="h", io=io)
    driver._shares = driver.load_shares()
    return driver


def test_a_truncated_info_file_does_not_hide_the_other_volumes():
    io = FakeIO()
    for vid in ("a", "b", "c"):
        ch.Chain(io, D, vid, 1, "raw").create_base("raw", "thin")
    ch.Chain(io, D, "b", 1, "raw").create_snapshot("s1")
    info = f"{D}/volume-b.info"
    io.texts[info] = io.texts[info][:10]  # a crash mid-copy, a full disk ...
    listed = {v.id: v for v in _driver(io).list_volumes()}
    assert sorted(listed) == ["a", "b", "c"]
    assert listed["a"].status == "available" and listed["a"].error is None
    assert listed["b"].status == "error"
    assert "volume-b.info is unusable: not JSON" in listed["b"].error
    assert listed["b"].size == 1 and listed["b"].provider_location == D


def test_volume_show_orders_snapshots_as_taken_and_marks_the_latest():
    from remotefs_aa.cmd.volumes import snapshot_order

    io = FakeIO()
    c = ch.Chain(io, D, "v", 1, "raw")
    c.create_base("raw", "thin")
    for sid in ("zz", "aa", "mm", "bb"):  # alphabetical order is not the order taken
        c.create_snapshot(sid)
    c.delete_snapshot("mm")  # a middle one: the others keep their order
    report = c.verify(deep=False)
    assert snapshot_order(report["chain"], report["snapshots"]) == (["zz", "aa", "bb"], "bb")
    c.delete_snapshot("bb")  # the latest: the one below becomes the latest
    report = c.verify(deep=False)
    assert snapshot_order(report["chain"], report["snapshots"]) == (["zz", "aa"], "aa")
    assert snapshot_order(["volume-v"], {}) == ([], None)


@pytest.fixture
def locks(memory_locks):
    return memory_locks


def test_the_share_sweep_removes_what_only_a_listing_finds(locks):
    """Orphans of live and of deleted volumes, dead temp files; a busy volume's are kept.

    Operations read only their own names, so these are left to the sweep: one
    share_scan, each volume's lock taken without waiting, an orphan of a live
    volume removed only after a new generation is published.
    """
    io = FakeIO()
    live, gone, busy = (ch.Chain(io, D, vid, 1, "raw") for vid in ("live", "gone", "busy"))
    for c in (live, gone, busy):
        c.create_base("raw", "thin")
        c.create_snapshot("s1")
    for vid in ("live", "gone", "busy"):  # interrupted snapshot creates
        io.create(f"{D}/volume-{vid}.crashed", "qcow2", GiB, f"volume-{vid}.s1", "qcow2", 0o660)
    io.texts[f"{D}/.volume-live.info.tmp-9"] = "{}"  # a publish that died
    gone.delete_volume()  # names what it removes: the orphan stays
    assert f"{D}/volume-gone.crashed" in io.images
    locks.busy.add("remotefs_aa-busy")
    generation = live.load().generation
    driver = _driver(io)
    stats = driver.get_volume_stats(refresh=True)
    assert f"{D}/volume-live.crashed" not in io.images
    assert f"{D}/volume-gone.crashed" not in io.images
    assert f"{D}/.volume-live.info.tmp-9" not in io.texts
    assert f"{D}/volume-busy.crashed" in io.images  # another host may be at work
    assert stats["pools"][0]["leftover_files"] == 1
    assert live.load().generation == generation + 1  # claimed before the removal
    assert not [n for n in io._names() if "gone" in n]
    assert io.listings == 0  # one share_scan, no other read of the directory
    assert live.verify(deep=False)["problems"] == []


def test_operations_never_rescan_capacity_the_periodic_refresh_does():
    io = FakeIO()
    driver = _driver(io)
    # Even with rescans allowed on every poll, the operation path makes none.
    driver.conf.set_override("provisioned_capacity_refresh_interval", 0)
    ch.Chain(io, D, "a", 1, "raw").create_base("raw", "thin")
    driver.get_volume_stats(refresh=True)
    scans = []
    real = io.share_scan
    io.share_scan = lambda *a: scans.append(a) or real(*a)
    ch.Chain(io, D, "other-host", 3, "raw").create_base("raw", "thin")  # another service
    for _ in range(3):
        driver.find_share(1)
    assert scans == [] and driver.share_capacity(D)["provisioned"] == GiB
    driver._account(D, "mine", 2 * GiB)  # this service's own create counts at once
    assert driver.share_capacity(D)["provisioned"] == 3 * GiB
    stats = driver.get_volume_stats(refresh=True)  # Cinder's periodic task
    assert (
        len(scans) == 1 and stats["provisioned_capacity_gb"] == 4
    )  # a, other-host ("mine" is not on the share)
