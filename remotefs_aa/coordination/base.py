"""The lock provider contract: one small interface, one file per provider.

Shaped after tooz's ``locking.Lock``: ``acquire`` answers True or False for a
lock that is merely busy, and raises when the backend itself failed; entering a
lock as a context manager raises unless the acquire succeeded, so the protected
block can never run unlocked.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import types
from typing import Any, Self

from oslo_config import cfg

from remotefs_aa import exception


class Lock(abc.ABC):
    """A named lock handed out by a :class:`LockProvider`.

    A held lock knows until when it is surely still its holder's
    (:attr:`deadline`, on ``fence.now()``'s clock): for a lease-based backend
    the last confirmed acquire or renewal plus the lease, minus a safety
    margin; ``inf`` where nothing expires while the holder lives (file
    locks). Providers call :meth:`confirmed` and :meth:`lost`; the fences of
    the operations holding the lock follow (``privsep.fence``).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.deadline: float = math.inf
        self.lost_reason: str | None = None
        self.fences: set[Any] = set()

    def confirmed(self, deadline: float) -> None:
        """A renewal was confirmed: the lock is surely ours until ``deadline``."""
        self.deadline = deadline
        for fence in list(self.fences):
            fence.refresh()

    def lost(self, reason: str) -> None:
        """The lock is not (surely) ours any more: stop every operation holding it."""
        if self.lost_reason is None:
            self.lost_reason = reason
        self.deadline = -math.inf
        for fence in list(self.fences):
            fence.lose(f"lock {self.name}: {reason}")

    @abc.abstractmethod
    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """Take the lock.

        :param blocking: wait for the lock when another holder has it.
        :param timeout: with ``blocking``, the most seconds to wait; None
            waits as long as it takes.
        :returns: True when the lock is now held, False when it was busy
            (non-blocking) or the timeout passed.
        :raises LockBackendUnavailable: the backend could not be asked.
        """

    @abc.abstractmethod
    def release(self) -> None:
        """Give the lock back. Releasing a lock that is not held is an error."""

    @abc.abstractmethod
    def is_still_owner(self) -> bool:
        """Tell whether this holder still owns the lock.

        For lease-based backends a lock can lapse under its holder (a missed
        heartbeat, a network partition); callers about to make an irreversible
        change can check this first.
        """

    def __enter__(self) -> Self:
        if not self.acquire():
            raise exception.LockAcquireFailed(self.name, "the backend refused the lock")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


@dataclasses.dataclass(frozen=True)
class LockSettings:
    """The ``[coordination]`` values every lock call needs, read once.

    Reading oslo.config options costs microseconds each; a lock call reads
    several, and the uncontended lock itself costs tens of microseconds.
    """

    acquire_timeout: float | None = None
    wait_warning_interval: float = 30.0
    slow_log_threshold: float = 1.0
    handoff_interval: float = 0.0

    @classmethod
    def from_conf(cls, conf: cfg.ConfigOpts) -> LockSettings:
        """Snapshot the options (defaults if the group is not registered)."""
        try:
            group = conf.coordination
            return cls(
                acquire_timeout=group.lock_acquire_timeout,
                wait_warning_interval=group.lock_wait_warning_interval,
                slow_log_threshold=group.slow_lock_log_threshold,
                handoff_interval=group.lock_handoff_interval,
            )
        except (cfg.NoSuchOptError, cfg.NoSuchGroupError):
            return cls()


class LockProvider(abc.ABC):
    """Hands out named locks from one backend.

    A provider is constructed with the service's ``ConfigOpts`` (options
    registered by :func:`remotefs_aa.opts.register_opts`), then started once
    and stopped once. Third-party providers subclass this and register in the
    ``remotefs_aa.lock_providers`` entry-point namespace.
    """

    #: Name used in logs and by ``lock check``.
    provider_name = "abstract"
    #: True when waiters are served first come, first served by the backend
    #: (no hand-off pause is needed, see ``lock_handoff_interval``).
    fair = False

    def __init__(self, conf: cfg.ConfigOpts) -> None:
        self.conf = conf
        self._started = False
        self.settings = LockSettings.from_conf(conf)

    @property
    @abc.abstractmethod
    def spans_hosts(self) -> bool:
        """True when a lock taken on one host excludes holders on other hosts.

        Known before :meth:`start`, so a misconfigured Active-Active service is
        refused before it touches anything.
        """

    @abc.abstractmethod
    def describe(self) -> str:
        """The backend, for logs and ``lock check``, with secrets removed."""

    @abc.abstractmethod
    def _start(self) -> None:
        """Connect to the backend; raise LockProviderStartFailed if unreachable."""

    @abc.abstractmethod
    def _stop(self) -> None:
        """Disconnect from the backend, releasing what this provider holds."""

    @abc.abstractmethod
    def get_lock(self, name: str) -> Lock:
        """A lock object for ``name`` (cheap; nothing is taken yet)."""

    def clean(self, name: str) -> None:  # noqa: B027 - a no-op by design
        """Remove what lock ``name`` leaves behind once its resource is gone.

        Called after a volume is deleted (Cinder's ``clean_volume_file_locks``),
        never while the caller holds ``name``. Only file-based providers keep
        something per name (a lock file that would otherwise pile up); server
        backends free or expire their keys by themselves, hence the no-op.
        """

    @property
    def started(self) -> bool:
        """Whether :meth:`start` succeeded and :meth:`stop` was not called."""
        return self._started

    def start(self) -> None:
        """Connect to the backend; fail loudly if it cannot be reached."""
        if self._started:
            return
        self._start()
        self._started = True

    def stop(self) -> None:
        """Disconnect; safe to call twice or after a failed start."""
        if not self._started:
            return
        self._started = False
        self._stop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"
