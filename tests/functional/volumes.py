"""Helpers for the volume tests: configs, drivers, and data checked with qemu-io.

Data is written and read back with the real ``qemu-io`` (as root, like a
hypervisor would), in 64 KiB regions filled with one byte pattern each, so a
region read back proves which image in the chain its data came from.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from remotefs_aa import exception, service
from remotefs_aa.image.chain import GiB
from remotefs_aa.image.store import DirectoryImageService
from remotefs_aa.objects import Snapshot, Volume

REGION = 64 * 1024
#: A region beyond the first GiB, readable only after extend.
GROWN = (GiB + 4 * 1024 * 1024) // REGION


def write_config(directory: str, backend_url: str | None = None, **default: object) -> str:
    """A service config: state under ``directory``, real privsep daemon (no sudo: root)."""
    state = os.path.join(directory, "state")
    path = os.path.join(directory, "rfsaa.conf")
    lines = ["[DEFAULT]", f"state_path = {state}"]
    lines += [f"{k} = {v}" for k, v in default.items()]
    lines += ["[privileged]", "mode = privsep", "root_helper ="]
    lines += [
        "[coordination]",
        f"backend_url = {backend_url or 'file://' + os.path.join(directory, 'coordination')}",
        "initial_reconnect_backoff = 0.05",
        "max_reconnect_backoff = 1.0",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def start_driver(config: str, host: str | None = None):
    """The configured driver, started with real privsep and locks."""
    return service.start(service.make_config(["--config-file", config]), host)


def qemu_io(path: str, fmt: str, command: str, read_only: bool = False) -> str:
    argv = ["qemu-io", "-f", fmt]
    if read_only:
        argv.append("-r")
    argv += ["-c", command, path]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0 and "verification failed" not in out:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {out}")
    return out


def write_region(path: str, fmt: str, region: int, pattern: int) -> None:
    """Fill region ``region`` of the image at ``path`` with byte ``pattern``."""
    qemu_io(path, fmt, f"write -P {pattern} {region * REGION} {REGION}")


def region_is(path: str, fmt: str, region: int, pattern: int) -> bool:
    """Does region ``region`` read back as all ``pattern`` (0: never written)?"""
    out = qemu_io(path, fmt, f"read -P {pattern} {region * REGION} {REGION}", read_only=True)
    return "verification failed" not in out


def active_image(driver, volume) -> tuple[str, str]:
    """(path, format) of the volume's active image, from the .info file."""
    info = driver.initialize_connection(volume, {})["data"]
    return os.path.join(driver.share_path(info["export"]), info["name"]), info["format"]


def snapshot_image(driver, snapshot) -> tuple[str, str]:
    """(path, format) of the image holding the snapshot's data."""
    chain = driver.chain(snapshot.volume)
    link = chain.snapshot_image(chain.load(), snapshot.id)
    return chain.path(link.name), link.format


def volume_files(driver, volume, claims: bool = False) -> list[str]:
    """Every file of the volume (and its leftovers) on its share, sorted.

    ``claims``: include the compare-and-swap's generation claims
    (``.volume-<id>.gen.<N>``, a bounded few per volume), which are
    bookkeeping, not images or leftovers.
    """
    directory = driver.share_path(volume.provider_location)
    base = f"volume-{volume.id}"
    return sorted(
        n
        for n in os.listdir(directory)
        if base in n and (claims or not n.startswith(f".{base}.gen."))
    )


def new_volume(driver, size: int = 1) -> Volume:
    vol = Volume(size=size)
    vol.provider_location = driver.create_volume(vol)["provider_location"]
    return vol


def write(driver, vol, region, pattern):
    write_region(*active_image(driver, vol), region, pattern)


def active_is(driver, vol, region, pattern) -> bool:
    return region_is(*active_image(driver, vol), region, pattern)


def snap_is(driver, snap, region, pattern) -> bool:
    return region_is(*snapshot_image(driver, snap), region, pattern)


def assert_intact(driver, vol):
    report = driver.verify_volume(vol)
    assert report["problems"] == [], report


