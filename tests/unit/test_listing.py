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
