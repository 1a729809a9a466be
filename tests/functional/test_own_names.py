"""No operation on a volume reads the share's directory: its cost is its own volume's.

The driver runs with the privileged bodies in this process (``[privileged]
mode = direct``: the same checked code the daemon runs), so every directory read the bodies
make can be counted: ``os.scandir`` on the share is wrapped. After set-up
(which reads each share once, for the capacity figures and the leftover
sweep), creating, snapshotting, deleting snapshots, reverting, extending,
cloning, creating from a snapshot, connecting, finding and deleting volumes
read it zero times, among a few hundred other volumes' files; Cinder's
periodic ``get_volume_stats(refresh=True)`` reads it exactly once.
"""

from __future__ import annotations

import os

import pytest

from remotefs_aa import exception, privsep, service
from remotefs_aa.objects import Snapshot, Volume
from tests.functional import volumes as v

pytestmark = pytest.mark.functional


@pytest.fixture
def driver(tmp_path):
    config = v.write_config(str(tmp_path))
    with open(config) as f:
        text = f.read().replace("mode = privsep", "mode = direct")  # bodies run here (root)
    with open(config, "w") as f:
        f.write(text)
    drv = v.start_driver(config)
    yield drv
    service.stop()
    privsep.runner.set_executor(privsep.runner.Executor())


def test_operations_read_only_their_own_names(driver, monkeypatch):
    share = driver.shares[0]
    for i in range(300):  # other volumes' files
        for name in (f"volume-other{i}", f"volume-other{i}.info", f".volume-other{i}.gen.1"):
            with open(os.path.join(share, name), "w") as f:
                f.write(f'{{"active": "volume-other{i}", "generation": 1}}' if "." in name else "")
    reads: list[str] = []
    real = os.scandir

    def counting(target=None):
        where = os.readlink(f"/proc/self/fd/{target}") if isinstance(target, int) else target
        if os.path.realpath(str(where)) == os.path.realpath(share):
            reads.append(str(where))
        return real(target) if target is not None else real()

    monkeypatch.setattr(os, "scandir", counting)

    vol = v.new_volume(driver)
    v.write(driver, vol, 0, 0x11)
    s1, s2 = Snapshot(vol), Snapshot(vol)
    driver.create_snapshot(s1)
    v.write(driver, vol, 0, 0x22)
    driver.create_snapshot(s2)
    v.write(driver, vol, 0, 0x33)
    driver.revert_to_snapshot(None, vol, s2)
    driver.delete_snapshot(s1)
    driver.extend_volume(vol, 2)
    vol.size = 2
    clone, from_snap = Volume(size=2), Volume(size=2)
    clone.provider_location = driver.create_cloned_volume(clone, vol)["provider_location"]
    update = driver.create_volume_from_snapshot(from_snap, s2)
    from_snap.provider_location = update["provider_location"]
    driver.initialize_connection(vol, {})
    assert driver.find_volume(vol.id).id == vol.id
    with pytest.raises(exception.VolumeExists):
        driver.create_volume(vol)
    for volume in (clone, from_snap, vol):
        driver.delete_volume(volume)
    assert reads == [], f"{len(reads)} directory reads by single-volume operations"

    driver.get_volume_stats(refresh=True)
    assert len(reads) == 1  # the periodic refresh: one read for the whole share
    assert not [n for n in os.listdir(share) if vol.id in n or clone.id in n]
