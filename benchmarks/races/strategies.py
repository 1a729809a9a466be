"""Ways to make ``available -> deleting -> available`` atomic, each written correctly.

A strategy has two halves. ``acquire`` returns once this worker's marker is
committed as the holder of a ``deleting`` row; ``release`` sets it back to
``available`` together with the critical section's result (``count``). Both
are bounded by the worker's deadlines and raise :class:`ChangeFailed`
rather than wait forever.

What "correct" means here, for every strategy:

- Every request that fails with a deadlock, a Galera certification failure,
  a lock-wait timeout or a disconnect is retried whole (a new request, so on
  the cluster usually another node).
- A write whose commit we did not see (a disconnect) is not repeated
  blindly: the retry accepts "the row is already ours" (the marker is unique).
- The database write is conditional even under a lock: on Galera a node can
  still be applying the previous holder's write when the next holder's
  request reaches it, and a node-local lock (GET_LOCK) excludes nobody on the
  other nodes.
- Waiting for a busy row backs off (5 ms doubling to 40 ms, with jitter).

``read_then_write`` is the negative control: a read, then an unconditional
write in a second request. The checker must catch it.
"""

from __future__ import annotations

import contextlib
import random
import time

from benchmarks.races import sql


class ChangeFailed(Exception):
    """A bounded wait ran out, or a request failed in a way nobody retries."""


class Backoff:
    """Capped exponential backoff with jitter for polling a busy row."""

    def __init__(self, first: float = 0.005, cap: float = 0.04) -> None:
        self.delay = first
        self.cap = cap

    def sleep(self, deadline: float) -> None:
        pause = random.uniform(self.delay / 2, self.delay)
        time.sleep(max(0.0, min(pause, deadline - time.monotonic())))
        self.delay = min(self.cap, self.delay * 2)


# --- the statements -------------------------------------------------------

CAS_ACQUIRE = (
    "UPDATE volumes SET status='deleting', holder=%s WHERE id=%s"
    " AND (status='available' OR (status='deleting' AND holder=%s))"
)
CAS_RELEASE = (
    "UPDATE volumes SET status='available', count=%s WHERE id=%s"
    " AND status='deleting' AND holder=%s"
)
READ = "SELECT status, holder, count, gen FROM volumes WHERE id=%s"


def _cas_acquire(cur, ctx, marker: str) -> bool:
    cur.execute(CAS_ACQUIRE, (marker, ctx.row, marker))
    return cur.rowcount == 1


def _cas_release(cur, ctx, marker: str, count: int, uncertain: bool) -> bool:
    cur.execute(CAS_RELEASE, (count, ctx.row, marker))
    if cur.rowcount == 1:
        return True
    if uncertain:
        # Our earlier attempt committed before the connection broke.
        ctx.note("release_uncertain")
        return True
    ctx.note("release_not_ours")
    return True


class Strategy:
    name = "abstract"
    correct = True
    #: "file" or "redis" when it needs a tooz lock
    lock_backend: str | None = None
    description = ""

    def acquire(self, ctx, marker: str) -> None:
        raise NotImplementedError

    def release(self, ctx, marker: str, count: int) -> None:
        ctx.transact(
            lambda cur, uncertain: _cas_release(cur, ctx, marker, count, uncertain),
            ctx.release_deadline,
            "release",
        )

    def _poll(self, ctx, attempt) -> None:
        """Call ``attempt()`` until it returns True, backing off between calls."""
        backoff = Backoff()
        while not attempt():
            if time.monotonic() >= ctx.acquire_deadline:
                raise ChangeFailed("acquire timed out: the row never became available")
            backoff.sleep(ctx.acquire_deadline)


