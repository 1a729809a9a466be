"""A real GlusterFS volume for the tests, isolated in its own network namespace.

glusterd and its brick processes listen on every address, so they run in a
network namespace this module creates (``ip netns add``, loopback up), with a
private mount namespace whose tmpfs covers /var/lib/glusterd (a copy of the
package's), /var/log/glusterfs and /run: nothing they write persists on the
host. The brick is a directory under the test's work directory (``force``:
it is on the root filesystem), addressed by ``$(hostname)``, which resolves to
127.0.0.1 (glusterd refuses 127.0.0.1 and localhost as brick hosts).

Clients must reach glusterd at $(hostname):24007 *inside* that namespace, so
every process that mounts the volume (the FUSE client, our privileged daemon)
runs in it: :func:`entered` moves the calling thread there, and processes it
starts inherit it. Mounts are made in the host's mount namespace, so every
process sees them.

Teardown, also after a failed test: unmount every mount of the volume, kill
every process in the namespace by PID (``ip netns pids``), delete the
namespace and the work directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator

import pytest

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def available() -> bool:
    return all(shutil.which(b) for b in ("glusterd", "gluster", "mount.glusterfs", "ip"))


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def entered(netns_path: str) -> Iterator[None]:
    """Run the calling thread (and the processes it starts) in ``netns_path``."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(netns_path, os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


#: Client-side caches that would let one mount read another mount's old data
#: (a stale .info file) for a while; VM-image volumes turn them off (as the
#: "virt" profile does). doc/glusterfs.md says why remotefs_aa needs this.
CLIENT_CACHES = (
    "performance.quick-read",
    "performance.io-cache",
    "performance.read-ahead",
    "performance.stat-prefetch",
    "performance.open-behind",
    "performance.write-behind",
    "performance.readdir-ahead",
)


class GlusterVolume:
    """glusterd + one volume on one brick, in a namespace of its own."""

    def __init__(self, workdir: str, name: str | None = None) -> None:
        self.workdir = workdir
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
        # A name of its own: the share string ``host:/name`` is what teardown
        # unmounts by, and every volume's host is this machine's name, so two
        # volumes called alike (two test sessions at once) would unmount each
        # other's mounts. Seen: a two-host run lost both mounts mid-run.
        self.name = name or f"rfsaa-{tag}"
        self.host = socket.gethostname()
        self.netns = f"rfsaa-gl-{tag}"
        self.glusterd: subprocess.Popen | None = None
        self.mounts: list[str] = []

    @property
    def netns_path(self) -> str:
        return f"/run/netns/{self.netns}"

    @property
    def share(self) -> str:
        return f"{self.host}:/{self.name}"

    def _gluster(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        assert self.glusterd is not None
        return subprocess.run(
            [
                "nsenter",
                "--target",
                str(self.glusterd.pid),
                "--net",
                "--mount",
                "gluster",
                "--mode=script",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self, timeout: float = 60) -> None:
        lib = os.path.join(self.workdir, "glusterd-lib")
        brick = os.path.join(self.workdir, "brick")
        os.makedirs(brick)
        shutil.copytree("/var/lib/glusterd", lib)
        subprocess.run(["ip", "netns", "add", self.netns], check=True)
        subprocess.run(
            ["ip", "netns", "exec", self.netns, "ip", "link", "set", "lo", "up"], check=True
        )
        script = (
            "set -e; mount -t tmpfs tmpfs /var/lib/glusterd; "
            f"cp -a {lib}/. /var/lib/glusterd/; "
            "mount -t tmpfs tmpfs /var/log/glusterfs; mount -t tmpfs tmpfs /run; "
            "mkdir -p /run/gluster; exec glusterd --no-daemon"
        )
        log = open(os.path.join(self.workdir, "glusterd.log"), "w")
        self.glusterd = subprocess.Popen(
            [
                "nsenter",
                f"--net={self.netns_path}",
                "unshare",
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.glusterd.poll() is not None:
                raise RuntimeError(f"glusterd exited {self.glusterd.returncode}; see {log.name}")
            try:
                if self._gluster("volume", "list", timeout=10).returncode == 0:
                    break
            except subprocess.TimeoutExpired:
                pass  # a loaded host: glusterd is still starting
            if time.monotonic() > deadline:
                raise RuntimeError("glusterd did not answer in time")
            time.sleep(0.2)
        settings = [("volume", "set", self.name, option, "off") for option in CLIENT_CACHES]
        for args in (
            ("volume", "create", self.name, f"{self.host}:{brick}", "force"),
            *settings,
            ("volume", "start", self.name),
        ):
            proc = self._gluster(*args)
            if proc.returncode != 0:
                raise RuntimeError(f"gluster {' '.join(args)}: {proc.stdout} {proc.stderr}")

    def mount(self, mountpoint: str, options: str | None = None) -> str:
        """A FUSE mount of the volume at ``mountpoint`` (made from inside the namespace)."""
        os.makedirs(mountpoint, exist_ok=True)
        extra = ["-o", options] if options else []
        subprocess.run(
            [
                "nsenter",
                f"--net={self.netns_path}",
                "mount",
                "-t",
                "glusterfs",
                *extra,
                self.share,
                mountpoint,
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.mounts.append(mountpoint)
        return mountpoint

    def _mounted(self) -> list[str]:
        """Every mount point of this volume (ours and the drivers'), deepest first."""
        found = []
        with open("/proc/mounts") as f:
            for line in f:
                source, target = line.split()[:2]
                if source == self.share or target in self.mounts:
                    found.append(target)
        return sorted(found, key=len, reverse=True)

    def cleanup(self) -> None:
        for target in self._mounted():
            subprocess.run(["umount", "-l", target], capture_output=True)
        if os.path.exists(self.netns_path):
            pids = subprocess.run(
                ["ip", "netns", "pids", self.netns], capture_output=True, text=True
            ).stdout.split()
            for sig in (signal.SIGTERM, signal.SIGKILL):
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid), sig)
                deadline = time.monotonic() + 5
                while pids and time.monotonic() < deadline:
                    pids = [p for p in pids if os.path.exists(f"/proc/{p}")]
                    time.sleep(0.05)
            subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
        if self.glusterd is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.glusterd.wait(timeout=5)
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def started_volume() -> Iterator[GlusterVolume]:
    """A started test volume in a fresh /var/tmp directory, cleaned up on the way out.

    The tests' module fixtures all want this; GlusterFS missing is a failure,
    not a skip (the test command installs it).
    """
    if not available():
        pytest.fail("GlusterFS is not installed: run tools/bootstrap.sh --test")
    volume = GlusterVolume(tempfile.mkdtemp(prefix="rfsaa-gl-", dir="/var/tmp"))
    try:
        volume.start()
        yield volume
    finally:
        volume.cleanup()
