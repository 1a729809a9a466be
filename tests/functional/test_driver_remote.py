"""The GlusterFS and NFS drivers on a real GlusterFS volume, mounted through the real daemon.

The GlusterFS volume (tests/functional/gluster.py) runs in a network namespace
of its own; the drivers (and so their privileged daemons, which run mount)
are started inside it. NFS has no kernel client on these machines, so the NFS
driver's real mount path ends in a test-only ``mount.nfs`` stand-in
(tests/functional/bin/mount.nfs), installed for this module and removed after,
which bind-mounts a directory of the GlusterFS volume standing for the export.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading

import pytest

from remotefs_aa import exception, service, workload
from remotefs_aa.drivers.mounted import SECURE_INDICATOR, ShareMountFailed
from tests.functional import gluster, nfs_standin, servers
from tests.functional import volumes as v
from tests.functional.conftest import worker_env

pytestmark = pytest.mark.functional


@pytest.fixture(scope="module")
def gl():
    with gluster.started_volume() as volume:
        volume.mount(os.path.join(volume.workdir, "mnt"))
        yield volume


@pytest.fixture(scope="module")
def nfs(gl):
    with nfs_standin.installed(os.path.join(gl.mounts[0], "exports")) as standin:
        yield standin


def _config(tmp_path, kind: str, shares: list[str], **extra) -> str:
    shares_file = tmp_path / f"{kind}_shares"
    shares_file.write_text("# test shares\n" + "".join(s + "\n" for s in shares))
    return v.write_config(
        str(tmp_path), volume_driver=kind, **{f"{kind}_shares_config": shares_file}, **extra
    )


class Started:
    """A driver started inside the volume's namespace; unmounted and stopped after."""

    def __init__(self, gl, config: str, host: str | None = None) -> None:
        self.gl, self.config, self.host = gl, config, host

    def __enter__(self):
        with gluster.entered(self.gl.netns_path):
            self.driver = v.start_driver(self.config, self.host)
        return self.driver

    def __exit__(self, *exc) -> None:
        try:
            self.driver.unmount_shares()
        finally:
            service.stop()


@pytest.mark.parametrize("flavour", ["raw-sparse", "qcow2"])
def test_glusterfs_every_method(gl, tmp_path, flavour):
    extra = {"glusterfs_qcow2_volumes": True} if flavour == "qcow2" else {}
    with Started(gl, _config(tmp_path, "glusterfs", [gl.share], **extra)) as driver:
        mountpoint = driver.share_path(gl.share)
        assert mountpoint.startswith(str(tmp_path / "state" / "mnt"))
        with open("/proc/mounts") as f:
            assert any(line.split()[1] == mountpoint for line in f)
        v.exercise_every_method(driver, flavour, "glusterfs")
    with open("/proc/mounts") as f:
        assert not any(line.split()[1] == mountpoint for line in f)


def test_nfs_every_method_with_version_fallback(gl, nfs, tmp_path):
    share = nfs.export("fallback")
    nfs.refuse("vers=4.2")
    try:
        config = _config(tmp_path, "nfs", [f"{share} -o noatime"], nfs_snapshot_support=True)
        with Started(gl, config) as driver:
            assert nfs.calls(share) == ["noatime,vers=4.2", "noatime,vers=4.1"]
            v.exercise_every_method(driver, "raw-sparse", "nfs")
            conn = driver.initialize_connection(v.new_volume(driver), {})
            # Mount flags, as os-brick passes them to mount(8) (Cinder's form).
            assert conn["data"]["options"] == "-o noatime"
    finally:
        nfs.refuse()


def test_nfs_pinned_version_and_nas_host(gl, nfs, tmp_path):
    share = nfs.export("pinned")
    host, path = share.split(":", 1)
    config = v.write_config(
        str(tmp_path),
        volume_driver="remotefs_aa.drivers.nfs.NfsDriver",
        nas_host=host,
        nas_share_path=path,
        nas_mount_options="vers=3",
    )
    with Started(gl, config) as driver:
        assert type(driver).__name__ == "NfsDriver" and driver.shares == [share]
        assert nfs.calls(share) == ["vers=3"]


def test_connection_info_is_what_os_brick_connectors_expect(gl, nfs, tmp_path):
    from os_brick.initiator.connectors import remotefs as brick

    share = nfs.export("brick")
    with Started(gl, _config(tmp_path, "nfs", [share])) as driver:
        vol = v.new_volume(driver)
        conn = driver.initialize_connection(vol, {"host": "compute-1"})
        assert conn["driver_volume_type"] == "nfs"
        assert set(conn["data"]) == {"export", "name", "options", "format"}
        assert conn["mount_point_base"] == os.path.realpath(driver.mount_base)
        # The mount base comes from the connection info, as Cinder's does.
        connector = brick.RemoteFsConnector("nfs", root_helper=None, conn=conn)
        assert connector._get_volume_path(conn["data"]) == driver.local_path(vol)
        driver.delete_volume(vol)


def test_existing_mount_is_reused_by_two_drivers_on_one_host(gl, tmp_path):
    config = _config(tmp_path, "glusterfs", [gl.share])
    errors = []

    def setup_one() -> None:
        try:
            with gluster.entered(gl.netns_path):
                proc = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "remotefs_aa.cmd.main",
                        "--config-file",
                        config,
                        "stats",
                        "--format",
                        "json",
                    ],
                    capture_output=True,
                    text=True,
                    env=worker_env(),
                    timeout=120,
                )
            if proc.returncode != 0:
                errors.append(proc.stderr)
        except Exception as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=setup_one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with Started(gl, config) as driver:
        mountpoint = driver.share_path(gl.share)
        with open("/proc/mounts") as f:
            assert [line.split()[1] for line in f].count(mountpoint) == 1


