"""The servers of the study, started by hand and stopped by PID.

- :class:`GaleraCluster`: three ``mariadbd`` nodes with the Galera 4 provider,
  each with its own datadir, client port, group-communication port, IST and
  SST ports, all on 127.0.0.1. The first node bootstraps the cluster
  (``--wsrep-new-cluster``); the other two join it and receive their data by
  rsync SST. The nodes run as the ``mysql`` user: the rsync daemon the SST
  script starts on a joiner cannot write a root-owned datadir.
- :class:`HAProxy`: TCP mode, ``balance roundrobin``: every new connection
  goes to the next node. Race workers open one connection per request, so
  each request lands on the next node, as in the study.
- Single-node MariaDB and PostgreSQL, and Redis: the test servers of
  ``tests/functional/servers.py`` with more connections allowed.
- The tooz file backend on the project's GlusterFS test volume
  (``tests/functional/gluster.py``), mounted twice: one mount per "host".

Every process is started in a session of its own and stopped by its PID
(SIGTERM to its process group, then SIGKILL); every directory is removed,
also when a start fails half way.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time

from benchmarks.races import sql
from tests.functional import gluster, servers

LOOPBACK = servers.LOOPBACK
GALERA_PROVIDER = "/usr/lib/galera/libgalera_smm.so"

#: Settings every MariaDB here shares, so single node and cluster differ
#: only by wsrep. Durability is off everywhere (no fsync per commit, as the
#: PostgreSQL test server runs with -F): this is a shared 2-core machine and
#: the study is about concurrency, not the disk.
MARIADB_COMMON = [
    "--skip-grant-tables",
    "--skip-name-resolve",
    "--innodb-buffer-pool-size=32M",
    "--innodb-log-file-size=8M",
    "--innodb-flush-log-at-trx-commit=0",
    f"--innodb-lock-wait-timeout={sql.LOCK_WAIT_S}",
    "--max-connections=2000",
    "--max-connect-errors=1000000",
    "--back-log=1000",
    "--thread-cache-size=512",
    "--performance-schema=OFF",
]


def _stop_group(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, wait: float = 20) -> None:
    """Stop ``proc`` and its process group by PID; SIGKILL if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _wait_for(check, timeout: float, what: str, log: str | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(0.2)
    tail = ""
    if log and os.path.exists(log):
        with open(log, "rb") as f:
            tail = f.read()[-3000:].decode(errors="replace")
    raise RuntimeError(f"{what} within {timeout:.0f} s (last error: {last}); log tail:\n{tail}")


class GaleraNode:
    def __init__(self, workdir: str, index: int) -> None:
        self.index = index
        self.name = f"galera{index + 1}"
        self.dir = os.path.join(workdir, self.name)
        self.datadir = os.path.join(self.dir, "data")
        self.port = servers.free_port()
        self.gcomm_port = servers.free_port()
        self.ist_port = servers.free_port()
        self.sst_port = servers.free_port()
        self.proc: subprocess.Popen | None = None
        self.log = os.path.join(self.dir, "mariadbd.log")

    def argv(self, cluster: list[GaleraNode], bootstrap: bool) -> list[str]:
        members = ",".join(f"{LOOPBACK}:{n.gcomm_port}" for n in cluster)
        provider_options = ";".join(
            [
                f"gmcast.listen_addr=tcp://{LOOPBACK}:{self.gcomm_port}",
                f"ist.recv_addr={LOOPBACK}:{self.ist_port}",
                f"base_port={self.gcomm_port}",
                "gcache.size=32M",
            ]
        )
        argv = [
            "mariadbd", "--no-defaults", f"--datadir={self.datadir}",
            f"--socket={self.dir}/sock", f"--pid-file={self.dir}/pid",
            f"--bind-address={LOOPBACK}", f"--port={self.port}", "--user=mysql",
            *MARIADB_COMMON,
            "--binlog-format=ROW", "--default-storage-engine=InnoDB",
            "--innodb-autoinc-lock-mode=2",
            "--wsrep-on=ON", f"--wsrep-provider={GALERA_PROVIDER}",
            "--wsrep-cluster-name=races", f"--wsrep-cluster-address=gcomm://{members}",
            f"--wsrep-node-address={LOOPBACK}:{self.gcomm_port}", f"--wsrep-node-name={self.name}",
            "--wsrep-sst-method=rsync", f"--wsrep-sst-receive-address={LOOPBACK}:{self.sst_port}",
            f"--wsrep-provider-options={provider_options}",
            "--wsrep-slave-threads=2",
        ]  # fmt: skip
        if bootstrap:
            argv.append("--wsrep-new-cluster")
        return argv

    def start(self, cluster: list[GaleraNode], bootstrap: bool) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv(cluster, bootstrap),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                start_new_session=True,
            )

    def status(self, variable: str) -> str | None:
        conn = pymysql_connect(self.port, database=None)
        try:
            with conn.cursor() as cur:
                cur.execute("SHOW STATUS LIKE %s", (variable,))
                row = cur.fetchone()
                return row[1] if row else None
        finally:
            conn.close()

    def synced(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}")
        return self.status("wsrep_local_state_comment") == "Synced"

    def stop(self) -> None:
        _stop_group(self.proc, wait=30)


