"""Real lock-backend servers for functional tests and benchmarks.

Each server is started from the Debian binary on a free 127.0.0.1 port with a
fresh data directory, waited for until it answers, and stopped by its PID.
``restart()`` keeps the port, so a client that lost its backend can find it
again. pifpaf would start the same binaries, but its Redis and ZooKeeper
listen on every interface, and these tests must only ever bind to loopback.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def _answers(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        try:
            sock.connect((LOOPBACK, port))
        except OSError:
            return False
        return True


class Server:
    """One server process; subclasses say how to start it and its tooz URL."""

    kind = "abstract"
    #: Seconds after which the backend frees the lock of a killed holder.
    lock_expiry = 0.0
    binary = ""
    stop_signal = signal.SIGTERM

    def __init__(self, workdir: str | None = None) -> None:
        self.workdir = workdir or tempfile.mkdtemp(prefix=f"rfsaa-{self.kind}-")
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(self.workdir, "server.log")

    @classmethod
    def available(cls) -> bool:
        """Whether the server binary is installed."""
        return shutil.which(cls.binary) is not None

    def argv(self) -> list[str]:
        raise NotImplementedError

    @property
    def url(self) -> str:
        raise NotImplementedError

    def prepare(self) -> None:
        """Write config files; called once before the first start."""

    def start(self, timeout: float = 60.0) -> None:
        """Start the server and wait until its port answers."""
        if self.proc is None:
            self.prepare()
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.argv(),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not _answers(self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.kind} exited with {self.proc.returncode}; log: {self.tail_log()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.kind} did not open port {self.port}: {self.tail_log()}")
            time.sleep(0.05)
        self.wait_ready(deadline)

    def wait_ready(self, deadline: float) -> None:
        """Extra readiness check after the port opens (default: none)."""

    def poll_until(self, ready: Callable[[], bool], deadline: float, what: str) -> None:
        """Call ``ready`` until it returns True; errors count as "not yet"."""
        while time.monotonic() < deadline:
            try:
                if ready():
                    return
            except Exception:  # a server still starting refuses connections
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.kind} never {what}: {self.tail_log()}")

    def stop(self) -> None:
        """Stop the server by its PID (SIGTERM, then SIGKILL) and wait for it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, self.stop_signal)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)
        deadline = time.monotonic() + 10
        while _answers(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)

    def restart(self) -> None:
        """Stop and start again on the same port."""
        self.stop()
        self.start()

    def cleanup(self) -> None:
        """Stop and remove the data directory."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def tail_log(self, n: int = 2000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return "<no log>"


class RedisServer(Server):
    kind = "redis"
    binary = "redis-server"
    lock_expiry = 3.0

    def argv(self) -> list[str]:
        return [
            "redis-server",
            "--bind",
            LOOPBACK,
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self.workdir,
        ]

    @property
    def url(self) -> str:
        # lock_timeout bounds how long a killed holder's lock lives.
        return f"redis://{LOOPBACK}:{self.port}?lock_timeout={int(self.lock_expiry)}"


class ZooKeeperServer(Server):
    kind = "zookeeper"
    binary = "java"
    #: The ZooKeeper session timeout the clients ask for (the server's
    #: minimum is two ticks).
    lock_expiry = 4.0
    JARS = ("/etc/zookeeper/conf", "/usr/share/java/zookeeper.jar")

    @classmethod
    def available(cls) -> bool:
        return shutil.which("java") is not None and os.path.exists(cls.JARS[1])

    def prepare(self) -> None:
        data = os.path.join(self.workdir, "data")
        os.makedirs(data, exist_ok=True)
        with open(os.path.join(self.workdir, "zoo.cfg"), "w") as f:
            f.write(
                f"dataDir={data}\nclientPort={self.port}\nclientPortAddress={LOOPBACK}\n"
                "admin.enableServer=false\ntickTime=1000\nminSessionTimeout=2000\n"
                "maxSessionTimeout=60000\n4lw.commands.whitelist=ruok\n"
            )

    def argv(self) -> list[str]:
        return [
            "java",
            "-Xmx256m",
            "-Dzookeeper.jmx.log4j.disable=true",
            "-cp",
            ":".join(self.JARS),
            "org.apache.zookeeper.server.ZooKeeperServerMain",
            os.path.join(self.workdir, "zoo.cfg"),
        ]

    def wait_ready(self, deadline: float) -> None:
        def ruok() -> bool:
            with socket.create_connection((LOOPBACK, self.port), timeout=1) as sock:
                sock.sendall(b"ruok")
                return sock.recv(4) == b"imok"

        self.poll_until(ruok, deadline, "answered ruok")

    @property
    def url(self) -> str:
        return f"zookeeper://{LOOPBACK}:{self.port}?timeout={int(self.lock_expiry)}"


class EtcdServer(Server):
    kind = "etcd"
    binary = "etcd"
    lock_expiry = 3.0

    def __init__(self, workdir: str | None = None) -> None:
        super().__init__(workdir)
        self.peer_port = free_port()

    def argv(self) -> list[str]:
        client = f"http://{LOOPBACK}:{self.port}"
        return [
            "etcd",
            "--data-dir",
            os.path.join(self.workdir, "data"),
            "--name",
            "rfsaa",
            "--listen-client-urls",
            client,
            "--advertise-client-urls",
            client,
            "--listen-peer-urls",
            f"http://{LOOPBACK}:{self.peer_port}",
            "--initial-advertise-peer-urls",
            f"http://{LOOPBACK}:{self.peer_port}",
            "--initial-cluster",
            f"rfsaa=http://{LOOPBACK}:{self.peer_port}",
            "--listen-metrics-urls",
            f"http://{LOOPBACK}:{free_port()}",
        ]

    def wait_ready(self, deadline: float) -> None:
        import urllib.request

        def healthy() -> bool:
            url = f"http://{LOOPBACK}:{self.port}/health"
            with urllib.request.urlopen(url, timeout=1) as resp:
                return b'"true"' in resp.read()

        self.poll_until(healthy, deadline, "became healthy")

    @property
    def url(self) -> str:
        return f"etcd3+http://{LOOPBACK}:{self.port}?lock_timeout={int(self.lock_expiry)}"


class MemcachedServer(Server):
    kind = "memcached"
    binary = "memcached"
    lock_expiry = 3.0

    def argv(self) -> list[str]:
        user = ["-u", "memcache"] if os.geteuid() == 0 else []
        return ["memcached", *user, "-l", LOOPBACK, "-p", str(self.port), "-U", "0"]

    @property
    def url(self) -> str:
        return f"memcached://{LOOPBACK}:{self.port}?lock_timeout={int(self.lock_expiry)}"


class MySQLServer(Server):
    """MariaDB on a TCP loopback port, grant tables skipped, database ``test``."""

    kind = "mysql"
    binary = "mariadbd"
    lock_expiry = 0.0  # GET_LOCK dies with the holder's connection

    def prepare(self) -> None:
        subprocess.run(
            [
                "mariadb-install-db", "--no-defaults", f"--datadir={self.workdir}/data",
                f"--user={_user()}", "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip

    def argv(self) -> list[str]:
        return [
            "mariadbd", "--no-defaults", f"--datadir={self.workdir}/data",
            f"--socket={self.workdir}/sock", f"--pid-file={self.workdir}/pid",
            f"--bind-address={LOOPBACK}", f"--port={self.port}", f"--user={_user()}",
            "--skip-grant-tables", "--skip-name-resolve", "--innodb-buffer-pool-size=16M",
        ]  # fmt: skip

    def wait_ready(self, deadline: float) -> None:
        import pymysql

        def create_db() -> bool:
            conn = pymysql.connect(host=LOOPBACK, port=self.port, user="root")
            with conn, conn.cursor() as cur:
                cur.execute("CREATE DATABASE IF NOT EXISTS test")
            return True

        self.poll_until(create_db, deadline, "accepted a connection")

    @property
    def url(self) -> str:
        return f"mysql://root@{LOOPBACK}:{self.port}/test"


class PostgreSQLServer(Server):
    """PostgreSQL 15 with trust auth; as root it runs as the ``postgres`` user."""

    kind = "postgresql"
    binary = "postgres"
    lock_expiry = 0.0  # advisory locks die with the holder's connection
    stop_signal = signal.SIGINT  # "fast" shutdown: SIGTERM waits for clients

    def __init__(self, workdir: str | None = None) -> None:
        # The postgres user must reach its data directory, so ignore a
        # workdir under a root-only pytest tree and make our own.
        super().__init__(tempfile.mkdtemp(prefix="rfsaa-postgresql-"))
        os.chmod(self.workdir, 0o755)  # noqa: S103 - postgres must traverse it

    @classmethod
    def bindir(cls) -> str | None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
        return os.path.dirname(found[-1]) if found else None

    @classmethod
    def available(cls) -> bool:
        return cls.bindir() is not None

    def _as_owner(self) -> list[str]:
        return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def prepare(self) -> None:
        data = os.path.join(self.workdir, "data")
        os.makedirs(data)
        if os.geteuid() == 0:
            shutil.chown(self.workdir, "postgres")
            shutil.chown(data, "postgres")
        subprocess.run(
            [*self._as_owner(), f"{self.bindir()}/initdb", "-D", data, "-A", "trust",
             "-U", "postgres", "--no-sync"],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        self.log_path = os.path.join(self.workdir, "server.log")

    def argv(self) -> list[str]:
        return [
            *self._as_owner(), f"{self.bindir()}/postgres", "-D", f"{self.workdir}/data",
            "-h", LOOPBACK, "-p", str(self.port), "-k", self.workdir, "-F",
        ]  # fmt: skip

    def wait_ready(self, deadline: float) -> None:
        import psycopg2

        def connect() -> bool:
            psycopg2.connect(host=LOOPBACK, port=self.port, user="postgres").close()
            return True

        self.poll_until(connect, deadline, "accepted a connection")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@{LOOPBACK}:{self.port}/postgres"


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


SERVERS: dict[str, type[Server]] = {
    cls.kind: cls
    for cls in (
        RedisServer, ZooKeeperServer, EtcdServer, MemcachedServer, MySQLServer, PostgreSQLServer,
    )
}  # fmt: skip


@contextlib.contextmanager
def running(kind: str) -> Iterator[Server]:
    """Start a server of ``kind`` for the duration of the block."""
    server = SERVERS[kind]()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()
