"""Host-local lock provider: inter-process file locks from oslo.concurrency.

For a single volume service (Active-Passive) or tests on one host. The locks
exclude threads of this process and other processes of this host, nothing
more, so the provider declares itself host-local and a service configured
with ``[DEFAULT] cluster`` refuses it.
"""

from __future__ import annotations

import os
import threading
import time
import weakref

from oslo_concurrency import lockutils
from oslo_config import cfg

from remotefs_aa import exception
from remotefs_aa.coordination import base

# fcntl locks belong to a process, not a thread: two threads of one process
# would both "get" the file lock. One in-process lock per name closes that gap.
_THREAD_LOCKS: weakref.WeakValueDictionary[str, _NamedThreadLock] = weakref.WeakValueDictionary()
_THREAD_LOCKS_GUARD = threading.Lock()


class _NamedThreadLock:
    def __init__(self) -> None:
        self.lock = threading.Lock()


def _thread_lock(path: str) -> _NamedThreadLock:
    with _THREAD_LOCKS_GUARD:
        existing = _THREAD_LOCKS.get(path)
        if existing is None:
            existing = _NamedThreadLock()
            _THREAD_LOCKS[path] = existing
        return existing


class LocalLock(base.Lock):
    """A per-name file lock in ``lock_path``, also exclusive between threads."""

    def __init__(self, name: str, path: str) -> None:
        super().__init__(name)
        self.path = path
        self._thread = _thread_lock(path)
        self._file = lockutils.InterProcessLock(path)
        self._held = False

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """See :meth:`remotefs_aa.coordination.base.Lock.acquire`.

        A file lock taken on a file that :meth:`LocalLockProvider.clean` has
        unlinked meanwhile (this process opened it before the unlink, then
        waited) would exclude nobody: a newcomer creates a fresh file. So the
        lock counts only if the path still names the file it is held on;
        otherwise it is dropped and taken again on the current file.
        """
        if self._held:
            raise exception.LockAcquireFailed(self.name, "already held by this lock object")
        start = time.monotonic()
        while True:
            left = None if timeout is None else max(0.0, timeout - (time.monotonic() - start))
            if not self._acquire_once(blocking, left):
                return False
            if self._on_current_file():
                self._held = True
                return True
            self._file.release()
            self._thread.lock.release()

    def _on_current_file(self) -> bool:
        try:
            return os.path.samestat(os.fstat(self._file.lockfile.fileno()), os.stat(self.path))
        except (OSError, AttributeError, ValueError):
            return False

    def _acquire_once(self, blocking: bool, timeout: float | None) -> bool:
        start = time.monotonic()
        if not self._thread.lock.acquire(blocking, -1 if timeout is None else timeout):
            return False
        left = None if timeout is None else max(0.0, timeout - (time.monotonic() - start))
        try:
            got = self._file.acquire(
                blocking=blocking and left != 0.0, timeout=left, delay=0.001, max_delay=0.05
            )
        except OSError as exc:
            self._thread.lock.release()
            raise exception.LockBackendUnavailable(
                self.name, f"cannot open lock file {self.path}: {exc}"
            ) from exc
        except BaseException:
            self._thread.lock.release()
            raise
        if not got:
            self._thread.lock.release()
            return False
        return True

    def release(self) -> None:
        """See :meth:`remotefs_aa.coordination.base.Lock.release`."""
        if not self._held:
            raise exception.LockError(f"lock {self.name} is not held; nothing to release")
        self._held = False
        try:
            self._file.release()
        finally:
            self._thread.lock.release()

    def is_still_owner(self) -> bool:
        """File locks cannot lapse while the process lives."""
        return self._held


class LocalLockProvider(base.LockProvider):
    """File locks under ``[coordination] lock_path``, for one host."""

    provider_name = "local"

    def __init__(self, conf: cfg.ConfigOpts) -> None:
        super().__init__(conf)
        self.lock_path: str = conf.coordination.lock_path

    @property
    def spans_hosts(self) -> bool:
        """Never: file locks on a local disk are invisible to other hosts."""
        return False

    def describe(self) -> str:
        """The lock directory."""
        return f"file locks in {self.lock_path}"

    def _start(self) -> None:
        try:
            os.makedirs(self.lock_path, mode=0o755, exist_ok=True)
            probe = os.path.join(self.lock_path, f".probe-{os.getpid()}")
            with open(probe, "w"):
                pass
            os.unlink(probe)
        except OSError as exc:
            raise exception.LockProviderStartFailed(
                f"lock directory {self.lock_path} is not writable: {exc}. "
                f"Set [coordination] lock_path to a writable local directory"
            ) from exc

    def _stop(self) -> None:
        pass

    def get_lock(self, name: str) -> LocalLock:
        """A lock file named after the lock (names are safe: no slashes)."""
        safe = name.replace(os.sep, "_")
        return LocalLock(name, os.path.join(self.lock_path, safe))

    def clean(self, name: str) -> None:
        """Unlink ``name``'s lock file while holding it, if nobody else holds it.

        Unlinking under the lock is what makes it safe: a process that opened
        the old file and waits on it finds, once it gets the lock, that the
        path no longer names that file and takes it again (LocalLock.acquire).
        """
        lock = self.get_lock(name)
        if not os.path.exists(lock.path) or not lock.acquire(blocking=False):
            return
        try:
            os.unlink(lock.path)
        except FileNotFoundError:
            pass
        finally:
            lock.release()
