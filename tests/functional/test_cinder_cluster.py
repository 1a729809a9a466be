"""Two Cinder hosts in one cluster on one GlusterFS volume: Active-Active through Cinder.

Each host is a process running Cinder 29's VolumeManager over our GlusterFS
driver (tests/functional/cinder_worker.py ``serve``), with its own state
path and so its own FUSE mount of the volume; both share one MariaDB (the
Cinder database, from ``cinder-manage db sync``) and one lock backend (Redis,
and once ZooKeeper) that Cinder's own coordinator and our lock provider both
use. One host runs monkey-patched by eventlet, the other with native threads.

The workload alternates two phases, started by this test through a control
file:

* guest: each host writes a new pattern into (or reverts to its latest
  snapshot) the volumes of its half, claimed as Cinder's API claims them;
* ops: both hosts, concurrently and on the same volumes, create and delete
  snapshots, clone, create volumes from snapshots, extend, create and delete
  volumes, each issued with the API's ``conditional_update`` claims.

Each volume's and snapshot's expected data is recorded in the shared
database; afterwards every chain is verified and every volume and snapshot
read back. The same workload without our locks must fail.

Then (a test of its own, after a short workload for bystanders) one host is
killed with SIGKILL in the middle of a clone (a step hook holds it right
after its copy, locks held, nothing published: no race with how fast the
copy is), while a snapshot of the clone's source waits for that source's
lock in the driver: both are claimed by the dead host in the workers table.
The other host's ``do_cleanup`` errors them, deleting them removes what the
clone had written, and every other volume and snapshot is intact.

Every server runs in the GlusterFS volume's network namespace, on its
loopback; this test stops them by PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid

import pytest

from tests.functional import cinder_env as ce
from tests.functional import gluster, servers

pytestmark = pytest.mark.functional

DRIVER = "remotefs_aa.drivers.glusterfs.GlusterfsDriver"
BACKEND = "gl"
ROUNDS = 2
OPS_SECONDS = 5.0
#: host-a under eventlet, host-b with native threads.
HOSTS = (("host-a", "eventlet"), ("host-b", "threading"))


@pytest.fixture(scope="module", autouse=True)
def cinder():
    ce.cinder_installed()


@pytest.fixture(scope="module")
def gl():
    with gluster.started_volume() as volume:
        yield volume


@pytest.fixture(autouse=True)
def empty_volume(gl, tmp_path_factory):
    """Each test starts on an empty GlusterFS volume (its own database knows no older file).

    Through a fresh mount with the drivers' cache settings, unmounted after.
    """
    mountpoint = str(tmp_path_factory.mktemp("wipe") / "mnt")
    gl.mount(mountpoint, "entry-timeout=0,attribute-timeout=0,negative-timeout=0")
    try:
        for name in os.listdir(mountpoint):
            path = os.path.join(mountpoint, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        assert os.listdir(mountpoint) == []
    finally:
        subprocess.run(["umount", mountpoint], check=True)
        gl.mounts.remove(mountpoint)
    yield


def _server(kind: str, gl, tmp_path_factory):
    cls = servers.SERVERS[kind]
    if not cls.available():
        pytest.fail(f"{kind} server binary {cls.binary!r} is not installed; run tools/bootstrap.sh")
    server = cls(workdir=str(tmp_path_factory.mktemp(f"{kind}-cluster")))
    with gluster.entered(gl.netns_path):
        server.start()
    return server


@pytest.fixture(scope="module")
def mariadb(gl, tmp_path_factory):
    server = _server("mysql", gl, tmp_path_factory)
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="module", params=["redis", "zookeeper"])
def locks(request, gl, tmp_path_factory):
    server = _server(request.param, gl, tmp_path_factory)
    try:
        yield request.param, server
    finally:
        server.cleanup()


def _database(gl, mariadb) -> str:
    """A fresh database on the shared MariaDB; its SQLAlchemy URL."""
    import pymysql

    name = "cinder_" + uuid.uuid4().hex[:8]
    with gluster.entered(gl.netns_path):
        conn = pymysql.connect(host=servers.LOOPBACK, port=mariadb.port, user="root")
        with conn, conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name}")
    return f"mysql+pymysql://root@{servers.LOOPBACK}:{mariadb.port}/{name}"


def _configs(gl, tmp_path, database: str, lock_url: str, **coordination) -> list[str]:
    configs = []
    for host, _mode in HOSTS:
        directory = tmp_path / host
        directory.mkdir()
        shares = directory / "glusterfs_shares"
        shares.write_text(gl.share + "\n")
        configs.append(
            ce.write_conf(
                str(directory),
                BACKEND,
                DRIVER,
                {"glusterfs_shares_config": shares},
                host=host,
                cluster="aa",
                database=database,
                backend_url=lock_url,
                coordination=coordination,
            )
        )
    with gluster.entered(gl.netns_path):
        took = ce.db_sync(configs[0])
    print(f"cinder-manage db sync on MariaDB: {took:.1f} s")
    return configs


def _start(gl, scenario: str, config: str, *extra: str, mode: str = "eventlet"):
    with gluster.entered(gl.netns_path):
        return ce.start_worker(scenario, config, BACKEND, *extra, mode=mode)


def _run(gl, scenario: str, config: str, *extra: str, mode: str = "eventlet") -> dict:
    return ce.result_of(_start(gl, scenario, config, *extra, mode=mode), 120, config)


class Control:
    """The phase both hosts follow, and their reports of having finished it."""

    def __init__(self, path: str, hosts: int) -> None:
        self.path, self.hosts = path, hosts
        self.set(-1, "wait")

    def set(self, round_: int, phase: str, **extra: object) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"round": round_, "phase": phase, **extra}, f)
        os.replace(tmp, self.path)

    def wait_done(self, round_: int, procs: list, timeout: float) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            reports = []
            for i in range(self.hosts):
                try:
                    with open(f"{self.path}.{i}.done") as f:
                        reports.append(json.load(f))
                except (OSError, ValueError):
                    reports.append({"round": None})
            if all(r["round"] == round_ for r in reports):
                return reports
            for proc in procs:
                if proc.poll() is not None:
                    pytest.fail(
                        f"host {proc.pid} exited {proc.returncode}: {proc.stderr.read()[-4000:]}"
                    )
            if time.monotonic() > deadline:
                pytest.fail(f"round {round_} not finished in {timeout} s: {reports}")
            time.sleep(0.05)


def _workload(
    gl, configs: list[str], tmp_path, rounds: int = ROUNDS, seconds: float = OPS_SECONDS
) -> list[dict]:
    control = Control(str(tmp_path / "control.json"), len(configs))
    procs = [
        _start(
            gl,
            "serve",
            config,
            "--control",
            control.path,
            "--index",
            str(i),
            "--hosts",
            str(len(configs)),
            "--seed",
            str(11 + i),
            mode=mode,
        )
        for i, (config, (_host, mode)) in enumerate(zip(configs, HOSTS, strict=True))
    ]
    try:
        round_ = 0
        for _ in range(rounds):
            control.set(round_, "ops", seconds=seconds)
            control.wait_done(round_, procs, seconds + 60)
            round_ += 1
            control.set(round_, "guest")
            control.wait_done(round_, procs, 60)
            round_ += 1
        control.set(round_, "stop")
        return [ce.result_of(proc, 60, config) for proc, config in zip(procs, configs, strict=True)]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _check_workload(results: list[dict], minimum: int = 1) -> None:
    errors = [e for r in results for e in r["errors"]]
    assert errors == [], "\n".join(errors[:10])
    by_op: dict[str, int] = {}
    for r in results:
        for op, n in r["by_op"].items():
            by_op[op] = by_op.get(op, 0) + n
    print(
        "two hosts:", [r["ops"] for r in results], "operations;", by_op,
        "; refused", sum(r["refused"] for r in results),
        "; lost a Cinder API race", sum(len(r.get("raced", [])) for r in results),
        "; refused while the lock backend was away",
        sum(len(r.get("backend_unavailable", [])) for r in results),
    )  # fmt: skip
    assert [r["patched"] for r in results] == [True, False]
    # Refusals while the lock backend was away are safe, but must stay rare.
    away = sum(len(r.get("backend_unavailable", [])) for r in results)
    assert away <= max(2, sum(r["ops"] for r in results) // 10), results
    assert min(r["ops"] for r in results) >= 5, results
    for op in ("snapshot", "delete_snapshot", "clone", "guest write"):
        assert by_op.get(op, 0) >= minimum, by_op


def _lock_url(kind: str, server) -> str:
    """The backend URL; ZooKeeper with kazoo's default 10 s session here.

    The servers module asks for 4 s sessions, to measure takeovers quickly.
    This workload measures none, and on a loaded 2-core machine a
    monkey-patched host whose hub is busy for ~1.3 s (a third of 4 s) misses
    a ping: kazoo suspends the session and every lock wait fails (safely,
    the operation errors out untouched), which is not what this test is about.
    """
    if kind == "zookeeper":
        return server.url.split("?", 1)[0] + "?timeout=10"
    return server.url


def test_two_cinder_hosts_in_one_cluster_keep_every_chain(gl, mariadb, locks, tmp_path):
    kind, server = locks
    started = time.monotonic()
    configs = _configs(gl, tmp_path, _database(gl, mariadb), _lock_url(kind, server))
    try:
        results = _workload(gl, configs, tmp_path)
        _check_workload(results)
        report = _run(gl, "verify", configs[0])
        print(f"{kind}: verified {report['checked']} in {report['seconds']} s")
        assert report["problems"] == [], "\n".join(report["problems"][:10])
        assert report["checked"]["volumes"] >= 2 and report["checked"]["snapshots"] >= 1
    finally:
        _unmount_under(str(tmp_path))
    elapsed = time.monotonic() - started
    print(f"{kind}: scenario took {elapsed:.1f} s")


def test_a_host_killed_mid_operation_is_cleaned_up_by_the_other(
    gl, mariadb, tmp_path_factory, tmp_path
):
    """SIGKILL host-a mid-clone; host-b's do_cleanup errors its work; nothing is lost."""
    server = _server("redis", gl, tmp_path_factory)
    started = time.monotonic()
    try:
        configs = _configs(gl, tmp_path, _database(gl, mariadb), server.url)
        # Bystanders: volumes and snapshots the kill must not touch.
        _check_workload(_workload(gl, configs, tmp_path, rounds=1, seconds=3.0), minimum=0)
        _kill_one_host_mid_operation(gl, configs, server)
    finally:
        _unmount_under(str(tmp_path))
        server.cleanup()
    print(f"kill and cleanup: scenario took {time.monotonic() - started:.1f} s")


