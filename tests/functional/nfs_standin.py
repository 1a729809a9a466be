"""The test-only ``mount.nfs`` stand-in, installed as /usr/sbin/mount.nfs while a test runs.

These machines' kernels have no NFS client, so an NFS mount (``mount -t nfs``,
from our privileged daemon or from os-brick) ends in
tests/functional/bin/mount.nfs, which bind-mounts a directory standing for
the export. The path is global to the machine: a test that finds it already
there fails (another session's stand-in, or a real NFS client) rather than
replace it, and the stand-in is removed afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator

import pytest

from tests import REPO

STANDIN = os.path.join(REPO, "tests", "functional", "bin", "mount.nfs")
MOUNT_NFS = "/usr/sbin/mount.nfs"
STATE = "/run/rfsaa-nfs-standin"


class StandIn:
    """The fake NFS server's exports, refusals and call log."""

    def __init__(self, state: str, root: str) -> None:
        self.state, self.root = state, root

    def export(self, name: str) -> str:
        directory = os.path.join(self.root, name)
        os.makedirs(directory, exist_ok=True)
        share = f"nfs-server:/exports/{name}"
        with open(os.path.join(self.state, "exports"), "a") as f:
            f.write(f"{share} {directory}\n")
        return share

    def refuse(self, *options: str) -> None:
        with open(os.path.join(self.state, "refuse"), "w") as f:
            f.write("".join(o + "\n" for o in options))

    def calls(self, share: str) -> list[str]:
        with open(os.path.join(self.state, "log")) as f:
            lines = [line.split(" ", 2)[2].strip() for line in f if line.startswith(share + " ")]
        # mount(8) adds "rw" to what it passes its helper.
        return [",".join(o for o in line.split(",") if o != "rw") for line in lines]


@contextlib.contextmanager
def installed(root: str) -> Iterator[StandIn]:
    """The stand-in at /usr/sbin/mount.nfs, exporting directories under ``root``."""
    if os.path.exists(MOUNT_NFS):
        pytest.fail(f"{MOUNT_NFS} exists; this test installs its own stand-in there")
    os.makedirs(STATE, exist_ok=True)
    open(os.path.join(STATE, "exports"), "w").close()
    open(os.path.join(STATE, "log"), "w").close()
    shutil.copy(STANDIN, MOUNT_NFS)
    try:
        yield StandIn(STATE, root)
    finally:
        os.unlink(MOUNT_NFS)
        shutil.rmtree(STATE, ignore_errors=True)
