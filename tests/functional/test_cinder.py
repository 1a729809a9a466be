"""Real Cinder 29 drives the drivers named in cinder.conf (one host).

* Cinder's own VolumeManager (database from ``cinder-manage db sync`` on
  sqlite, ``transport_url = fake://``) runs every operation on the local
  driver, the NFS driver (over the test-only mount.nfs stand-in) and the
  GlusterFS driver (a real volume in a network namespace), once monkey-patched
  by eventlet and once with ``OS_CINDER_DISABLE_EVENTLET_PATCHING=1``; the
  chain is verified after each step (tests/functional/cinder_worker.py).
* The real ``cinder-volume`` binary starts with a cinder.conf that names
  ``remotefs_aa.drivers.nfs.NfsDriver``, reports the driver initialised and
  stops cleanly on SIGTERM.
* os-brick's own NFS and GlusterFS connectors mount and open what
  ``initialize_connection`` returned; qemu-io reads the data back.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

import pytest

from tests.functional import cinder_env as ce
from tests.functional import gluster, nfs_standin, servers
from tests.functional import volumes as v

pytestmark = pytest.mark.functional

DRIVERS = {
    "local": "remotefs_aa.drivers.local.LocalDriver",
    "nfs": "remotefs_aa.drivers.nfs.NfsDriver",
    "glusterfs": "remotefs_aa.drivers.glusterfs.GlusterfsDriver",
}


@pytest.fixture(scope="module", autouse=True)
def cinder():
    ce.cinder_installed()


@pytest.fixture(scope="module")
def gl():
    with gluster.started_volume() as volume:
        yield volume


def unmount_under(directory: str) -> None:
    """Unmount every mount below ``directory`` (what the drivers and os-brick made)."""
    with open("/proc/mounts") as f:
        targets = [line.split()[1] for line in f]
    for target in sorted(targets, key=len, reverse=True):
        if target.startswith(str(directory).rstrip("/") + "/"):
            subprocess.run(["umount", target], capture_output=True, check=False)
    with open("/proc/mounts") as f:
        left = [line.split()[1] for line in f if line.split()[1].startswith(str(directory))]
    assert left == [], f"still mounted: {left}"


@contextlib.contextmanager
def backend(kind: str, tmp_path, request):
    """(config, backend name, netns or None) for a backend of ``kind``; unmounted after."""
    name = f"rfsaa-{kind}"
    options: dict[str, object] = {}
    netns = None
    with contextlib.ExitStack() as stack:
        stack.callback(unmount_under, str(tmp_path))
        if kind == "nfs":
            nfs = stack.enter_context(nfs_standin.installed(str(tmp_path / "exports")))
            share = nfs.export("cinder")
            shares = tmp_path / "nfs_shares"
            shares.write_text(f"{share} -o noatime\n")
            options = {"nfs_shares_config": shares, "nfs_snapshot_support": True}
        elif kind == "glusterfs":
            gl = request.getfixturevalue("gl")
            shares = tmp_path / "glusterfs_shares"
            shares.write_text(gl.share + "\n")
            options = {"glusterfs_shares_config": shares}
            netns = gl.netns_path
        config = ce.write_conf(str(tmp_path), name, DRIVERS[kind], options)
        ce.db_sync(config)
        yield config, name, netns


def start_in(netns: str | None, *args, **kwargs) -> subprocess.Popen:
    if netns is None:
        return ce.start_worker(*args, **kwargs)
    with gluster.entered(netns):
        return ce.start_worker(*args, **kwargs)


@pytest.mark.parametrize("mode", sorted(ce.MODES))
@pytest.mark.parametrize("kind", sorted(DRIVERS))
def test_volume_manager_drives_every_operation(kind, mode, tmp_path, request):
    with backend(kind, tmp_path, request) as (config, name, netns):
        started = time.monotonic()
        proc = start_in(
            netns,
            "single",
            config,
            name,
            "--driver-class",
            DRIVERS[kind],
            "--volume-type",
            kind,
            mode=mode,
        )
        result = ce.result_of(proc, 120, config)
        elapsed = time.monotonic() - started
    assert result["patched"] is (mode == "eventlet")
    print(f"{kind}/{mode}: {elapsed:.1f} s; steps (ms): {result['steps']}")
    assert elapsed < 60


# -- the real cinder-volume binary --------------------------------------------------

READY = "Driver post RPC initialization completed successfully"


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            with open(f"/proc/{parent}/task/{parent}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except OSError:
            kids = []
        found += kids
        todo += kids
    return found


@pytest.mark.parametrize("mode", sorted(ce.MODES))
def test_cinder_volume_binary_starts_with_our_nfs_driver(mode, tmp_path, request):
    with backend("nfs", tmp_path, request) as (config, _name, _netns):
        log = tmp_path / "cinder.log"
        started = time.monotonic()
        proc = subprocess.Popen(
            [os.path.join(ce.BIN, "cinder-volume"), "--config-file", config],
            env=ce.env(mode),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            text = ""
            while READY not in text:
                assert proc.poll() is None, (
                    f"cinder-volume exited {proc.returncode}: {text[-3000:]}"
                )
                assert time.monotonic() - started < 60, f"not ready in 60 s:\n{text[-3000:]}"
                time.sleep(0.2)
                text = log.read_text() if log.exists() else ""
            ready = time.monotonic() - started
            children = _descendants(proc.pid)
            assert "Starting volume driver NfsDriver (1.0.0)" in text
            assert "Driver initialization completed successfully" in text
            assert " ERROR " not in text, text[-3000:]
            # do_setup ran in the forked child: the share is mounted there.
            with open("/proc/mounts") as f:
                assert any(line.split()[1].startswith(str(tmp_path)) for line in f)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
        stopped = time.monotonic() - started - ready
        assert rc == 0, f"cinder-volume exited {rc}: {proc.stderr.read()[-2000:]}"
        deadline = time.monotonic() + 10
        while any(os.path.exists(f"/proc/{c}") for c in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [c for c in children if os.path.exists(f"/proc/{c}")], "processes left"
    print(f"cinder-volume ({mode}): ready after {ready:.1f} s, stopped in {stopped:.1f} s")


# -- os-brick connectors on what initialize_connection returned -------------------------


@pytest.mark.parametrize("kind", ["nfs", "glusterfs"])
def test_os_brick_connectors_open_what_initialize_connection_returns(kind, tmp_path, request):
    from os_brick.initiator import connector as brick
    from oslo_concurrency import processutils

    with backend(kind, tmp_path, request) as (config, name, netns):
        result = ce.result_of(start_in(netns, "connection", config, name), 120, config)
        info = result["connection_info"]
        data = info["data"]
        assert info["driver_volume_type"] == kind
        assert data["format"] == "qcow2" and "." in data["name"]  # the active overlay
        if kind == "nfs":
            assert data["options"] == "-o noatime"
        else:
            assert data["options"].startswith("-o entry-timeout=0,")
        # A compute host has nothing mounted yet: os-brick must mount it itself.
        unmount_under(str(tmp_path))
        conn = brick.InitiatorConnector.factory(
            kind.upper(), root_helper="", execute=processutils.execute, conn=info
        )
        with gluster.entered(netns) if netns else contextlib.nullcontext():
            device = conn.connect_volume(data)
        mountpoint = os.path.dirname(device["path"])
        assert mountpoint.startswith(info["mount_point_base"])
        with open("/proc/mounts") as f:
            assert any(line.split()[1] == mountpoint for line in f)
        assert v.region_is(device["path"], data["format"], 0, result["patterns"]["0"])
        assert v.region_is(device["path"], data["format"], 1, result["patterns"]["1"])
        conn.disconnect_volume(data, device)


# -- the lock provider's heartbeat in a monkey-patched and in a native-thread service ---------


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    server = servers.SERVERS["redis"](workdir=str(tmp_path_factory.mktemp("redis-hb")))
    if not server.available():
        pytest.fail("redis-server is not installed; run tools/bootstrap.sh --test")
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.mark.parametrize("mode", sorted(ce.MODES))
def test_locks_outlive_their_expiry_while_held(mode, redis, tmp_path):
    name = "rfsaa-local"
    config = ce.write_conf(str(tmp_path), name, DRIVERS["local"], {}, backend_url=redis.url)
    ce.db_sync(config)
    result = ce.run_worker("heartbeat", config, name, "--expiry", str(redis.lock_expiry), mode=mode)
    assert result["patched"] is (mode == "eventlet") and result["heartbeat"] is True
    assert result["busy_checks"] >= 5
