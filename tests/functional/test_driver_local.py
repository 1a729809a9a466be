"""Every driver method on the local driver, with the real qemu-img, privsep daemon and locks.

The data is checked with qemu-io: a distinct pattern is written before each
snapshot, and after every delete, revert, clone and copy each remaining
snapshot and the active image must read back exactly what they should.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from remotefs_aa import exception, service
from remotefs_aa.image.chain import GiB
from remotefs_aa.objects import Snapshot, Volume
from tests.functional import volumes as v

pytestmark = pytest.mark.functional

FLAVOURS = {
    "raw-sparse": {},
    "raw-thick": {"local_sparsed_volumes": False},
    "qcow2": {"local_qcow2_volumes": True},
}
#: A region beyond the first GiB, readable only after extend.
GROWN = (GiB + 4 * 1024 * 1024) // v.REGION


@pytest.fixture(params=sorted(FLAVOURS))
def driver(request, tmp_path):
    config = v.write_config(str(tmp_path), **FLAVOURS[request.param])
    drv = v.start_driver(config)
    drv.flavour = request.param
    yield drv
    service.stop()


@pytest.fixture
def raw_driver(tmp_path):
    drv = v.start_driver(v.write_config(str(tmp_path)))
    yield drv
    service.stop()


def _new_volume(driver, size: int = 1) -> Volume:
    vol = Volume(size=size)
    vol.provider_location = driver.create_volume(vol)["provider_location"]
    return vol


def _write(driver, vol, region, pattern):
    v.write_region(*v.active_image(driver, vol), region, pattern)


def _active_is(driver, vol, region, pattern) -> bool:
    return v.region_is(*v.active_image(driver, vol), region, pattern)


def _snap_is(driver, snap, region, pattern) -> bool:
    return v.region_is(*v.snapshot_image(driver, snap), region, pattern)


def _assert_intact(driver, vol):
    report = driver.verify_volume(vol)
    assert report["problems"] == [], report


def test_every_driver_method_keeps_chain_and_data(driver):
    vol = _new_volume(driver)
    path = driver.local_path(vol)
    fmt = "qcow2" if driver.flavour == "qcow2" else "raw"
    assert os.path.exists(path)
    if driver.flavour == "raw-sparse":
        assert os.stat(path).st_blocks == 0 and os.path.getsize(path) == GiB
    if driver.flavour == "raw-thick":
        assert os.stat(path).st_blocks * 512 >= GiB
    conn = driver.initialize_connection(vol, {})
    assert conn["driver_volume_type"] == "local"
    assert conn["data"]["name"] == vol.name and conn["data"]["format"] == fmt

    # Region 0 is overwritten before every snapshot; regions 1-3 are written once each.
    _write(driver, vol, 0, 0x11)
    _write(driver, vol, 1, 0x11)
    s1 = Snapshot(vol)
    driver.create_snapshot(s1)
    _write(driver, vol, 0, 0x22)
    _write(driver, vol, 2, 0x22)
    s2 = Snapshot(vol)
    driver.create_snapshot(s2)
    _write(driver, vol, 0, 0x33)
    _write(driver, vol, 3, 0x33)
    s3 = Snapshot(vol)
    driver.create_snapshot(s3)
    _write(driver, vol, 0, 0x44)
    _assert_intact(driver, vol)
    info = json.loads(open(os.path.join(os.path.dirname(path), vol.name + ".info")).read())
    assert info["active"] == f"{vol.name}.{s3.id}" and info[s1.id] == f"{vol.name}.{s1.id}"
    assert info["generation"] >= 4 and "intent" not in info
    # Relative backing names, so any host can open the chain.
    chain_info = json.loads(
        subprocess.run(
            [
                "qemu-img",
                "info",
                "-U",
                "--output=json",
                "--backing-chain",
                v.active_image(driver, vol)[0],
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert all("/" not in link.get("backing-filename", "") for link in chain_info)

    assert _snap_is(driver, s1, 0, 0x11) and _snap_is(driver, s1, 2, 0)
    assert _snap_is(driver, s2, 0, 0x22) and _snap_is(driver, s2, 1, 0x11)
    assert _snap_is(driver, s3, 0, 0x33) and _snap_is(driver, s3, 3, 0x33)
    assert _active_is(driver, vol, 0, 0x44)

    # Create from snapshot (bigger), and clone.
    from_s1 = Volume(size=2)
    from_s1.provider_location = driver.create_volume_from_snapshot(from_s1, s1)["provider_location"]
    assert _active_is(driver, from_s1, 0, 0x11) and _active_is(driver, from_s1, 1, 0x11)
    assert _active_is(driver, from_s1, 2, 0)
    assert (
        json.loads(
            subprocess.run(
                ["qemu-img", "info", "-U", "--output=json", driver.local_path(from_s1)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )["virtual-size"]
        == 2 * GiB
    )
    clone = Volume(size=1)
    clone.provider_location = driver.create_cloned_volume(clone, vol)["provider_location"]
    for region, pattern in ((0, 0x44), (1, 0x11), (2, 0x22), (3, 0x33)):
        assert _active_is(driver, clone, region, pattern)
    _assert_intact(driver, from_s1)
    _assert_intact(driver, clone)

    # Delete a middle snapshot: the others keep their data.
    driver.delete_snapshot(s2)
    _assert_intact(driver, vol)
    assert _snap_is(driver, s1, 0, 0x11)
    assert _snap_is(driver, s3, 0, 0x33) and _snap_is(driver, s3, 2, 0x22)
    assert _active_is(driver, vol, 0, 0x44)

    # Revert to the latest snapshot.
    driver.revert_to_snapshot(None, vol, s3)
    _assert_intact(driver, vol)
    assert _active_is(driver, vol, 0, 0x33) and _active_is(driver, vol, 3, 0x33)
    with pytest.raises(exception.InvalidSnapshot, match="latest"):
        driver.revert_to_snapshot(None, vol, s1)

    # Extend: the active image grows, the data stays.
    driver.extend_volume(vol, 2)
    vol.size = 2
    _assert_intact(driver, vol)
    _write(driver, vol, GROWN, 0x55)
    assert _active_is(driver, vol, GROWN, 0x55)
    assert _active_is(driver, vol, 0, 0x33)

    # Delete the active-top snapshot, then the first one: down to the base.
    driver.delete_snapshot(s3)
    _assert_intact(driver, vol)
    assert _snap_is(driver, s1, 0, 0x11) and _active_is(driver, vol, 0, 0x33)
    driver.delete_snapshot(s1)
    _assert_intact(driver, vol)
    assert v.active_image(driver, vol)[0] == path
    for region, pattern in ((0, 0x33), (1, 0x11), (2, 0x22), (3, 0x33)):
        assert _active_is(driver, vol, region, pattern)
    driver.delete_snapshot(s1)  # already gone: succeeds, as in Cinder

    stats = driver.get_volume_stats()
    assert stats["provisioned_capacity_gb"] == pytest.approx(5, abs=0.01)
    assert stats["pools"] and stats["total_capacity_gb"] > 0

    for volume in (vol, from_s1, clone):
        driver.delete_volume(volume)
        assert v.volume_files(driver, volume) == []
    assert driver.get_volume_stats()["provisioned_capacity_gb"] == 0


def test_volume_with_snapshots_is_deleted_completely(raw_driver):
    vol = _new_volume(raw_driver)
    snaps = [Snapshot(vol) for _ in range(3)]
    for snap in snaps:
        raw_driver.create_snapshot(snap)
    assert len(v.volume_files(raw_driver, vol)) == 5
    raw_driver.delete_volume(vol)
    assert v.volume_files(raw_driver, vol) == []
    raw_driver.delete_volume(vol)  # again: nothing left, no error


def test_malformed_info_is_a_clear_error_and_deletes_nothing(raw_driver):
    vol = _new_volume(raw_driver)
    raw_driver.create_snapshot(Snapshot(vol))
    before = v.volume_files(raw_driver, vol)
    info = raw_driver.chain(vol).info_path
    for garbage in ("{not json", "[]", '{"active": 3}', '{"active": "/etc/shadow"}'):
        with open(info, "w") as f:
            f.write(garbage)
        with pytest.raises(exception.InvalidInfoFile, match=vol.id):
            raw_driver.create_snapshot(Snapshot(vol))
        with pytest.raises(exception.InvalidInfoFile):
            raw_driver.delete_volume(vol)
        assert v.volume_files(raw_driver, vol) == before


def test_missing_overlay_is_a_clear_error_and_deletes_nothing(raw_driver):
    vol = _new_volume(raw_driver)
    s1, s2 = Snapshot(vol), Snapshot(vol)
    raw_driver.create_snapshot(s1)
    raw_driver.create_snapshot(s2)
    os.unlink(os.path.join(os.path.dirname(raw_driver.local_path(vol)), f"{vol.name}.{s1.id}"))
    before = v.volume_files(raw_driver, vol)
    with pytest.raises(exception.InvalidImage, match="missing"):
        raw_driver.delete_snapshot(s2)
    with pytest.raises(exception.InvalidImage):
        raw_driver.create_snapshot(Snapshot(vol))
    assert v.volume_files(raw_driver, vol) == before


@pytest.mark.parametrize(
    "backing",
    ["/etc/shadow", "../../../etc/shadow", "volume-00000000-other", "OTHER_VOLUME_BASE"],
)
def test_hostile_backing_file_is_refused(raw_driver, backing):
    vol = _new_volume(raw_driver)
    other = _new_volume(raw_driver)
    snap = Snapshot(vol)
    raw_driver.create_snapshot(snap)
    top, _ = v.active_image(raw_driver, vol)
    if backing == "OTHER_VOLUME_BASE":
        backing = other.name
    subprocess.run(
        ["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", backing, "-F", "raw", top], check=True
    )
    before = v.volume_files(raw_driver, vol)
    for op in (
        lambda: raw_driver.create_snapshot(Snapshot(vol)),
        lambda: raw_driver.delete_snapshot(snap),
        lambda: raw_driver.create_cloned_volume(Volume(), vol),
    ):
        with pytest.raises(exception.InvalidImage, match="backing file"):
            op()
    assert v.volume_files(raw_driver, vol) == before
    assert raw_driver.verify_volume(vol)["problems"]


def test_external_data_file_and_oversized_image_are_refused(raw_driver, tmp_path):
    vol = _new_volume(raw_driver)
    snap = Snapshot(vol)
    raw_driver.create_snapshot(snap)
    top, _ = v.active_image(raw_driver, vol)
    os.unlink(top)
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            f"data_file={tmp_path}/stolen",
            top,
            "1G",
        ],
        check=True,
    )
    with pytest.raises(exception.InvalidImage, match="external data file"):
        raw_driver.create_snapshot(Snapshot(vol))
    os.unlink(top)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", vol.name, "-F", "raw", top, "5G"],
        check=True,
    )
    with pytest.raises(exception.InvalidImage, match="exceeds the volume size"):
        raw_driver.create_snapshot(Snapshot(vol))


def test_raw_volume_with_a_fake_qcow2_header_is_never_probed(raw_driver):
    """A guest writes a qcow2 header pointing at /etc/shadow into its raw volume."""
    vol = _new_volume(raw_driver)
    fake = "/tmp/rfsaa-fake-qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "/etc/shadow", "-F", "raw", fake, "1G"],
        check=True,
    )
    try:
        header = open(fake, "rb").read(65536)
    finally:
        os.unlink(fake)
    with open(raw_driver.local_path(vol), "r+b") as f:
        f.write(header)
    snap = Snapshot(vol)
    raw_driver.create_snapshot(snap)
    clone = Volume()
    clone.provider_location = raw_driver.create_cloned_volume(clone, vol)["provider_location"]
    assert raw_driver.verify_volume(vol)["problems"] == []
    # The clone holds the raw bytes (the fake header), not /etc/shadow's content.
    with open(raw_driver.local_path(clone), "rb") as f:
        assert f.read(len(header)) == header


def test_stale_generation_is_refused(raw_driver):
    vol = _new_volume(raw_driver)
    first, second = raw_driver.chain(vol), raw_driver.chain(vol)
    state_a, state_b = first.load(), second.load()
    first.save(state_a)
    with pytest.raises(exception.StaleInfoGeneration, match="generation"):
        second.save(state_b)


def test_volume_already_there_is_not_overwritten(raw_driver):
    vol = _new_volume(raw_driver)
    _write(raw_driver, vol, 0, 0x66)
    with pytest.raises(exception.VolumeExists):
        raw_driver.create_volume(vol)
    assert _active_is(raw_driver, vol, 0, 0x66)


def test_driver_loads_by_name_and_dotted_path(tmp_path):
    from remotefs_aa import drivers

    assert drivers.load_driver_class("local").__name__ == "LocalDriver"
    cls = drivers.load_driver_class("remotefs_aa.drivers.local.LocalDriver")
    assert cls is drivers.load_driver_class("local")
