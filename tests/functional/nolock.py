"""A lock provider that locks nothing — for proving that tests have teeth.

Never registered as an entry point; tests load it by dotted path. A workload
that stays correct with this provider was not testing the locks.
"""

from __future__ import annotations

from remotefs_aa.coordination import base


class NoLock(base.Lock):
    """Always "acquired", excludes no one."""

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        return True

    def release(self) -> None:
        pass

    def is_still_owner(self) -> bool:
        return True


class NoLockProvider(base.LockProvider):
    """Claims to span hosts so even an Active-Active config accepts it."""

    provider_name = "nolock"

    @property
    def spans_hosts(self) -> bool:
        return True

    def describe(self) -> str:
        return "no locking at all (test only)"

    def _start(self) -> None:
        pass

    def _stop(self) -> None:
        pass

    def get_lock(self, name: str) -> NoLock:
        return NoLock(name)