def exercise_every_method(driver, flavour: str, volume_type: str) -> None:
    """Every driver method on one volume, data checked after each step (see module doc)."""
    provisioned_before = driver.get_volume_stats()["provisioned_capacity_gb"]
    vol = new_volume(driver)
    path = driver.local_path(vol)
    fmt = "qcow2" if flavour == "qcow2" else "raw"
    assert os.path.exists(path)
    if flavour == "raw-sparse":
        # Sparse: 1 GiB long, (almost) nothing allocated (GlusterFS counts a few blocks).
        assert os.stat(path).st_blocks * 512 < 1024 * 1024 and os.path.getsize(path) == GiB
    if flavour == "raw-thick":
        assert os.stat(path).st_blocks * 512 >= GiB
    conn = driver.initialize_connection(vol, {})
    assert conn["driver_volume_type"] == volume_type
    assert conn["data"]["name"] == vol.name and conn["data"]["format"] == fmt

    # Region 0 is overwritten before every snapshot; regions 1-3 are written once each.
    write(driver, vol, 0, 0x11)
    write(driver, vol, 1, 0x11)
    s1 = Snapshot(vol)
    driver.create_snapshot(s1)
    write(driver, vol, 0, 0x22)
    write(driver, vol, 2, 0x22)
    s2 = Snapshot(vol)
    driver.create_snapshot(s2)
    write(driver, vol, 0, 0x33)
    write(driver, vol, 3, 0x33)
    s3 = Snapshot(vol)
    driver.create_snapshot(s3)
    write(driver, vol, 0, 0x44)
    assert_intact(driver, vol)
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
                active_image(driver, vol)[0],
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert all("/" not in link.get("backing-filename", "") for link in chain_info)

    assert snap_is(driver, s1, 0, 0x11) and snap_is(driver, s1, 2, 0)
    assert snap_is(driver, s2, 0, 0x22) and snap_is(driver, s2, 1, 0x11)
    assert snap_is(driver, s3, 0, 0x33) and snap_is(driver, s3, 3, 0x33)
    assert active_is(driver, vol, 0, 0x44)

    # Create from snapshot (bigger), and clone.
    from_s1 = Volume(size=2)
    from_s1.provider_location = driver.create_volume_from_snapshot(from_s1, s1)["provider_location"]
    assert active_is(driver, from_s1, 0, 0x11) and active_is(driver, from_s1, 1, 0x11)
    assert active_is(driver, from_s1, 2, 0)
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
        assert active_is(driver, clone, region, pattern)
    assert_intact(driver, from_s1)
    assert_intact(driver, clone)

    # Delete a middle snapshot: the others keep their data.
    driver.delete_snapshot(s2)
    assert_intact(driver, vol)
    assert snap_is(driver, s1, 0, 0x11)
    assert snap_is(driver, s3, 0, 0x33) and snap_is(driver, s3, 2, 0x22)
    assert active_is(driver, vol, 0, 0x44)

    # Revert to the latest snapshot.
    driver.revert_to_snapshot(None, vol, s3)
    assert_intact(driver, vol)
    assert active_is(driver, vol, 0, 0x33) and active_is(driver, vol, 3, 0x33)
    with pytest.raises(exception.InvalidSnapshot, match="latest"):
        driver.revert_to_snapshot(None, vol, s1)

    # Extend: the active image grows, the data stays.
    driver.extend_volume(vol, 2)
    vol.size = 2
    assert_intact(driver, vol)
    assert active_is(driver, vol, GROWN, 0)  # the new area reads as zeros
    write(driver, vol, GROWN, 0x55)
    assert active_is(driver, vol, GROWN, 0x55)
    assert active_is(driver, vol, 0, 0x33)

    # Delete the active-top snapshot, then the first one: down to the base.
    driver.delete_snapshot(s3)
    assert_intact(driver, vol)
    assert snap_is(driver, s1, 0, 0x11) and active_is(driver, vol, 0, 0x33)
    driver.delete_snapshot(s1)
    assert_intact(driver, vol)
    assert active_image(driver, vol)[0] == path
    for region, pattern in ((0, 0x33), (1, 0x11), (2, 0x22), (3, 0x33)):
        assert active_is(driver, vol, region, pattern)
    driver.delete_snapshot(s1)  # already gone: succeeds, as in Cinder

    exercise_images(driver)

    stats = driver.get_volume_stats()
    assert stats["provisioned_capacity_gb"] - provisioned_before == pytest.approx(5, abs=0.01)
    assert stats["pools"] and stats["total_capacity_gb"] > 0

    for volume in (vol, from_s1, clone):
        driver.delete_volume(volume)
        assert volume_files(driver, volume) == []
    after = driver.get_volume_stats()["provisioned_capacity_gb"]
    assert after == pytest.approx(provisioned_before, abs=0.01)


