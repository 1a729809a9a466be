"""Every driver method on the local driver, with the real qemu-img, privsep daemon and locks.

The data is checked with qemu-io: a distinct pattern is written before each
snapshot, and after every delete, revert, clone and copy each remaining
snapshot and the active image must read back exactly what they should.
"""

from __future__ import annotations

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


def test_every_driver_method_keeps_chain_and_data(driver):
    v.exercise_every_method(driver, driver.flavour, "local")


def test_volume_with_snapshots_is_deleted_completely(raw_driver):
    vol = v.new_volume(raw_driver)
    snaps = [Snapshot(vol) for _ in range(3)]
    for snap in snaps:
        raw_driver.create_snapshot(snap)
    assert len(v.volume_files(raw_driver, vol)) == 5
    assert len(v.volume_files(raw_driver, vol, claims=True)) == 5 + 4  # one per generation
    raw_driver.delete_volume(vol)
    assert v.volume_files(raw_driver, vol, claims=True) == []
    raw_driver.delete_volume(vol)  # again: nothing left, no error


def test_malformed_info_is_a_clear_error_and_deletes_nothing(raw_driver):
    vol = v.new_volume(raw_driver)
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
    vol = v.new_volume(raw_driver)
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
    vol = v.new_volume(raw_driver)
    other = v.new_volume(raw_driver)
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
    vol = v.new_volume(raw_driver)
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


def test_snapshot_delete_with_a_size_from_before_an_extend_succeeds(raw_driver):
    """Another host extended the volume after this caller read its size (CI saw it in Cinder).

    Cinder records the new size only after the extending host released the
    volume's lock, so the next holder can be handed the old one. A snapshot
    delete does not depend on the size: it merges and keeps the share's size.
    A snapshot create with that stale size is still refused (its overlay
    would be smaller than the volume), losing nothing.
    """
    vol = v.new_volume(raw_driver)
    first, second = Snapshot(vol), Snapshot(vol)
    v.write(raw_driver, vol, 0, 0x11)
    raw_driver.create_snapshot(first)
    v.write(raw_driver, vol, 0, 0x22)
    raw_driver.create_snapshot(second)
    v.write(raw_driver, vol, 1, 0x33)
    stale = Volume(id=vol.id, size=vol.size, provider_location=vol.provider_location)
    raw_driver.extend_volume(vol, 2)
    vol.size = 2
    with pytest.raises(exception.InvalidImage, match="exceeds the volume size"):
        raw_driver.create_snapshot(Snapshot(stale))
    assert raw_driver.delete_snapshot(Snapshot(stale, id=first.id)) is True
    v.assert_intact(raw_driver, vol)
    assert v.snap_is(raw_driver, second, 0, 0x22)
    assert v.active_is(raw_driver, vol, 0, 0x22) and v.active_is(raw_driver, vol, 1, 0x33)
    assert raw_driver.chain(vol).trusted_chain(raw_driver.chain(vol).load())[0].virtual_size == (
        2 * GiB
    )


def test_raw_volume_with_a_fake_qcow2_header_is_never_probed(raw_driver):
    """A guest writes a qcow2 header pointing at /etc/shadow into its raw volume."""
    vol = v.new_volume(raw_driver)
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
    vol = v.new_volume(raw_driver)
    first, second = raw_driver.chain(vol), raw_driver.chain(vol)
    state_a, state_b = first.load(), second.load()
    first.save(state_a)
    with pytest.raises(exception.StaleInfoGeneration, match="generation"):
        second.save(state_b)