def pymysql_connect(port: int, database: str | None = "races"):
    import pymysql

    return pymysql.connect(
        host=LOOPBACK, port=port, user="root", database=database, autocommit=True,
        connect_timeout=5, read_timeout=30, write_timeout=30, ssl_disabled=True,
    )  # fmt: skip


class GaleraCluster:
    """Three Galera nodes on loopback; ``nodes[i].port`` is node i's client port."""

    def __init__(self, workdir: str, size: int = 3) -> None:
        self.workdir = workdir
        self.nodes = [GaleraNode(workdir, i) for i in range(size)]
        self.start_s = 0.0

    def start(self, timeout: float = 180) -> None:
        t0 = time.monotonic()
        os.chmod(self.workdir, 0o755)  # noqa: S103 - the mysql user must traverse it
        for node in self.nodes:
            os.makedirs(node.datadir)
            shutil.chown(node.dir, "mysql", "mysql")
            shutil.chown(node.datadir, "mysql", "mysql")
        first = self.nodes[0]
        proc = subprocess.run(
            ["mariadb-install-db", "--no-defaults", f"--datadir={first.datadir}", "--user=mysql",
             "--auth-root-authentication-method=normal", "--skip-test-db",
             "--innodb-log-file-size=8M"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(
                f"mariadb-install-db failed: {proc.stdout[-1500:]} {proc.stderr[-1500:]}"
            )
        first.start(self.nodes, bootstrap=True)
        _wait_for(first.synced, timeout, f"{first.name} did not bootstrap", first.log)
        for node in self.nodes[1:]:
            node.start(self.nodes, bootstrap=False)
        for node in self.nodes[1:]:
            _wait_for(node.synced, timeout, f"{node.name} did not join (SST)", node.log)
        size = first.status("wsrep_cluster_size")
        if size != str(len(self.nodes)):
            raise RuntimeError(f"cluster size is {size}, not {len(self.nodes)}")
        conn = pymysql_connect(first.port, database=None)
        with conn, conn.cursor() as cur:
            cur.execute("CREATE DATABASE IF NOT EXISTS races")
        self.start_s = time.monotonic() - t0

    def stop(self) -> None:
        # Joiners first, the bootstrap node last, so the last one down has the
        # whole history (it does not matter here: the datadirs are removed).
        for node in reversed(self.nodes):
            node.stop()


class HAProxy:
    """``haproxy -db`` (foreground, so the PID we hold is the proxy's)."""

    def __init__(self, workdir: str, backends: list[tuple[str, int]]) -> None:
        self.workdir = workdir
        self.backends = backends
        self.port = servers.free_port()
        self.proc: subprocess.Popen | None = None
        self.cfg = os.path.join(workdir, "haproxy.cfg")
        self.log = os.path.join(workdir, "haproxy.log")

    def start(self, timeout: float = 30) -> None:
        lines = [
            "global",
            "  maxconn 8000",
            "  nbthread 1",
            "defaults",
            "  mode tcp",
            "  timeout connect 5s",
            "  timeout client 120s",
            "  timeout server 120s",
            "listen galera",
            f"  bind {LOOPBACK}:{self.port}",
            # Each new connection to the next node. No health checks: a check
            # that connects and hangs up is an "aborted connect" to MariaDB,
            # and the study is not about fail-over.
            "  balance roundrobin",
            *(f"  server {name} {LOOPBACK}:{port}" for name, port in self.backends),
        ]
        with open(self.cfg, "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                ["haproxy", "-db", "-f", self.cfg],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait_for(lambda: servers._answers(self.port), timeout, "haproxy did not listen", self.log)

    def stop(self) -> None:
        _stop_group(self.proc)


class SingleMariaDB(servers.MySQLServer):
    """One MariaDB node with the cluster's settings, minus wsrep."""

    def argv(self) -> list[str]:
        base = super().argv()
        # the parent's argv already skips grants and name resolution
        extra = [a for a in MARIADB_COMMON if a not in base and "buffer-pool" not in a]
        return [*base, *extra]

    def wait_ready(self, deadline: float) -> None:
        super().wait_ready(deadline)
        conn = pymysql_connect(self.port, database=None)
        with conn, conn.cursor() as cur:
            cur.execute("CREATE DATABASE IF NOT EXISTS races")


class PostgreSQL(servers.PostgreSQLServer):
    """PostgreSQL 15 with room for every worker's connection."""

    def argv(self) -> list[str]:
        return [*super().argv(), "-c", "max_connections=1200", "-c", "shared_buffers=64MB"]


class GlusterShare:
    """The project's GlusterFS test volume, mounted once per worker "host"."""

    def __init__(self, workdir: str, mounts: int = 2) -> None:
        self.volume = gluster.GlusterVolume(os.path.join(workdir, "gluster"))
        self.mountpoints = [os.path.join(workdir, f"mnt{i}") for i in range(mounts)]

    def start(self) -> None:
        os.makedirs(self.volume.workdir)
        self.volume.start()
        for mnt in self.mountpoints:
            self.volume.mount(mnt)
        os.makedirs(os.path.join(self.mountpoints[0], "locks"), exist_ok=True)

    def urls(self) -> list[str]:
        return [f"file://{mnt}/locks" for mnt in self.mountpoints]

    def stop(self) -> None:
        self.volume.cleanup()


class Lab:
    """Everything one benchmark run needs, started on demand and always stopped.

    ``topologies`` is a subset of ``galera``, ``mariadb``, ``postgresql``;
    Redis and the GlusterFS share are started when ``dlm`` is true.
    """

    def __init__(self, topologies: list[str], dlm: bool = True, mounts: int = 2) -> None:
        self.root = tempfile.mkdtemp(prefix="rfsaa-races-")
        os.chmod(self.root, 0o755)  # noqa: S103 - the mysql and postgres users traverse it
        self.topologies = topologies
        self.dlm = dlm
        self.mounts = mounts
        self.galera: GaleraCluster | None = None
        self.haproxy: HAProxy | None = None
        self.mariadb: SingleMariaDB | None = None
        self.postgresql: PostgreSQL | None = None
        self.redis: servers.RedisServer | None = None
        self.share: GlusterShare | None = None
        self.timings: dict[str, float] = {}

    def __enter__(self) -> Lab:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _timed(self, name: str, fn) -> None:
        t0 = time.monotonic()
        fn()
        self.timings[name] = round(time.monotonic() - t0, 2)

    def start(self) -> None:
        if self.dlm:
            self.redis = servers.RedisServer(os.path.join(self.root, "redis"))
            os.makedirs(self.redis.workdir)
            self._timed("redis", self.redis.start)
            self.share = GlusterShare(self.root, self.mounts)
            self._timed("glusterfs", self.share.start)
        if "galera" in self.topologies:
            galera_dir = os.path.join(self.root, "galera")
            os.makedirs(galera_dir)
            self.galera = GaleraCluster(galera_dir)
            self._timed("galera", self.galera.start)
            self.haproxy = HAProxy(galera_dir, [(n.name, n.port) for n in self.galera.nodes])
            self._timed("haproxy", self.haproxy.start)
        if "mariadb" in self.topologies:
            self.mariadb = SingleMariaDB(os.path.join(self.root, "mariadb"))
            os.makedirs(self.mariadb.workdir)
            self._timed("mariadb", self.mariadb.start)
        if "postgresql" in self.topologies:
            self.postgresql = PostgreSQL()
            self._timed("postgresql", self.postgresql.start)

    def stop(self) -> None:
        errors = []
        for stop in (
            self.haproxy and self.haproxy.stop,
            self.galera and self.galera.stop,
            self.mariadb and self.mariadb.cleanup,
            self.postgresql and self.postgresql.cleanup,
            self.redis and self.redis.cleanup,
            self.share and self.share.stop,
        ):
            if stop:
                try:
                    stop()
                except Exception as exc:  # keep stopping the rest
                    errors.append(exc)
        shutil.rmtree(self.root, ignore_errors=True)
        if errors:
            raise RuntimeError(f"stopping the lab: {errors}")

    def topology(self, name: str) -> dict:
        """What a worker process needs to reach topology ``name``."""
        if name == "galera":
            assert self.galera and self.haproxy
            return {
                "name": "galera",
                "dialect": "mysql",
                "request": [LOOPBACK, self.haproxy.port],
                "per_request": True,
                "causal": True,
                "nodes": [[n.name, LOOPBACK, n.port] for n in self.galera.nodes],
            }
        if name == "mariadb":
            assert self.mariadb
            port = self.mariadb.port
            return {
                "name": "mariadb",
                "dialect": "mysql",
                "request": [LOOPBACK, port],
                "per_request": False,
                "causal": False,
                "nodes": [["mariadb", LOOPBACK, port]],
            }
        if name == "postgresql":
            assert self.postgresql
            port = self.postgresql.port
            return {
                "name": "postgresql",
                "dialect": "postgresql",
                "request": [LOOPBACK, port],
                "per_request": False,
                "causal": False,
                "nodes": [["postgresql", LOOPBACK, port]],
            }
        raise ValueError(name)

    def lock_urls(self) -> dict[str, list[str]]:
        if not self.dlm:
            return {}
        assert self.redis and self.share
        # A 10 s lease, renewed every 2 s by each worker process's heartbeat
        # (worker.py): a holder keeps it as long as it lives, and a lock whose
        # acquire reply was lost (tooz then retries under a new token) blocks
        # the row for at most 10 s, not for a long lease.
        redis = f"redis://{LOOPBACK}:{self.redis.port}?lock_timeout=10&socket_timeout=10"
        return {"file": self.share.urls(), "redis": [redis]}