class ForUpdate(Strategy):
    name = "for_update"
    description = "SELECT ... FOR UPDATE, then UPDATE, in one transaction; retry on deadlock"

    def _tx(self, cur, ctx, marker: str, want: str, count: int | None) -> bool:
        # An error anywhere here leaves the transaction to ctx.request(),
        # which rolls it back on a persistent connection.
        cur.execute("BEGIN")
        cur.execute("SELECT status, holder FROM volumes WHERE id=%s FOR UPDATE", (ctx.row,))
        status, holder = cur.fetchone()
        if want == "deleting":
            if status == "deleting" and holder == marker:
                cur.execute("COMMIT")  # an earlier, unseen commit of ours
                return True
            if status != "available":
                cur.execute("ROLLBACK")
                return False
            cur.execute(
                "UPDATE volumes SET status='deleting', holder=%s WHERE id=%s",
                (marker, ctx.row),
            )
        else:
            if status != "deleting" or holder != marker:
                cur.execute("ROLLBACK")
                ctx.note("release_not_ours")
                return True
            cur.execute(
                "UPDATE volumes SET status='available', count=%s WHERE id=%s",
                (count, ctx.row),
            )
        # Galera certifies at COMMIT: a conflict surfaces here as 1213.
        cur.execute("COMMIT")
        return True

    def acquire(self, ctx, marker: str) -> None:
        self._poll(
            ctx,
            lambda: ctx.transact(
                lambda cur, _u: self._tx(cur, ctx, marker, "deleting", None),
                ctx.acquire_deadline,
                "acquire",
            ),
        )

    def release(self, ctx, marker: str, count: int) -> None:
        ctx.transact(
            lambda cur, _u: self._tx(cur, ctx, marker, "available", count),
            ctx.release_deadline,
            "release",
        )


class CompareAndSwap(Strategy):
    name = "cas"
    description = "UPDATE ... WHERE status='available'; rowcount 1 wins; retry on deadlock"

    def acquire(self, ctx, marker: str) -> None:
        self._poll(
            ctx,
            lambda: ctx.transact(
                lambda cur, _u: _cas_acquire(cur, ctx, marker), ctx.acquire_deadline, "acquire"
            ),
        )


class GenerationCAS(Strategy):
    """Read the generation, then write only if it is still the one read.

    The fencing idea of this project's ``.info`` files: the writer names the
    exact version it builds on, so a stale reader (a lagging node) fails its
    write instead of overwriting a newer state.
    """

    name = "gen_cas"
    description = "read (status, gen), then UPDATE ... WHERE gen=<read>; bump gen; retry"

    def _read(self, cur, ctx) -> tuple:
        cur.execute(READ, (ctx.row,))
        return cur.fetchone()

    def _write(self, cur, ctx, marker: str, gen: int) -> bool:
        cur.execute(
            "UPDATE volumes SET status='deleting', holder=%s, gen=%s WHERE id=%s AND gen=%s",
            (marker, gen + 1, ctx.row, gen),
        )
        return cur.rowcount == 1

    def acquire(self, ctx, marker: str) -> None:
        def attempt() -> bool:
            # Two requests (on the cluster, two nodes): the read may be stale,
            # and then the write names a generation that is gone and fails.
            status, holder, _count, gen = ctx.transact(
                lambda cur, _u: self._read(cur, ctx), ctx.acquire_deadline, "read"
            )
            if status == "deleting" and holder == marker:
                ctx.state["gen"] = gen  # an earlier, unseen commit of ours
                return True
            if status != "available":
                return False
            if ctx.transact(
                lambda cur, _u: self._write(cur, ctx, marker, gen), ctx.acquire_deadline, "acquire"
            ):
                ctx.state["gen"] = gen + 1
                return True
            return False

        self._poll(ctx, attempt)

    def _release(self, cur, ctx, marker: str, count: int, uncertain: bool) -> bool:
        gen = ctx.state["gen"]
        cur.execute(
            "UPDATE volumes SET status='available', count=%s, gen=%s WHERE id=%s AND gen=%s",
            (count, gen + 1, ctx.row, gen),
        )
        if cur.rowcount != 1:
            ctx.note("release_uncertain" if uncertain else "release_not_ours")
        return True

    def release(self, ctx, marker: str, count: int) -> None:
        ctx.transact(
            lambda cur, uncertain: self._release(cur, ctx, marker, count, uncertain),
            ctx.release_deadline,
            "release",
        )