def test_extend_zeroes_the_new_area_when_the_backing_file_is_longer(raw_driver):
    """The top smaller than its backing file: extend must not skip the backing chain.

    Extend normally resizes the top without opening the chain (the backing
    file is no longer than the top, so nothing can show through). Here the
    backing file's data lies beyond the top's end; a resize that did not
    look at the backing file would expose it in the grown area.
    """
    vol = v.new_volume(raw_driver, size=2)
    beyond_top = GiB // v.REGION + 1  # inside the base's second GiB
    v.write(raw_driver, vol, beyond_top, 0x77)
    raw_driver.create_snapshot(Snapshot(vol))
    top, _ = v.active_image(raw_driver, vol)
    subprocess.run(["qemu-img", "resize", "-q", "--shrink", top, "1G"], check=True)
    raw_driver.extend_volume(vol, 3)
    vol.size = 3
    v.assert_intact(raw_driver, vol)
    assert v.active_is(raw_driver, vol, beyond_top, 0)
    assert not v.active_is(raw_driver, vol, beyond_top, 0x77)


@pytest.mark.parametrize(
    "case",
    ["backing-file", "format-mismatch", "too-large", "not-an-image-format", "has-snapshots"],
)
def test_unusable_image_is_refused_and_the_volume_is_untouched(raw_driver, case):
    images = v.image_store(raw_driver)
    vol = v.new_volume(raw_driver)
    v.write(raw_driver, vol, 0, 0x44)
    if case == "backing-file":
        path = os.path.join(images.directory, "img")
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "/etc/shadow", "-F", "raw", path],
            check=True,
        )
        match, error = "backing file", exception.ImageRefused
    elif case == "format-mismatch":
        v.make_image(images, "img", "qcow2", "64M", disk_format="raw")
        match, error = "says disk_format 'raw' but the file is 'qcow2'", exception.ImageRefused
    elif case == "too-large":
        v.make_image(images, "img", "qcow2", "2G")
        match, error = "exceeds volume", exception.ImageRefused
    elif case == "not-an-image-format":
        v.make_image(images, "img", "vpc", "64M")
        match, error = "only raw and qcow2", exception.ImageRefused
    else:
        v.make_image(images, "img", "raw", "64M", disk_format="raw")
        raw_driver.create_snapshot(Snapshot(vol))
        v.write(raw_driver, vol, 0, 0x44)
        match, error = "has snapshots", exception.VolumeBusy
    before = v.volume_files(raw_driver, vol)
    generation = raw_driver.chain(vol).load().generation
    with pytest.raises(error, match=match):
        raw_driver.copy_image_to_volume(None, vol, images, "img")
    assert v.volume_files(raw_driver, vol) == before
    assert raw_driver.chain(vol).load().generation == generation
    assert v.active_is(raw_driver, vol, 0, 0x44)
    v.assert_intact(raw_driver, vol)
    assert os.listdir(raw_driver.conf.image_conversion_dir) == []


def test_conversion_dir_outside_allowed_paths_is_a_clear_error(tmp_path):
    outside = tmp_path / "elsewhere" / "conversion"  # state_path is tmp_path/state
    drv = v.start_driver(v.write_config(str(tmp_path), image_conversion_dir=str(outside)))
    try:
        images = v.image_store(drv)
        v.make_image(images, "img", "raw", "64M")
        vol = v.new_volume(drv)
        before = v.volume_files(drv, vol)
        with pytest.raises(exception.InvalidConfig, match="image_conversion_dir.*allowed_paths"):
            drv.copy_image_to_volume(None, vol, images, "img")
        with pytest.raises(exception.InvalidConfig, match="image_conversion_dir"):
            drv.copy_volume_to_image(None, vol, images, {"id": "out"})
        assert not outside.exists() and v.volume_files(drv, vol) == before
        drv.delete_volume(vol)
    finally:
        service.stop()


def test_volume_already_there_is_not_overwritten(raw_driver):
    vol = v.new_volume(raw_driver)
    v.write(raw_driver, vol, 0, 0x66)
    with pytest.raises(exception.VolumeExists):
        raw_driver.create_volume(vol)
    assert v.active_is(raw_driver, vol, 0, 0x66)