def test_unmountable_share_is_a_clear_error_and_leaves_nothing(gl, nfs, tmp_path):
    missing = "nfs-server:/exports/not-exported"
    config = _config(tmp_path, "nfs", [missing], nfs_mount_attempts=2)
    with gluster.entered(gl.netns_path):
        with pytest.raises(ShareMountFailed, match="could not mount share nfs-server:/exports/"):
            v.start_driver(config)
    service.stop()
    assert len(nfs.calls(missing)) == 6  # 2 rounds x (4.2, 4.1, default)
    mnt = tmp_path / "state" / "mnt"
    assert not mnt.exists() or os.listdir(mnt) == []


def test_unreachable_gluster_server_is_a_clear_error(gl, tmp_path):
    config = _config(
        tmp_path, "glusterfs", ["no-such-host.invalid:/rfsaa"], glusterfs_mount_attempts=1
    )
    with gluster.entered(gl.netns_path):
        with pytest.raises(ShareMountFailed, match="no-such-host.invalid:/rfsaa"):
            v.start_driver(config)
    service.stop()


def test_malformed_shares_file_names_the_line(tmp_path):
    config = _config(tmp_path, "nfs", ["server:/ok", "not a share line"])
    with pytest.raises(exception.InvalidConfig, match="nfs_shares line 3"):
        v.start_driver(config)
    service.stop()


@pytest.mark.parametrize("fresh", [True, False])
def test_secure_file_permissions_auto(gl, nfs, tmp_path, fresh):
    share = nfs.export(f"secure-{fresh}")
    if not fresh:
        open(os.path.join(nfs.root, f"secure-{fresh}", "volume-legacy"), "w").close()
    with Started(gl, _config(tmp_path, "nfs", [share])) as driver:
        indicator = os.path.join(driver.share_path(share), SECURE_INDICATOR)
        assert open(indicator).read().strip() == ("true" if fresh else "false")
        vol = v.new_volume(driver)
        mode = stat.S_IMODE(os.stat(driver.local_path(vol)).st_mode)
        assert mode == (0o660 if fresh else 0o666)
        assert driver.secure(share) == (fresh, fresh)
        # Secure operations run in this process, not through the root daemon.
        assert (driver.io_for(share) is not driver.io) == fresh
        v.assert_intact(driver, vol)
        driver.delete_volume(vol)


# -- Active-Active: two hosts, each with its own mount, one shared lock backend ---------


@pytest.fixture(scope="module")
def redis_in_netns(gl, tmp_path_factory):
    server = servers.SERVERS["redis"](workdir=str(tmp_path_factory.mktemp("redis-aa")))
    with gluster.entered(gl.netns_path):
        server.start()
    try:
        yield server.url
    finally:
        server.cleanup()


def _two_hosts(gl, tmp_path, backend_url: str, provider: str | None, duration: float):
    """Prepare 2 volumes, run one demo worker per host, verify from a third mount.

    The workers go through the driver's front door (remotefs_aa.workload): only
    the drivers' own locks, taken through the shared Redis, keep the hosts
    apart; the checker replays both hosts' histories against the share.
    """
    configs = []
    for host in ("host-a", "host-b", "checker"):
        directory = tmp_path / host
        directory.mkdir()
        # Each "host" has its own state_path, so its own mount base and mount.
        extra = {"host": host, "cluster": "aa-test"}
        config = _config(directory, "glusterfs", [gl.share], **extra)
        with open(config, "a") as f:
            f.write(f"backend_url = {backend_url}\n")
            if provider:
                f.write(f"lock_provider = {provider}\n")
        configs.append(config)
    # Both hosts run on this machine, so one directory holds every history
    # (and CLOCK_MONOTONIC is common to them).
    workspace = workload.Workspace(str(tmp_path / "workload"))
    with Started(gl, configs[2]) as checker:
        workload.prepare(checker, workspace, 2)
        with gluster.entered(gl.netns_path):
            results = v.run_demo_workers(configs[:2], workspace.root, duration, 7)
        report = workload.verify(checker, workspace)
        workload.cleanup(checker, workspace)
    return results, report


def test_active_active_two_hosts_keep_every_chain(gl, redis_in_netns, tmp_path):
    results, report = _two_hosts(gl, tmp_path, redis_in_netns, None, 10.0)
    assert report["errors"] == [], "\n".join(report["errors"][:5])
    assert report["problems"] == [], "\n".join(report["problems"][:5])
    ops = [r["operations"] for r in results]
    print(f"two hosts: operations {ops}, refused {report['refused']}, checked {report['checked']}")
    assert min(ops) > 0 and sum(ops) >= 8, ops


def test_active_active_without_locks_is_caught(gl, redis_in_netns, tmp_path):
    _results, report = _two_hosts(
        gl, tmp_path, redis_in_netns, "tests.functional.nolock.NoLockProvider", 10.0
    )
    errors = report["errors"]
    print(f"without locks: {len(errors)} errors, {len(report['problems'])} problems")
    for line in report["problems"][:10]:
        print("  found:", line)
    # The post-run checks themselves must see the damage (see test_concurrency).
    assert report["problems"], f"no locks and the checks found nothing ({len(errors)} errors)"
