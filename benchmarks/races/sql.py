"""The two SQL dialects: connecting, classifying errors, the schema and its audit trigger.

Every connection is in autocommit mode; a strategy that needs a transaction
says ``BEGIN`` / ``COMMIT`` itself, so one request is exactly what it sends.

Errors are sorted into what a correct strategy retries:

- ``deadlock``: InnoDB's ER_LOCK_DEADLOCK 1213, which is also how Galera
  reports a certification failure or a brute-force abort by a replicated
  write (the transaction was rolled back, retry it whole); PostgreSQL's
  40P01 deadlock_detected and 40001 serialization_failure.
- ``lock_timeout``: ER_LOCK_WAIT_TIMEOUT 1205, PostgreSQL's 55P03
  lock_not_available (``lock_timeout``) and 57014 query_canceled
  (``statement_timeout``): a bounded wait ran out.
- ``disconnect``: the connection could not be made or broke (2003, 2006,
  2013, a node not ready 1047, a closed socket): the outcome of a write in
  flight is unknown, so the strategy must find out whether it committed.

Anything else is a bug and propagates.
"""

from __future__ import annotations

import pymysql
import pymysql.constants.CLIENT
import pymysql.err

try:  # PostgreSQL is optional for a Galera-only quick run
    import psycopg2
    import psycopg2.errors
    import psycopg2.extensions
except ImportError:  # pragma: no cover
    psycopg2 = None

#: Seconds a connect or a single request may take before it counts as a
#: disconnect; nothing waits longer than this on a socket.
SOCKET_TIMEOUT = 30.0
CONNECT_TIMEOUT = 5.0
#: A row lock or advisory lock wait gives up after this many seconds (the
#: servers are started with it; PostgreSQL gets it per connection).
LOCK_WAIT_S = 2

_MYSQL_DEADLOCK = {1213, 1180, 1020}  # deadlock / cert failure; "error during COMMIT"; changed
_MYSQL_LOCK_TIMEOUT = {1205, 3024}
_MYSQL_DISCONNECT = {2002, 2003, 2006, 2013, 2014, 2055, 1047, 1053, 1927, 4031}


#: The rows the workers change, alike in both dialects.
_VOLUMES = (
    "id VARCHAR(40) PRIMARY KEY, kind VARCHAR(12) NOT NULL, status VARCHAR(12) NOT NULL, "
    "holder VARCHAR(40) NOT NULL DEFAULT '', count INT NOT NULL DEFAULT 0, "
    "gen BIGINT NOT NULL DEFAULT 0, note VARCHAR(40) NOT NULL DEFAULT ''"
)


class Dialect:
    name = "abstract"

    def connect(self, host: str, port: int):
        raise NotImplementedError

    def classify(self, exc: BaseException) -> str | None:
        raise NotImplementedError

    def schema(self) -> list[str]:
        raise NotImplementedError