def image_store(driver) -> DirectoryImageService:
    """An image directory under the service's state path."""
    images = DirectoryImageService(os.path.join(driver.conf.state_path, "images"))
    os.makedirs(images.directory, exist_ok=True)
    return images


def make_image(images: DirectoryImageService, name: str, fmt: str, size: str, **meta) -> str:
    """An image file ``name`` with 0x61 in region 0 and 0x62 in region 5; its path."""
    path = os.path.join(images.directory, name)
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, path, size], check=True)
    write_region(path, fmt, 0, 0x61)
    write_region(path, fmt, 5, 0x62)
    if meta:
        with open(path + ".json", "w") as f:
            json.dump(meta, f)
    return path


def exercise_images(driver) -> None:
    """copy_image_to_volume, then copy_volume_to_image (raw and qcow2), data checked."""
    images = image_store(driver)
    make_image(images, "half-gib", "qcow2", "512M", disk_format="qcow2")
    vol = new_volume(driver)
    driver.copy_image_to_volume(None, vol, images, "half-gib")
    assert_intact(driver, vol)
    beyond_image = (512 + 64) * 1024 * 1024 // REGION
    for region, pattern in ((0, 0x61), (5, 0x62), (beyond_image, 0)):
        assert active_is(driver, vol, region, pattern)
    assert driver.chain(vol).trusted_chain(driver.chain(vol).load())[0].virtual_size == GiB

    # Upload the current data (a snapshot and a newer write on top of it).
    snap = Snapshot(vol)
    driver.create_snapshot(snap)
    write(driver, vol, 0, 0x63)
    for fmt in ("raw", "qcow2"):
        driver.copy_volume_to_image(None, vol, images, {"id": f"out-{fmt}", "disk_format": fmt})
        path = os.path.join(images.directory, f"out-{fmt}")
        info = json.loads(
            subprocess.run(
                ["qemu-img", "info", "--output=json", path], check=True, capture_output=True
            ).stdout
        )
        assert info["format"] == fmt and "backing-filename" not in info
        assert info["virtual-size"] == GiB
        assert region_is(path, fmt, 0, 0x63) and region_is(path, fmt, 5, 0x62)
        assert images.show(None, f"out-{fmt}")["disk_format"] == fmt
    assert os.listdir(driver.conf.image_conversion_dir) == []
    driver.delete_snapshot(snap)
    driver.delete_volume(vol)


def run_demo_workers(configs: list[str], workspace: str, duration: float, seed: int) -> list[dict]:
    """One ``remotefs-aa demo-worker`` process per config, all at once; their results.

    Worker ``i`` of ``len(configs)`` uses the workload directory ``workspace``
    (history, catalog: see remotefs_aa.workload). Processes start in the
    calling thread's network namespace (see gluster.entered), so a caller
    inside one gets workers inside it.
    """
    from tests.functional.conftest import worker_env

    procs = []
    for i, config in enumerate(configs):
        argv = [
            sys.executable,
            "-m",
            "remotefs_aa.cmd.main",
            "--config-file",
            config,
            "demo-worker",
            "--workspace",
            workspace,
            "--index",
            str(i),
            "--workers",
            str(len(configs)),
            "--seed",
            str(seed + i),
            "--duration",
            str(duration),
        ]
        procs.append(
            subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=worker_env()
            )
        )
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=duration + 300)
        lines = [line for line in out.splitlines() if line.startswith("result ")]
        assert lines, (
            f"worker {proc.pid} exited {proc.returncode} without a result: "
            f"{err[-2000:]} {out[-2000:]}"
        )
        results.append(json.loads(lines[-1][len("result ") :]))
    return results
