"""A lock provider that locks nothing — for proving that tests have teeth.

Never registered as an entry point; tests load it by dotted path. A workload
that stays correct with this provider was not testing the locks.
"""

from __future__ import annotations

import os

from remotefs_aa.coordination import base


class NoLock(base.Lock):
    """Always "acquired", excludes no one.

    Except another service's presence lock, which it reports as busy: the
    share's unshared-locks check would otherwise refuse these services at
    start (it does catch this provider), and the tests using it are about
    what the chain checks see when nothing locks.
    """

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        if "-presence-" in self.name:
            return f"-{os.getpid()}-" in self.name
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