def test_driver_loads_by_name_and_dotted_path(tmp_path):
    from remotefs_aa import drivers

    assert drivers.load_driver_class("local").__name__ == "LocalDriver"
    cls = drivers.load_driver_class("remotefs_aa.drivers.local.LocalDriver")
    assert cls is drivers.load_driver_class("local")


@pytest.mark.parametrize("mode", ["rootwrap_daemon", "sudo_rootwrap"])
def test_every_driver_method_in_the_rootwrap_modes(tmp_path, mode):
    """The same driver code with every privileged step a rootwrap-filtered command."""
    from remotefs_aa.privsep import rootwrap_filters

    state = tmp_path / "state"
    conf_dir = tmp_path / "rootwrap"  # outside allowed_paths, as the service demands
    (conf_dir / "rootwrap.d").mkdir(parents=True)
    (conf_dir / "rootwrap.d" / "remotefs_aa.filters").write_text(
        rootwrap_filters.generate([str(state)])
    )
    (conf_dir / "rootwrap.conf").write_text(
        rootwrap_filters.rootwrap_conf(str(conf_dir / "rootwrap.d"))
    )
    config = tmp_path / "rfsaa.conf"
    config.write_text(
        f"[DEFAULT]\nstate_path = {state}\n[privileged]\nmode = {mode}\nroot_helper = sudo -n\n"
        f"rootwrap_config = {conf_dir}/rootwrap.conf\n"
        f"[coordination]\nbackend_url = file://{tmp_path}/coordination\n"
    )
    driver = v.start_driver(str(config))
    try:
        v.exercise_every_method(driver, "raw-sparse", "local")
    finally:
        service.stop()


def test_rescanned_capacity_counts_an_extended_chain_at_its_top(tmp_path):
    """An extend grows only the top of a chain; a rescan must not count the base's size."""
    drv = v.start_driver(v.write_config(str(tmp_path), provisioned_capacity_refresh_interval=0))
    try:
        before = drv.get_volume_stats()["provisioned_capacity_gb"]
        vol = v.new_volume(drv)
        drv.create_snapshot(Snapshot(vol))
        drv.extend_volume(vol, 3)
        plain = v.new_volume(drv, size=2)
        stats = drv.get_volume_stats()
        assert stats["provisioned_capacity_gb"] - before == pytest.approx(5, abs=0.01)
        for volume in (vol, plain):
            drv.delete_volume(volume)
    finally:
        service.stop()


def test_leftovers_of_interrupted_work_are_swept_unless_their_volume_is_busy(raw_driver, tmp_path):
    """A dead create's temp file goes; one whose volume's lock another process holds stays."""
    import time as _time

    from tests.functional.conftest import spawn_worker

    share = raw_driver.shares[0]
    dead, busy = "0ld-create", "b0sy-create"
    for name in (f".volume-{dead}.tmp", f".volume-{dead}.info.tmp-abc123", f".volume-{busy}.tmp"):
        with open(os.path.join(share, name), "wb") as f:
            f.write(b"x" * 4096)
    ready = tmp_path / "holder.ready"
    holder = spawn_worker(
        "hold", "--config", raw_driver.conf.config_file[0], "--name", busy, "--ready", str(ready)
    )
    try:
        deadline = _time.monotonic() + 30
        while not ready.exists() and _time.monotonic() < deadline:
            _time.sleep(0.05)
        assert ready.exists(), holder.stderr.read() if holder.poll() is not None else "no ready"
        stats = raw_driver.get_volume_stats(refresh=True)
        left = sorted(n for n in os.listdir(share) if n.startswith(".volume-"))
        assert left == [f".volume-{busy}.tmp"]  # the busy volume's is another host's work
        assert stats["pools"][0]["leftover_files"] == 1
    finally:
        holder.kill()
        holder.wait(10)
    raw_driver.get_volume_stats(refresh=True)
    assert not [n for n in os.listdir(share) if n.startswith(".volume-")]
    assert raw_driver.get_volume_stats()["pools"][0]["leftover_files"] == 0