class DbLockCAS(Strategy):
    """A blocking database lock held while polling with compare-and-swap.

    MariaDB: ``GET_LOCK(row, timeout)`` on one connection, compare-and-swap
    on it until the row is ours, ``RELEASE_LOCK``. PostgreSQL: ``BEGIN;
    pg_advisory_xact_lock(key)``, compare-and-swap inside the transaction
    (READ COMMITTED sees each new commit) until it matches, ``COMMIT``
    (which also releases the lock). Only the lock holder polls the row; the
    others wait inside the database and are woken when it is released.
    On Galera ``GET_LOCK`` is local to the node the connection reached, so
    it only thins the pollers (one per node); the compare-and-swap is what
    keeps it safe there.
    """

    name = "db_lock_cas"
    description = "GET_LOCK / pg_advisory_xact_lock, then compare-and-swap under it"

    def _mysql(self, cur, ctx, marker: str) -> bool:
        remaining = max(1, min(sql.LOCK_WAIT_S, int(ctx.acquire_deadline - time.monotonic())))
        cur.execute("SELECT GET_LOCK(%s, %s)", (ctx.row, remaining))
        (got,) = cur.fetchone()
        if got != 1:
            ctx.count("lock_timeout")
            return False
        try:
            backoff = Backoff()
            while not _cas_acquire(cur, ctx, marker):
                if time.monotonic() >= ctx.acquire_deadline:
                    return False
                backoff.sleep(ctx.acquire_deadline)
            return True
        finally:
            # A broken connection frees the lock with the session; only an
            # intact one needs telling (and a failure here must not hide the
            # error that brought us here).
            with contextlib.suppress(Exception):
                cur.execute("SELECT RELEASE_LOCK(%s)", (ctx.row,))
                cur.fetchone()

    def _pg(self, cur, ctx, marker: str) -> bool:
        # An error anywhere here leaves the transaction to ctx.request(),
        # which rolls it back (and so frees the advisory lock).
        cur.execute("BEGIN")
        # Bounded by the connection's lock_timeout (55P03 -> retried).
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (sql.pg_key(ctx.row),))
        backoff = Backoff()
        while not _cas_acquire(cur, ctx, marker):
            if time.monotonic() >= ctx.acquire_deadline:
                cur.execute("ROLLBACK")
                return False
            backoff.sleep(ctx.acquire_deadline)
        cur.execute("COMMIT")
        return True

    def acquire(self, ctx, marker: str) -> None:
        attempt = self._pg if ctx.dialect.name == "postgresql" else self._mysql
        self._poll(
            ctx,
            lambda: ctx.transact(
                lambda cur, _u: attempt(cur, ctx, marker), ctx.acquire_deadline, "acquire"
            ),
        )


class _ToozLocked(Strategy):
    """Shared bits of the tooz strategies: a bounded, retried lock acquire."""

    def _lock_acquire(self, ctx) -> bool:
        import tooz

        lock = ctx.lock()
        remaining = ctx.acquire_deadline - time.monotonic()
        if remaining <= 0:
            return False
        try:
            return bool(lock.acquire(blocking=True, timeout=min(5.0, remaining)))
        except tooz.ToozError as exc:
            # The reply may be what was lost: then the lock is ours on the
            # server but not here, and nobody has it until its lease ends.
            ctx.count("disconnect")
            ctx.note(f"lock acquire: {type(exc).__name__}: {exc}"[:160])
            time.sleep(0.05)
            return False

    def _lock_release(self, ctx) -> None:
        import tooz

        deadline = ctx.release_deadline
        while True:
            try:
                ctx.lock().release()
                return
            except tooz.ToozError as exc:
                ctx.count("disconnect")
                if time.monotonic() > deadline:
                    raise ChangeFailed(f"lock release failed: {exc}") from exc
                time.sleep(0.05)


