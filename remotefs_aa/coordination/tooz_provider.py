"""Lock provider over any tooz backend (ZooKeeper, etcd, Redis, file, ...).

Three things tooz leaves to its caller are done here:

* heartbeats: a plain ``threading.Thread`` (never a green thread) beats only
  when the tooz driver says it must, at ``[coordination] heartbeat`` seconds;
* reconnection: when a call or a heartbeat fails, the coordinator is rebuilt
  in the background with jittered exponential backoff bounded by
  ``initial_reconnect_backoff`` and ``max_reconnect_backoff``; meanwhile
  acquires fail at once with LockBackendUnavailable instead of hanging;
* a start that proves the backend answers: a private lock is taken and
  released, so an unreachable backend fails ``start()`` rather than the
  first volume operation;
* leases: every held lock knows until when it is surely ours (the send time
  of its last *confirmed* acquire or renewal + the backend's expiry - a
  margin, see :func:`lease_of`), renewed and confirmed by the heartbeat
  thread lock by lock, and marked lost the moment a renewal is refused or
  the connection goes; the operations holding it are fenced
  (``privsep.fence``). doc/locking.md has the arithmetic per backend.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import threading
import time
import uuid
from collections.abc import Iterator
from urllib import parse

from oslo_config import cfg
from stevedore import driver as stevedore_driver
from tooz import coordination as tooz_coordination

from remotefs_aa import exception, opts
from remotefs_aa.coordination import base
from remotefs_aa.privsep import fence

LOG = logging.getLogger(__name__)

# tooz's etcd3gw driver does not declare DISTRIBUTED_ACROSS_HOSTS although an
# etcd cluster is exactly that; these schemes always talk to a network server.
_NETWORK_SCHEMES = frozenset({"etcd3+http", "etcd3+https"})
# Backends whose lock waits queue on the server (first come, first served);
# every other backend is waited for by polling, see ToozLock._poll.
_SERVER_SIDE_WAIT_SCHEMES = frozenset({"zookeeper", "kazoo"})
# A lock that lives as long as its database connection: no lease to renew.
_CONNECTION_BOUND_SCHEMES = frozenset({"mysql", "postgresql"})
#: Bounds, in seconds, of the pause between two polls for a busy lock.
POLL_MIN = 0.001
POLL_MAX = 0.05


class ToozLock(base.Lock):
    """A tooz lock whose backend failures become LockBackendUnavailable."""

    def __init__(self, provider: ToozLockProvider, name: str) -> None:
        super().__init__(name)
        self._provider = provider
        self._generation, self._coordinator = provider._coordinator_for_lock(name)
        self._lock = self._coordinator.get_lock(name.encode())
        self._held = False
        self._wake: threading.Event | None = None  # set while a wait is under way
        self._session: object = None  # ZooKeeper: the session the lock lives in

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """See :meth:`remotefs_aa.coordination.base.Lock.acquire`.

        The first attempt never blocks and runs inline: the uncontended path
        costs one round trip and no thread. How a busy lock is waited for
        depends on the backend, see :meth:`_poll` and :meth:`_wait_in_thread`.
        """
        if self._held:
            raise exception.LockAcquireFailed(self.name, "already held by this lock object")
        got = self._attempt()
        if not got and blocking and (timeout is None or timeout > 0):
            self._wake = threading.Event()
            self._provider._inflight.add(self)
            try:
                if self._provider.server_side_wait:
                    got = self._wait_in_thread(timeout)
                else:
                    got = self._poll(timeout)
            finally:
                self._provider._inflight.discard(self)
        self._held = got
        return got

    def _attempt(self) -> bool:
        """One non-blocking try; a success starts the lease at the send time."""
        sent = fence.now()
        got = self._call_backend(blocking=False, timeout=None)
        if got:
            self._started_lease(sent)
            return True
        if self._provider.fresh_lock_after_failure:
            # A fresh tooz lock object for the next try: tooz's file lock
            # leaves its per-object reference count raised after a failed
            # attempt, then warns that the lock was never released. (Only
            # there: a tooz MySQL lock object opens a new connection.)
            self._lock = self._coordinator.get_lock(self.name.encode())
        return got

    def _poll(self, timeout: float | None) -> bool:
        """Wait by retrying non-blocking attempts with short jittered backoff.

        tooz's own waits poll far too slowly for a lock held a few
        milliseconds: its etcd and memcached drivers sleep a full second
        between tries, redis-py 100 ms, so a releasing process takes the lock
        straight back and the others starve. Our retries start at 1 ms and
        double up to ``POLL_MAX`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = POLL_MIN
        while True:
            pause = random.uniform(delay / 2, delay)
            if deadline is not None:
                pause = min(pause, max(0.0, deadline - time.monotonic()))
            if self._wake.wait(pause):
                raise self._lost_while_waiting()
            if self._attempt():
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            delay = min(delay * 2, POLL_MAX)

    def _lost_while_waiting(self) -> exception.LockError:
        return self._provider._connection_lost(
            self.name,
            "waiting for",
            ConnectionError("connection to the backend lost"),
            self._generation,
        )

    def _started_lease(self, sent: float) -> None:
        self.lost_reason = None
        self.deadline = self._provider.lease.deadline(sent)
        self._session = self._provider.session_id()
        self._provider._held.add(self)

    def renew(self) -> None:
        """Renew this lock's lease and confirm it is still ours (heartbeat thread).

        Only a confirmed renewal moves :attr:`deadline`; a refusal marks the
        lock lost. Connection errors propagate (the provider then loses
        every lock of the connection).
        """
        kind = self._provider.lease.kind
        sent = fence.now()
        ttl: float | None = None
        try:
            if kind == "per-lock":
                ok = bool(self._lock.heartbeat())
                if ok and self._provider.lease.check_owner:
                    # memcached's touch also extends *someone else's* key: only
                    # a read after it proves the key is still ours.
                    ok = bool(self._lock.is_still_owner())
            elif kind == "etcd":
                # tooz's etcd lock ignores the keepalive's answer (it reports
                # success for an expired lease); the TTL it returns is the truth.
                ttl = float(self._lock._lease.refresh())  # private: see doc/locking.md
                ok = ttl > 0
            else:
                ok = self._session == self._provider.session_id()
        except Exception as exc:
            if _is_connection_error(exc):
                raise
            self.lost(f"its renewal was refused ({describe_error(exc)})")
            return
        if ok:
            self.confirmed(self._provider.lease.deadline(sent, ttl))
        else:
            self.lost("its renewal was refused: the backend says it is no longer ours")

    def _call_backend(self, blocking: bool, timeout: float | None) -> bool:
        # The wait bound goes in ``blocking`` as a number: that is the one
        # form every tooz driver reads the same way. Its ``timeout`` argument
        # is unsupported by memcached and means the lease TTL for etcd.
        wait: bool | float = float(timeout) if blocking and timeout is not None else blocking
        try:
            return bool(self._lock.acquire(blocking=wait))
        except Exception as exc:
            raise self._provider._connection_lost(
                self.name, "acquiring", exc, self._generation
            ) from exc

    def _wait_in_thread(self, timeout: float | None) -> bool:
        """Wait in the backend's own queue (ZooKeeper: fair, no polling).

        The wait runs in a helper thread the caller can abandon: kazoo keeps
        a waiting acquire alive through an outage, queueing its requests until
        the server returns, so the caller would otherwise hang instead of
        learning that the backend is gone. A lock the abandoned thread still
        obtains is released at once.
        """
        wake = self._wake
        outcome: dict[str, object] = {}
        guard = threading.Lock()

        def run() -> None:
            try:
                result: object = self._call_backend(blocking=True, timeout=timeout)
            except BaseException as exc:  # handed to the caller
                result = exc
            with guard:
                outcome["result"] = result
                abandoned = outcome.get("abandoned", False)
            if abandoned and result is True:
                self._release_quietly()
            wake.set()

        threading.Thread(target=run, name=f"wait-{self.name}", daemon=True).start()
        wake.wait()
        with guard:
            result = outcome.get("result")
            if result is None:
                outcome["abandoned"] = True
        if isinstance(result, BaseException):
            raise result
        if result is None:
            self._cancel_backend_wait()
            raise self._lost_while_waiting()
        return bool(result)

    def cancel_wait(self) -> None:
        """Make a waiting :meth:`acquire` give up: the backend connection is gone."""
        if self._wake is not None:
            self._wake.set()

    def _cancel_backend_wait(self) -> None:
        # Ask the client to stop waiting too, so its helper thread ends when
        # the client notices (kazoo's lock recipe has cancel()).
        cancel = getattr(getattr(self._lock, "_lock", None), "cancel", None)
        if cancel is not None:
            try:
                cancel()
            except Exception as exc:
                LOG.debug("Could not cancel the wait for %s: %s", self.name, exc)

    def _release_quietly(self) -> None:
        try:
            self._lock.release()
        except Exception as exc:
            LOG.debug("Ignoring release failure of abandoned lock %s: %s", self.name, exc)

    def release(self) -> None:
        """See :meth:`remotefs_aa.coordination.base.Lock.release`."""
        if not self._held:
            raise exception.LockError(f"lock {self.name} is not held; nothing to release")
        self._held = False
        self._provider._held.discard(self)
        if self._generation != self._provider._generation or not self._provider.connected:
            # Taken on a coordinator whose connection was lost (or that was
            # already replaced): the backend dropped the lock or expires it
            # by itself, and a client call now could block until the server
            # returns.
            LOG.warning("Lock %s was lost with the backend connection; not released", self.name)
            return
        try:
            released = self._lock.release()
        except Exception as exc:
            self._provider._connection_lost(self.name, "releasing", exc, self._generation)
            raise exception.LockError(
                f"could not release lock {self.name}: {exc}; it expires on the backend"
            ) from exc
        if released is False:
            LOG.warning("Lock %s was no longer ours when released (lease lapsed?)", self.name)

    def is_still_owner(self) -> bool:
        """See :meth:`remotefs_aa.coordination.base.Lock.is_still_owner`."""
        if (
            not self._held
            or self._generation != self._provider._generation
            or not self._provider.connected
        ):
            return False
        try:
            return bool(self._lock.is_still_owner())
        except NotImplementedError:
            return bool(getattr(self._lock, "acquired", self._held))
        except Exception as exc:
            self._provider._connection_lost(
                self.name, "checking ownership of", exc, self._generation
            )
            return False


class ToozLockProvider(base.LockProvider):
    """Locks from the tooz backend at ``[coordination] backend_url``."""

    provider_name = "tooz"

    def __init__(self, conf: cfg.ConfigOpts, member_id: str | None = None) -> None:
        super().__init__(conf)
        self._coord_conf = conf.coordination
        self._url: str = self._coord_conf.backend_url
        opts.validate_backend_url(self._url)
        self._scheme = parse.urlparse(self._url).scheme
        #: True when busy locks are waited for in the server's queue.
        self.server_side_wait = self._scheme in _SERVER_SIDE_WAIT_SCHEMES
        self.fair = self.server_side_wait
        #: Work around tooz's file lock reference count (see ToozLock._attempt).
        self.fresh_lock_after_failure = self._scheme == "file"
        self._member_id = member_id or f"{conf.host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._coordinator: tooz_coordination.CoordinationDriver | None = None
        self._generation = 0
        self._state_lock = threading.Lock()
        self._stopping = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None
        self._reconnect_thread: threading.Thread | None = None
        self._last_error: str | None = None
        self._next_attempt_at = 0.0
        self._inflight: set[ToozLock] = set()
        #: Locks held now, renewed lock by lock by the heartbeat thread.
        self._held: set[ToozLock] = set()
        self.lease = lease_of(self._url, self._coord_conf)
        self.reconnects = 0

    @property
    def spans_hosts(self) -> bool:
        """Whether the tooz driver for this URL coordinates several hosts."""
        if self._scheme in _NETWORK_SCHEMES:
            return True
        try:
            driver_cls = stevedore_driver.DriverManager(
                "tooz.backends", self._scheme, invoke_on_load=False
            ).driver
        except Exception as exc:
            raise exception.PluginLoadFailed(missing_library(self._scheme, exc)) from exc
        traits = getattr(driver_cls, "CHARACTERISTICS", ())
        return tooz_coordination.Characteristics.DISTRIBUTED_ACROSS_HOSTS in traits

    @property
    def requires_heartbeat(self) -> bool:
        """Whether a heartbeat thread runs (only if the tooz driver needs it)."""
        return self._coordinator is not None and bool(self._coordinator.requires_beating)

    @property
    def connected(self) -> bool:
        """False between a detected connection loss and the reconnection."""
        return self._coordinator is not None and self._reconnect_thread is None

    def describe(self) -> str:
        """The backend URL with any password hidden."""
        return opts.redact_url(self._url)

    def _start(self) -> None:
        self._stopping.clear()
        try:
            if self._url.startswith("file://"):
                os.makedirs(parse.urlparse(self._url).path, exist_ok=True)
            self._coordinator = self._connect()
        except Exception as exc:
            if _import_error(exc) is not None:
                # Not the server: this host lacks the client library.
                raise exception.PluginLoadFailed(missing_library(self._scheme, exc)) from exc
            raise exception.LockProviderStartFailed(
                f"cannot reach lock backend {self.describe()}: {describe_error(exc)}. "
                f"Check that the server runs and [coordination] backend_url is right"
            ) from exc
        self._generation += 1
        self._check_heartbeat_fits_lease()
        if self._coordinator.requires_beating:
            self._heartbeat_thread = threading.Thread(
                target=self._heartbeat_loop, name="remotefs_aa-tooz-heartbeat", daemon=True
            )
            self._heartbeat_thread.start()
        LOG.info(
            "Lock provider tooz started: backend %s, member %s, spans hosts: %s, heartbeat: %s, "
            "lease: %s",
            self.describe(),
            self._member_id,
            self.spans_hosts,
            self.requires_heartbeat,
            self.lease.describe(),
        )

    def _check_heartbeat_fits_lease(self) -> None:
        """Renewals must come well before the deadline they move, or every step is fenced."""
        usable = self.lease.seconds - self.lease.margin
        if not math.isfinite(usable):
            if self.lease.kind == "none" and self._scheme in _CONNECTION_BOUND_SCHEMES:
                LOG.warning(
                    "Lock backend %s holds a lock for as long as its connection lives and "
                    "has no lease: a lock the server drops (restart, kill, idle timeout) "
                    "is not noticed, and only the compare-and-swap on the share fences "
                    "the old holder. Prefer Redis, etcd or ZooKeeper for Active-Active",
                    self.describe(),
                )
            return
        interval = self._coord_conf.heartbeat
        if interval >= usable:
            raise exception.InvalidConfig(
                "[coordination] heartbeat",
                interval,
                f"locks on {self.describe()} are surely ours for {usable:.1f} s after a "
                f"renewal ({self.lease.describe()}); renew at least twice in that time: "
                f"heartbeat <= {usable / 2:.1f}, or raise the backend's lock timeout",
            )
        if interval > usable / 2:
            LOG.warning(
                "[coordination] heartbeat = %s s leaves one renewal per %.1f s lease "
                "window (%s); a single slow renewal will fence operations",
                interval,
                usable,
                self.lease.describe(),
            )

    def session_id(self) -> object:
        """ZooKeeper's session id (a lock lives only as long as its session), else None."""
        client = getattr(self._coordinator, "_coord", None)
        client_id = getattr(client, "client_id", None) if client is not None else None
        return client_id[0] if client_id else None

    def _connect(self) -> tooz_coordination.CoordinationDriver:
        """A fresh coordinator that answered within ``connect_timeout``, or an error.

        Client libraries wait long on an unreachable server (kazoo 10 s, with a
        warning per retry; redis-py on an unanswering address until TCP gives
        up), so the attempt runs in a helper thread that is abandoned at the
        deadline; a coordinator it still starts later is stopped at once.
        """
        timeout = self._coord_conf.connect_timeout
        outcome: dict[str, object] = {}
        guard = threading.Lock()

        def attempt() -> None:
            try:
                with _quiet_client_logs():
                    result: object = self._connect_now(timeout)
            except BaseException as exc:  # handed to the caller
                result = exc
            with guard:
                outcome["result"] = result
                abandoned = outcome.get("abandoned", False)
            if abandoned and isinstance(result, tooz_coordination.CoordinationDriver):
                _stop_quietly(result)

        thread = threading.Thread(target=attempt, name="remotefs_aa-tooz-connect", daemon=True)
        thread.start()
        thread.join(timeout)
        with guard:
            result = outcome.get("result")
            if result is None:
                outcome["abandoned"] = True
        if result is None:
            raise TimeoutError(f"no answer within [coordination] connect_timeout = {timeout:g} s")
        if isinstance(result, BaseException):
            raise result
        return result  # type: ignore[return-value]

    def _connect_now(self, timeout: float) -> tooz_coordination.CoordinationDriver:
        """Start a fresh coordinator and prove the backend answers (take a probe lock)."""
        coordinator = tooz_coordination.get_coordinator(self._url, self._member_id.encode())
        _fail_fast(coordinator)
        if self.server_side_wait and isinstance(getattr(coordinator, "timeout", None), int | float):
            # tooz's ZooKeeper driver waits this long in kazoo's start(), 10 s by
            # default (the URL's timeout, which is also the session timeout, so it
            # is not ours to change). Past our deadline the attempt is abandoned
            # anyway; this makes kazoo stop retrying soon after, not 10 s later.
            coordinator.timeout = timeout + 1.0
        # Our own heartbeat thread replaces tooz's: tooz's retries a failing
        # beat forever, which would hide the outage from acquirers.
        coordinator.start(start_heart=False)
        self._watch_session(coordinator, self._generation + 1)
        try:
            name = f"remotefs_aa-probe-{self._member_id}"
            probe = coordinator.get_lock(name.encode())
            if not probe.acquire(blocking=False):
                raise exception.LockProviderStartFailed("probe lock is unexpectedly busy")
            probe.release()
            path = self._lock_file(name)
            if path is not None:
                # The name is this process's alone, so nobody else can hold or wait
                # on the file: without this, every start left one behind.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        except BaseException:
            _stop_quietly(coordinator)
            raise
        return coordinator

    def _watch_session(
        self, coordinator: tooz_coordination.CoordinationDriver, generation: int
    ) -> None:
        """Learn of a lost ZooKeeper connection the moment kazoo does.

        kazoo reconnects by itself and queues requests meanwhile, so neither a
        heartbeat nor a waiting acquire ever fails during an outage: they just
        block until the server returns. Its session listener is the one place
        that says the connection is gone.
        """
        client = getattr(coordinator, "_coord", None)
        add_listener = getattr(client, "add_listener", None)
        if add_listener is None:
            return
        try:
            from kazoo.client import KazooState
        except ImportError:
            return

        def listener(state: str) -> bool:
            if self._coordinator is not coordinator:
                # Not (yet, or any more) the provider's: a probe still running,
                # or an attempt abandoned at connect_timeout and being stopped,
                # whose LOST must not tear down the coordinator that replaced it.
                return False
            if state in (KazooState.SUSPENDED, KazooState.LOST):
                self._connection_lost(
                    "(session)",
                    "watching the session of",
                    ConnectionError(f"ZooKeeper session {state.lower()}"),
                    generation,
                )
                return True  # this client is being replaced; stop listening
            return False

        add_listener(listener)

    def _stop(self) -> None:
        self._stopping.set()
        for thread in (self._heartbeat_thread, self._reconnect_thread):
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout=10)
        self._heartbeat_thread = None
        self._reconnect_thread = None
        with self._state_lock:
            coordinator, self._coordinator = self._coordinator, None
        if coordinator is not None:
            _stop_quietly(coordinator)
        LOG.info("Lock provider tooz stopped: backend %s", self.describe())

    def get_lock(self, name: str) -> ToozLock:
        """A lock named ``name`` on the current coordinator."""
        return ToozLock(self, name)

    def _lock_file(self, name: str) -> str | None:
        """The file tooz's file driver keeps for lock ``name`` (None for other backends).

        tooz's file driver makes a lock file of the name inside the URL's
        directory; the other drivers keep nothing on this host.
        """
        if self._scheme != "file":
            return None
        directory = os.path.abspath(parse.urlparse(self._url).path)
        path = os.path.abspath(os.path.join(directory, name))
        return path if os.path.dirname(path) == directory else None

    def clean(self, name: str) -> None:
        """file://: unlink ``name``'s lock file, taken without waiting, when nobody holds it.

        Unlinking under the lock keeps a current holder's exclusion; a process
        that opened the file just before the unlink and takes it just after
        could still lock the old file while a newcomer locks a new one. That
        takes operations on the volume that was just deleted, an id reused at
        once, and this window; Cinder's clean_volume_file_locks leaves the same.
        """
        path = self._lock_file(name)
        if path is None or not os.path.exists(path):
            return
        lock = self.get_lock(name)
        if not lock.acquire(blocking=False):
            return
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        finally:
            lock.release()

    def _coordinator_for_lock(self, name: str) -> tuple[int, tooz_coordination.CoordinationDriver]:
        with self._state_lock:
            if self._coordinator is None or self._reconnect_thread is not None:
                if not self._started and self._coordinator is None:
                    raise exception.LockProviderNotStarted()
                wait = max(0.0, self._next_attempt_at - time.monotonic())
                raise exception.LockBackendUnavailable(
                    name,
                    f"lock backend {self.describe()} is unreachable ({self._last_error}); "
                    f"reconnecting, next attempt in {wait:.1f} s. The operation did "
                    f"not run; retry it when the backend is back",
                )
            return self._generation, self._coordinator

    def _connection_lost(
        self, name: str, doing: str, exc: BaseException, generation: int
    ) -> exception.LockError:
        """Record a backend failure, start reconnecting, return the error to raise.

        ``generation`` names the coordinator that failed: a late error from a
        coordinator already replaced must not tear down its successor.
        """
        reason = describe_error(exc)
        with self._state_lock:
            current = generation == self._generation
            if current:
                self._last_error = reason
            if current and self._reconnect_thread is None and not self._stopping.is_set():
                LOG.error(
                    "Lock backend %s failed while %s lock %s: %s; reconnecting",
                    self.describe(),
                    doing,
                    name,
                    reason,
                )
                self._next_attempt_at = time.monotonic()
                self._reconnect_thread = threading.Thread(
                    target=self._reconnect_loop, name="remotefs_aa-tooz-reconnect", daemon=True
                )
                self._reconnect_thread.start()
                # list() copies the set in one step; waiters add and remove
                # themselves from other threads.
                waiting = [lk for lk in list(self._inflight) if lk._generation == generation]
            else:
                waiting = []
            gone = [lk for lk in list(self._held) if lk._generation == generation]
        for lock in waiting:
            lock.cancel_wait()
        for lock in gone:
            lock.lost(f"the connection to the backend was lost ({reason})")
        return exception.LockBackendUnavailable(
            name,
            f"lock backend {self.describe()} failed while {doing} the lock ({reason}); "
            f"the operation did not run under this lock. The provider reconnects "
            f"by itself; retry when the backend is back",
        )

    def _backoff(self, attempt: int) -> float:
        initial = self._coord_conf.initial_reconnect_backoff
        ceiling = self._coord_conf.max_reconnect_backoff
        delay = min(ceiling, initial * (2 ** min(attempt, 60)))
        # Full jitter on the upper half: hosts that lost the same backend do
        # not all come back in the same instant.
        return random.uniform(delay / 2, delay)

    def _reconnect_loop(self) -> None:
        attempt = 0
        while not self._stopping.is_set():
            delay = self._backoff(attempt)
            self._next_attempt_at = time.monotonic() + delay
            if self._stopping.wait(delay):
                return
            attempt += 1
            try:
                fresh = self._connect()
            except Exception as exc:
                self._last_error = describe_error(exc)
                LOG.warning(
                    "Reconnect %d to lock backend %s failed: %s",
                    attempt,
                    self.describe(),
                    self._last_error,
                )
                continue
            with self._state_lock:
                old, self._coordinator = self._coordinator, fresh
                self._generation += 1
                self._reconnect_thread = None
                self._last_error = None
                self.reconnects += 1
            if old is not None:
                _stop_quietly(old)
            LOG.warning(
                "Reconnected to lock backend %s after %d attempt(s); locks held "
                "before the loss are gone",
                self.describe(),
                attempt,
            )
            return

    def _heartbeat_loop(self) -> None:
        interval = self._coord_conf.heartbeat
        while not self._stopping.wait(interval):
            with self._state_lock:
                coordinator = self._coordinator if self._reconnect_thread is None else None
                generation = self._generation
            if coordinator is None:
                continue
            held = [lk for lk in list(self._held) if lk._generation == generation]
            try:
                # tooz's heartbeat keeps the connection (and its own keys) alive,
                # but for most drivers says nothing reliable about each lock; the
                # renewal that moves a lock's deadline is confirmed lock by lock.
                coordinator.heartbeat()
                if self.lease.kind != "none":
                    for lock in held:
                        lock.renew()
            except Exception as exc:
                self._connection_lost("(heartbeat)", "heartbeating", exc, generation)


#: Client loggers that warn on every failed connection retry (kazoo: about ten
#: "Connection dropped" lines before it gives up); our one error replaces them.
_RETRY_LOGGERS = ("kazoo", "kazoo.client", "kazoo.protocol.connection")
_quiet_lock = threading.Lock()
_quiet_depth = 0
_saved_levels: dict[str, int] = {}


@contextlib.contextmanager
def _quiet_client_logs() -> Iterator[None]:
    """Silence the client libraries' retry warnings while a connection attempt runs.

    Their loggers are global, so nested or concurrent attempts share one
    silencing: the levels come back when the last attempt ends.
    """
    global _quiet_depth
    with _quiet_lock:
        if _quiet_depth == 0:
            for name in _RETRY_LOGGERS:
                logger = logging.getLogger(name)
                _saved_levels[name] = logger.level
                logger.setLevel(logging.ERROR)
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0:
                for name, level in _saved_levels.items():
                    logging.getLogger(name).setLevel(level)
                _saved_levels.clear()


def _stop_quietly(coordinator: tooz_coordination.CoordinationDriver) -> None:
    try:
        coordinator.stop()
    except Exception as exc:
        LOG.debug("Ignoring error while stopping a tooz coordinator: %s", exc)


def _fail_fast(coordinator: tooz_coordination.CoordinationDriver) -> None:
    """Stop stacked client retries from turning an outage into a long hang.

    tooz's Redis driver already retries a refused connection 15 times, and
    redis-py >= 6 retries each of those 10 times with exponential backoff:
    an acquire against a stopped Redis then blocks for about a minute before
    it fails. With redis-py's own retries off, the same outage is reported in
    milliseconds and our reconnect loop (with its bounded backoff) takes over.
    tooz offers no option for this, so the client factory is wrapped.
    """
    make_client = getattr(coordinator, "_make_client", None)
    if make_client is None:
        return
    try:
        from redis.backoff import NoBackoff
        from redis.retry import Retry
    except ImportError:
        return

    def make_client_without_retries(*args: object, **kwargs: object) -> object:
        client = make_client(*args, **kwargs)
        set_retry = getattr(client, "set_retry", None)
        if set_retry is not None:
            set_retry(Retry(NoBackoff(), 0))
        return client

    coordinator._make_client = make_client_without_retries  # type: ignore[attr-defined]


#: The client library each tooz backend imports (the pip package to install).
CLIENT_PACKAGES = {
    "zookeeper": "kazoo",
    "kazoo": "kazoo",
    "redis": "redis",
    "etcd3+http": "etcd3gw",
    "etcd3+https": "etcd3gw",
    "memcached": "pymemcache",
    "mysql": "PyMySQL",
    "postgresql": "psycopg2-binary",
}


def _import_error(exc: BaseException | None) -> ImportError | None:
    """The ImportError behind ``exc`` (tooz and stevedore may wrap it), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ImportError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def missing_library(scheme: str, exc: BaseException) -> str:
    """What to install when the tooz driver for ``scheme`` cannot be imported.

    A missing client library used to read "cannot reach lock backend ...
    Check that the server runs", sending the operator to a healthy server.
    """
    package = CLIENT_PACKAGES.get(scheme)
    cause = _import_error(exc) or exc
    what = f"the {package} package" if package else "its client library"
    install = f"pip install {package}" if package else "install its client library"
    return (
        f"the tooz driver for {scheme}:// needs {what}, which this Python cannot import "
        f"({describe_error(cause)}); {install} into the service's virtualenv, or every "
        f"lock client at once: pip install 'remotefs_aa[backends]'"
    )


def describe_error(exc: BaseException) -> str:
    """``Type: message`` of an error, falling back to its cause.

    tooz often wraps a client error in an exception with an empty message;
    the cause is what tells an operator what happened.
    """
    text = str(exc).strip()
    cause = exc.__cause__ or exc.__context__
    if not text and cause is not None:
        return f"{type(exc).__name__}: {describe_error(cause)}"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclasses.dataclass(frozen=True)
class Lease:
    """How a backend's locks expire, and the deadline arithmetic (doc/locking.md).

    ``kind``: ``per-lock`` (Redis, memcached: each lock's key has a TTL,
    renewed by ``lock.heartbeat()``), ``etcd`` (a lease per lock; its TTL is
    read from the keepalive answer), ``session`` (ZooKeeper: the session is
    the lease), ``none`` (file, SQL: nothing expires while the holder lives).
    """

    kind: str
    seconds: float
    margin: float
    check_owner: bool = False

    def deadline(self, sent: float, ttl: float | None = None) -> float:
        """Surely ours until: the send time + the expiry - the margin."""
        seconds = self.seconds if ttl is None else ttl
        if not math.isfinite(seconds):
            return math.inf
        return sent + seconds - self.margin

    def describe(self) -> str:
        if not math.isfinite(self.seconds):
            return f"{self.kind} (no expiry)"
        return f"{self.kind}, {self.seconds:g} s, margin {self.margin:g} s"


def lease_of(url: str, group: object) -> Lease:
    """The lease model of a tooz URL (its query options as tooz reads them)."""
    parsed = parse.urlparse(url)
    query = {k: v[-1] for k, v in parse.parse_qs(parsed.query).items()}
    scheme = parsed.scheme

    def seconds(*keys: str, default: float) -> float:
        for key in keys:
            if key in query:
                try:
                    return float(query[key])
                except ValueError:
                    break
        return default

    if scheme in ("redis", "rediss", "redis+sentinel"):
        kind, lease, check = "per-lock", seconds("lock_timeout", "timeout", default=30), False
    elif scheme == "memcached":
        # memcached counts whole seconds: a key set to live N s may vanish after N-1.
        lease = seconds("lock_timeout", "timeout", default=30) - 1
        kind, check = "per-lock", True
    elif scheme in _NETWORK_SCHEMES:
        kind, lease, check = "etcd", seconds("lock_timeout", "timeout", default=30), False
    elif scheme in _SERVER_SIDE_WAIT_SCHEMES:
        kind, lease, check = "session", seconds("timeout", default=10), False
    else:
        kind, lease, check = "none", math.inf, False
    configured = getattr(group, "lease_margin", None)
    margin = (
        float(configured)
        if configured is not None
        else (max(0.5, 0.1 * lease) if math.isfinite(lease) else 0.0)
    )
    return Lease(kind, lease, margin, check)


def _is_connection_error(exc: BaseException) -> bool:
    """Whether a tooz error means the backend is unreachable (not: the lock is gone)."""
    return isinstance(exc, tooz_coordination.ToozConnectionError | ConnectionError | OSError)
