"""Share selection and stats: over-subscription, reserved space, per-share pools."""

from __future__ import annotations

import pytest

from remotefs_aa import exception
from remotefs_aa.drivers.local import LocalDriver
from tests.unit.fakes import make_conf

GiB = 1024**3


class StatsIO:
    """Just what capacity needs: statvfs per share and a listing of volume files."""

    def __init__(self, space: dict[str, tuple[int, int]], files: dict[str, dict[str, int]]):
        self.space, self.files = space, files

    def statvfs(self, path):
        total, free = self.space[path]
        return {"total": total, "free": free, "available": free}

    def list_directory(self, path):
        return dict(self.files.get(path, {}))

    def share_scan(self, path, default_format):
        """The daemon's one pass over a share: raw volumes without snapshots, sized by file."""
        volumes = {}
        for name, size in self.files.get(path, {}).items():
            volumes[name[len("volume-") :]] = {
                "info": None,
                "deleting": False,
                "base": True,
                "size": size,
                "error": None,
                "files": [name],
            }
        return {"volumes": volumes}


def _driver(io, **overrides):
    conf = make_conf()
    conf.set_override("local_shares", list(io.space))
    for key, value in overrides.items():
        conf.set_override(key, value)
    driver = LocalDriver(conf, host="h", io=io)
    driver._shares = driver.load_shares()
    return driver


def test_thin_selection_honours_over_subscription_and_picks_most_headroom():
    io = StatsIO(
        {"/a": (100 * GiB, 50 * GiB), "/b": (100 * GiB, 80 * GiB)},
        {"/a": {"volume-1": 150 * GiB}, "/b": {"volume-2": 10 * GiB}},
    )
    driver = _driver(io, max_over_subscription_ratio=2.0)
    assert driver.find_share(10) == "/b"  # /b: 200 - 10 = 190 GiB of headroom
    with pytest.raises(exception.VolumeError, match="no share can take a 500 GiB volume"):
        driver.find_share(500)
    stats = driver.get_volume_stats()
    assert [p["pool_name"] for p in stats["pools"]] == ["/a", "/b"]
    assert stats["provisioned_capacity_gb"] == 160
    assert stats["total_capacity_gb"] == 200 and stats["free_capacity_gb"] == 130
    assert stats["thin_provisioning_support"] is True


def test_reserved_percentage_and_thick_need_real_space():
    io = StatsIO({"/a": (100 * GiB, 30 * GiB)}, {})
    driver = _driver(io, reserved_percentage=25, local_sparsed_volumes=False)
    assert driver.thick
    assert driver.find_share(4) == "/a"  # 30 - 25 = 5 GiB really free beyond the reserve
    with pytest.raises(exception.VolumeError, match="reserved_percentage=25"):
        driver.find_share(6)


def test_own_creates_and_deletes_are_counted_between_rescans():
    io = StatsIO({"/a": (100 * GiB, 90 * GiB)}, {"/a": {"volume-1": 10 * GiB}})
    driver = _driver(io, provisioned_capacity_refresh_interval=3600)
    assert driver.share_capacity("/a")["provisioned"] == 10 * GiB
    driver._account("/a", "2", 5 * GiB)
    assert driver.share_capacity("/a")["provisioned"] == 15 * GiB
    driver._account("/a", "1", None)
    assert driver.share_capacity("/a")["provisioned"] == 5 * GiB


def test_auto_over_subscription_uses_the_share_and_is_reported_as_auto():
    io = StatsIO({"/a": (100 * GiB, 91 * GiB)}, {"/a": {"volume-1": 90 * GiB}})
    driver = _driver(io, max_over_subscription_ratio="auto")
    cap = driver.share_capacity("/a")
    assert cap["max_over_subscription_ratio"] == pytest.approx(10.0)  # 1 + 90 / (9 + 1)
    assert driver.find_share(900) == "/a"  # 100 * 10 - 90 = 910 GiB of headroom
    with pytest.raises(exception.VolumeError, match="max_over_subscription_ratio=auto"):
        driver.find_share(920)
    stats = driver.get_volume_stats()
    assert stats["max_over_subscription_ratio"] == "auto"
    assert stats["pools"][0]["max_over_subscription_ratio"] == "auto"


def test_the_schedulers_pool_is_honoured_when_it_fits():
    io = StatsIO(
        {"/a": (100 * GiB, 10 * GiB), "/b": (100 * GiB, 90 * GiB)},
        {"/a": {"volume-1": 95 * GiB}},
    )
    driver = _driver(io, max_over_subscription_ratio=1.0)

    class Scheduled:
        size = 1
        host = "cinder-1@backend#/a"

    assert driver.choose_share(Scheduled()) == "/a"  # not /b, which has more room
    Scheduled.host = "cinder-1@backend#/gone"
    assert driver.choose_share(Scheduled()) == "/b"
    Scheduled.size, Scheduled.host = 10, "cinder-1@backend#/a"
    assert driver.choose_share(Scheduled()) == "/b"  # /a has only 5 GiB left