class DLMPerChange(_ToozLocked):
    """A tooz lock around each state change (not around the whole operation)."""

    def acquire(self, ctx, marker: str) -> None:
        def attempt() -> bool:
            if not self._lock_acquire(ctx):
                ctx.count("lock_timeout")
                return False
            try:
                return ctx.transact(
                    lambda cur, _u: _cas_acquire(cur, ctx, marker), ctx.acquire_deadline, "acquire"
                )
            finally:
                self._lock_release(ctx)

        self._poll(ctx, attempt)

    def release(self, ctx, marker: str, count: int) -> None:
        backoff = Backoff()
        while not self._lock_acquire(ctx):
            if time.monotonic() >= ctx.release_deadline:
                raise ChangeFailed("release: lock not acquired in time")
            backoff.sleep(ctx.release_deadline)
        try:
            super().release(ctx, marker, count)
        finally:
            self._lock_release(ctx)


class DLMWholeOperation(_ToozLocked):
    """A tooz lock from before the first change until after the second."""

    def acquire(self, ctx, marker: str) -> None:
        while not self._lock_acquire(ctx):
            if time.monotonic() >= ctx.acquire_deadline:
                raise ChangeFailed("acquire timed out waiting for the lock")
        try:
            # Under the lock the row is normally available at once; on Galera
            # the node may still be applying the previous holder's release.
            self._poll(
                ctx,
                lambda: ctx.transact(
                    lambda cur, _u: _cas_acquire(cur, ctx, marker),
                    ctx.acquire_deadline,
                    "acquire",
                ),
            )
        except BaseException:
            self._lock_release(ctx)
            raise

    def release(self, ctx, marker: str, count: int) -> None:
        try:
            super().release(ctx, marker, count)
        finally:
            self._lock_release(ctx)


class DLMFile(DLMPerChange):
    name = "dlm_file"
    lock_backend = "file"
    description = "tooz file lock (GlusterFS share) around each change"


class DLMRedis(DLMPerChange):
    name = "dlm_redis"
    lock_backend = "redis"
    description = "tooz Redis lock around each change"


class OpFile(DLMWholeOperation):
    name = "op_file"
    lock_backend = "file"
    description = "tooz file lock (GlusterFS share) for the whole operation"


class OpRedis(DLMWholeOperation):
    name = "op_redis"
    lock_backend = "redis"
    description = "tooz Redis lock for the whole operation"


class ReadThenWrite(Strategy):
    """The negative control: check, then act, in two requests, no condition."""

    name = "read_then_write"
    correct = False
    description = "NEGATIVE CONTROL: read status, then unconditional UPDATE"

    def _read(self, cur, ctx) -> str:
        cur.execute(READ, (ctx.row,))
        return cur.fetchone()[0]

    def acquire(self, ctx, marker: str) -> None:
        def attempt() -> bool:
            status = ctx.transact(
                lambda cur, _u: self._read(cur, ctx), ctx.acquire_deadline, "read"
            )
            if status != "available":
                return False
            ctx.transact(
                lambda cur, _u: cur.execute(
                    "UPDATE volumes SET status='deleting', holder=%s WHERE id=%s",
                    (marker, ctx.row),
                ),
                ctx.acquire_deadline,
                "acquire",
            )
            return True

        self._poll(ctx, attempt)

    def release(self, ctx, marker: str, count: int) -> None:
        ctx.transact(
            lambda cur, _u: cur.execute(
                "UPDATE volumes SET status='available', holder=%s, count=%s WHERE id=%s",
                (marker, count, ctx.row),
            ),
            ctx.release_deadline,
            "release",
        )


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        ForUpdate(), CompareAndSwap(), DLMFile(), DLMRedis(), OpFile(), OpRedis(),
        DbLockCAS(), GenerationCAS(), ReadThenWrite(),
    )
}  # fmt: skip
CORRECT = [name for name, s in STRATEGIES.items() if s.correct]
CONTROL = "read_then_write"