class MySQL(Dialect):
    name = "mysql"

    def connect(self, host: str, port: int):
        # FOUND_ROWS: an UPDATE reports the rows it matched, not the rows it
        # changed, so repeating a write whose commit we did not see (a
        # disconnect) still reports success.
        return pymysql.connect(
            host=host,
            port=port,
            user="root",
            database="races",
            autocommit=True,
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=SOCKET_TIMEOUT,
            write_timeout=SOCKET_TIMEOUT,
            client_flag=pymysql.constants.CLIENT.FOUND_ROWS,
            # PyMySQL 1.2 builds a default TLS context (loading the system CA
            # store, ~55 ms of CPU here) for every connection unless told not
            # to; on loopback that would be most of a per-request connection.
            ssl_disabled=True,
        )

    def classify(self, exc: BaseException) -> str | None:
        if isinstance(exc, pymysql.err.InterfaceError):
            return "disconnect"
        if isinstance(exc, (OSError, TimeoutError)):
            return "disconnect"
        if isinstance(exc, pymysql.err.MySQLError) and exc.args:
            code = exc.args[0]
            if code in _MYSQL_DEADLOCK:
                return "deadlock"
            if code in _MYSQL_LOCK_TIMEOUT:
                return "lock_timeout"
            if code in _MYSQL_DISCONNECT:
                return "disconnect"
            if code == 0:
                return "disconnect"
        return None

    def schema(self) -> list[str]:
        return [
            "DROP TABLE IF EXISTS volumes",
            "DROP TABLE IF EXISTS history",
            f"CREATE TABLE volumes ({_VOLUMES}) ENGINE=InnoDB",
            """CREATE TABLE history (
                seq BIGINT AUTO_INCREMENT PRIMARY KEY,
                row_id VARCHAR(40) NOT NULL,
                old_status VARCHAR(12), new_status VARCHAR(12),
                old_holder VARCHAR(40), new_holder VARCHAR(40),
                old_count INT, new_count INT,
                KEY (row_id)
            ) ENGINE=InnoDB""",
            # The database's own record of every state change, written in the
            # same transaction as the change: the checker reads this, not the
            # workers' word. Synthetic updates touch only ``note``.
            # An explicit definer: under --skip-grant-tables the implicit one
            # is ``@`` and the other Galera nodes refuse (and skip!) the
            # replicated CREATE TRIGGER, so their changes would go unaudited.
            """CREATE DEFINER=`root`@`localhost` TRIGGER volumes_audit
               AFTER UPDATE ON volumes FOR EACH ROW
               IF NEW.status <> OLD.status OR NEW.holder <> OLD.holder
                  OR NEW.count <> OLD.count THEN
                 INSERT INTO history (row_id, old_status, new_status, old_holder,
                                      new_holder, old_count, new_count)
                 VALUES (OLD.id, OLD.status, NEW.status, OLD.holder, NEW.holder,
                         OLD.count, NEW.count);
               END IF""",
        ]

    def causal(self) -> str | None:
        """A statement that makes the next read wait for the cluster (Galera)."""
        return "SET SESSION wsrep_sync_wait = 1"


class PostgreSQL(Dialect):
    name = "postgresql"

    def connect(self, host: str, port: int):
        conn = psycopg2.connect(
            host=host,
            port=port,
            user="postgres",
            dbname="postgres",
            connect_timeout=int(CONNECT_TIMEOUT),
            sslmode="disable",
            options=(
                f"-c lock_timeout={LOCK_WAIT_S * 1000} "
                f"-c statement_timeout={int(SOCKET_TIMEOUT * 1000)} "
                f"-c idle_in_transaction_session_timeout={int(SOCKET_TIMEOUT * 1000)}"
            ),
        )
        conn.autocommit = True
        return conn

    def classify(self, exc: BaseException) -> str | None:
        if psycopg2 is None:
            return None
        code = getattr(exc, "pgcode", None)
        if code in ("40P01", "40001"):
            return "deadlock"
        if code in ("55P03", "57014"):
            return "lock_timeout"
        if isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError)):
            return "disconnect"
        if isinstance(exc, (OSError, TimeoutError)):
            return "disconnect"
        return None

    def schema(self) -> list[str]:
        return [
            "DROP TABLE IF EXISTS volumes",
            "DROP TABLE IF EXISTS history",
            f"CREATE TABLE volumes ({_VOLUMES})",
            """CREATE TABLE history (
                seq BIGSERIAL PRIMARY KEY,
                row_id VARCHAR(40) NOT NULL,
                old_status VARCHAR(12), new_status VARCHAR(12),
                old_holder VARCHAR(40), new_holder VARCHAR(40),
                old_count INT, new_count INT
            )""",
            "CREATE INDEX history_row ON history (row_id)",
            """CREATE OR REPLACE FUNCTION volumes_audit() RETURNS trigger AS $$
               BEGIN
                 IF NEW.status <> OLD.status OR NEW.holder <> OLD.holder
                    OR NEW.count <> OLD.count THEN
                   INSERT INTO history (row_id, old_status, new_status, old_holder,
                                        new_holder, old_count, new_count)
                   VALUES (OLD.id, OLD.status, NEW.status, OLD.holder, NEW.holder,
                           OLD.count, NEW.count);
                 END IF;
                 RETURN NEW;
               END $$ LANGUAGE plpgsql""",
            """CREATE TRIGGER volumes_audit AFTER UPDATE ON volumes
               FOR EACH ROW EXECUTE FUNCTION volumes_audit()""",
        ]

    def causal(self) -> str | None:
        return None


DIALECTS: dict[str, Dialect] = {"mysql": MySQL(), "postgresql": PostgreSQL()}


def pg_key(row: str) -> int:
    """A stable 63-bit advisory-lock key for a row id."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(row.encode(), digest_size=8).digest(), "big") >> 1
