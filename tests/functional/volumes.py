"""Helpers for the volume tests: configs, drivers, and data checked with qemu-io.

Data is written and read back with the real ``qemu-io`` (as root, like a
hypervisor would), in 64 KiB regions filled with one byte pattern each, so a
region read back proves which image in the chain its data came from.
"""

from __future__ import annotations

import os
import subprocess

from remotefs_aa import service

REGION = 64 * 1024


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


def volume_files(driver, volume) -> list[str]:
    """Every file of the volume (and its leftovers) on its share, sorted."""
    directory = driver.share_path(volume.provider_location)
    base = f"volume-{volume.id}"
    return sorted(n for n in os.listdir(directory) if base in n)