def test_without_our_locks_the_cluster_workload_fails(gl, mariadb, tmp_path_factory, tmp_path):
    """Teeth: Cinder's own locks and claims alone do not keep the chains intact."""
    server = _server("redis", gl, tmp_path_factory)
    try:
        nolock = "tests.functional.nolock.NoLockProvider"
        configs = _configs(gl, tmp_path, _database(gl, mariadb), server.url, lock_provider=nolock)
        results = _workload(gl, configs, tmp_path)
        errors = [e for r in results for e in r["errors"]]
        report = _run(gl, "verify", configs[0])
        print(f"without our locks: {len(errors)} errors, {len(report['problems'])} problems")
        for line in [*errors[:3], *report["problems"][:3]]:
            print("   ", line[:200])
        assert errors or report["problems"], (
            "no locks, and neither the workload nor the checks noticed"
        )
    finally:
        _unmount_under(str(tmp_path))
        server.cleanup()


def _kill_one_host_mid_operation(gl, configs: list[str], server) -> None:
    filled = _run(gl, "fill", configs[0], "--size", "1")
    source = filled["volume"]
    print(f"filled a 1 GiB volume half full in {filled['seconds']} s")
    victim = _start(gl, "victim", configs[0], "--volume", source)
    lines: list[dict] = []

    def read() -> None:
        for line in victim.stdout:
            with contextlib.suppress(ValueError):
                lines.append(json.loads(line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    # The victim reports where each piece of work stopped (no timing: its
    # clone is paused by a step hook, its snapshot at the source's lock).
    deadline = time.monotonic() + 120
    stops = ("snapshotting", "clone finished", "snapshot finished")
    while not any(stop in x for x in lines for stop in stops):
        assert victim.poll() is None, f"victim exited {victim.returncode}: {victim.stderr.read()}"
        assert time.monotonic() < deadline, f"victim never got going: {lines}"
        time.sleep(0.05)
    finished = [x for x in lines if "clone finished" in x or "snapshot finished" in x]
    assert not finished, f"work ended before the kill: {finished}"
    paused = next(x for x in lines if "paused" in x)
    assert paused["paused"] == "after qemu_img_convert", paused
    assert paused["copy error"] is None, paused
    clone = next(x["cloning"] for x in lines if "cloning" in x)
    # The clone's copy is on the share (so deleting it later has something to remove).
    assert any(name.endswith(".tmp") for name in paused["files"]), paused
    # The snapshot never got the source's lock: the paused clone holds it.
    assert not [x for x in lines if "snapshot step" in x], lines
    print(
        f"victim paused {paused['paused']} ({paused['files']}), snapshot at the source's "
        f"lock; killed {time.monotonic() - deadline + 120:.1f} s in"
    )
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    reader.join(timeout=10)
    killed_at = time.monotonic()
    dead = next(x["ready"] for x in lines if "ready" in x)
    snapshot = next(x["snapshotting"] for x in lines if "snapshotting" in x)

    result = _run(gl, "cleanup", configs[1], "--dead-service", str(dead), mode="threading")
    took = time.monotonic() - killed_at
    print(
        f"do_cleanup after SIGKILL: {result['cleanup_seconds']} s ({took:.1f} s in all, "
        f"lock expiry {server.lock_expiry} s); {result['status_after']}"
    )
    assert result["workers_before"] == {
        clone: ["Volume", "creating"],
        snapshot: ["Snapshot", "creating"],
    }
    # The killed host's half-done work is marked error, and no work is left over.
    assert result["status_after"] == {clone: "error", snapshot: "error"}
    assert result["workers_left"] == 0
    # Deleting what is in error removes what the killed clone had written.
    assert sorted(d["id"] for d in result["deleted_errors"]) == sorted([clone, snapshot])
    assert all(d["left"] == [] for d in result["deleted_errors"])
    # The source and every other volume and snapshot are intact, byte for byte.
    report = _run(gl, "verify", configs[1], mode="threading")
    assert report["problems"] == [], "\n".join(report["problems"][:10])
    # The source at least, and whatever the bystanders' workload left.
    assert report["checked"]["volumes"] >= 1, report["checked"]


def _unmount_under(directory: str) -> None:
    with open("/proc/mounts") as f:
        targets = [line.split()[1] for line in f]
    for target in sorted(targets, key=len, reverse=True):
        if target.startswith(directory.rstrip("/") + "/"):
            subprocess.run(["umount", "-l", target], capture_output=True, check=False)
