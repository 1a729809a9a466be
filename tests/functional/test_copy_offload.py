"""Clones on a filesystem with reflinks share their data, byte for byte the source's.

A loop-mounted XFS made with ``reflink=1``, under the service's
``allowed_paths``, holds a local share. The daemon gives ``qemu-img convert``
``-C`` there (copy_file_range: XFS answers with reflinks), so a clone and a
volume from a snapshot take almost no new space, and must still read back
exactly the source's data. The filesystem is unmounted (and its loop device
detached) afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from remotefs_aa import service
from remotefs_aa.objects import Snapshot, Volume
from tests.functional import volumes as v

pytestmark = pytest.mark.functional

MiB = 1024 * 1024


@pytest.fixture
def xfs_share(tmp_path):
    if shutil.which("mkfs.xfs") is None:
        pytest.fail("mkfs.xfs missing (apt-get install xfsprogs; tools/bootstrap.sh --test does)")
    image = tmp_path / "xfs.img"
    with open(image, "wb") as f:
        f.truncate(1024 * MiB)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], check=True)
    mnt = tmp_path / "state" / "xfs"
    mnt.mkdir(parents=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)  # the loop device goes with it
        loops = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True)
        for line in loops.stdout.splitlines():
            subprocess.run(["losetup", "-d", line.split(":", 1)[0]], check=False)


def _free(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _same(a: tuple[str, str], b: tuple[str, str]) -> bool:
    proc = subprocess.run(
        ["qemu-img", "compare", "-U", "-f", a[1], "-F", b[1], a[0], b[0]],
        capture_output=True,
        text=True,
    )
    return proc.returncode == 0


def test_clone_and_volume_from_snapshot_are_reflinked_and_exact(tmp_path, xfs_share):
    from remotefs_aa.privsep import qemu

    share = os.path.join(xfs_share, "share")
    driver = v.start_driver(v.write_config(str(tmp_path), local_shares=share))
    try:
        vol = v.new_volume(driver)
        v.qemu_io(*v.active_image(driver, vol), "write -P 0x31 0 64M")
        snap = Snapshot(vol)
        driver.create_snapshot(snap)
        v.qemu_io(*v.active_image(driver, vol), "write -P 0x32 32M 64M")
        subprocess.run(["sync"], check=True)
        fd = os.open(share, os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert qemu._fs_type(fd) == 0x58465342  # the daemon sees XFS: offload
        finally:
            os.close(fd)

        before = _free(xfs_share)
        clone = Volume(size=1)
        clone.provider_location = driver.create_cloned_volume(clone, vol)["provider_location"]
        from_snap = Volume(size=1)
        update = driver.create_volume_from_snapshot(from_snap, snap)
        from_snap.provider_location = update["provider_location"]
        used = before - _free(xfs_share)
        # 96 MiB and 64 MiB of data copied; with reflinks only metadata is new.
        assert used < 16 * MiB, f"{used // MiB} MiB used: the copies were not reflinked"

        assert _same(v.active_image(driver, clone), v.active_image(driver, vol))
        assert _same(v.active_image(driver, from_snap), v.snapshot_image(driver, snap))
        for volume in (clone, from_snap, vol):
            v.assert_intact(driver, volume)
            driver.delete_volume(volume)
    finally:
        service.stop()
