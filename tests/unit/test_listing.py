"""What the CLI shows of a share: every volume, an unreadable one with its error."""

from __future__ import annotations

from remotefs_aa.drivers.local import LocalDriver
from remotefs_aa.image import chain as ch
from tests.unit.fakes import make_conf
from tests.unit.test_chain import D, FakeIO


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
