"""Lease deadlines carried into every privileged step (fencing by time).

A lock on a lease-based backend is only ours until its lease could have run
out: the last *confirmed* renewal plus the backend's expiry, minus a safety
margin (``coordination`` computes it). An operation holding locks runs in a
:class:`Fence` (set by ``coordination.synchronized`` / ``locked``); every
privileged call made inside it carries the fence's deadline and a token:

* the caller refuses to send a call once the deadline has passed, or once the
  provider learned that a lock was lost (:meth:`Fence.check`);
* the daemon refuses to start the step after the deadline, and ends a child
  (qemu-img) that is still running when it passes (``runner.run`` watches
  :data:`RUNNING`); only a confirmed renewal moves the deadline of a running
  call (:func:`extend`, sent by the provider's heartbeat thread), and a lost
  lock ends it at once (:func:`abort`).

So a service that is frozen (GC pause, VM freeze) or cut off cannot keep
its daemon working past the moment another host may get the lock: nothing
renews the deadline while it is frozen. The clock is CLOCK_BOOTTIME, which
keeps counting through a suspend and is the same for the service and its
daemons on one host. Layer: this module is the bottom (privsep); the lock
layer above fills it in.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from remotefs_aa import exception

#: Test-only switch: False sends no deadlines (the daemon then enforces none),
#: so the pause tests can show what happens without them. Never set in production.
ENFORCE = True

#: Fault-injection point for the tests: called as ``on_step(when, step)`` with
#: ``when`` "before" / "after" around every privileged call made inside a
#: locked operation (``step`` is the entrypoint's name), in the calling
#: thread. None (always, outside tests).
on_step: Callable[[str, str], None] | None = None


def now() -> float:
    """Seconds on CLOCK_BOOTTIME (counts through a suspend, unlike CLOCK_MONOTONIC)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class Fence:
    """The lease deadline of one locked operation, and its privileged calls in flight."""

    def __init__(self, names: list[str], deadline: float = math.inf) -> None:
        self.names = names
        self.deadline = deadline
        self.lost: str | None = None
        self._lock = threading.Lock()
        #: token -> the context's ``extend``/``abort`` senders, for calls in flight.
        self._inflight: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {}

    def __repr__(self) -> str:
        return f"<Fence {','.join(self.names)} until {self.deadline:.3f}>"

    def check(self, what: str) -> None:
        """Raise LeaseExpired unless the operation may still start ``what``."""
        if self.lost is not None:
            raise exception.LeaseExpired(", ".join(self.names), what, self.lost)
        left = self.deadline - now()
        if left <= 0:
            raise exception.LeaseExpired(
                ", ".join(self.names),
                what,
                f"its lease ran out {-left:.2f} s ago (no confirmed renewal since)",
            )

    def begin(self, senders: tuple[Callable[..., Any], Callable[..., Any]]) -> str:
        token = secrets.token_hex(8)
        with self._lock:
            self._inflight[token] = senders
        return token

    def end(self, token: str) -> None:
        with self._lock:
            self._inflight.pop(token, None)

    def moved(self, deadline: float) -> None:
        """The locks' leases were renewed: let running calls go on until ``deadline``."""
        with self._lock:
            if self.lost is not None or deadline <= self.deadline:
                return
            self.deadline = deadline
            calls = list(self._inflight.items())
        for token, (extend_call, _abort_call) in calls:
            with contextlib.suppress(Exception):
                extend_call(token, deadline)

    def lose(self, reason: str) -> None:
        """A lock was lost: refuse every further step, end running ones."""
        with self._lock:
            if self.lost is not None:
                return
            self.lost = reason
            calls = list(self._inflight.items())
        for token, (_extend_call, abort_call) in calls:
            with contextlib.suppress(Exception):
                abort_call(token)


_current: contextvars.ContextVar[Fence | None] = contextvars.ContextVar(
    "remotefs_aa_fence", default=None
)


def current() -> Fence | None:
    """The fence of the locked operation this code runs in, if any."""
    return _current.get()


@contextlib.contextmanager
def active(fence: Fence) -> Iterator[Fence]:
    """Run a block as part of ``fence``'s operation (nested fences: the inner one wins)."""
    token = _current.set(fence)
    try:
        yield fence
    finally:
        _current.reset(token)


# -- the daemon's side ----------------------------------------------------------

_running_lock = threading.Lock()
#: token -> deadline (``-inf`` once aborted), for fenced calls running here.
RUNNING: dict[str, float] = {}
_local = threading.local()


@contextlib.contextmanager
def enforced(token: str, deadline: float, what: str) -> Iterator[None]:
    """Run one fenced step here: refuse it after ``deadline``; let runner watch it."""
    left = deadline - now()
    if left <= 0:
        raise exception.LeaseExpired(
            token, what, f"the lease ran out {-left:.2f} s before the step could start"
        )
    with _running_lock:
        RUNNING[token] = max(deadline, RUNNING.get(token, -math.inf))
    previous = getattr(_local, "token", None)
    _local.token = token
    try:
        yield
    finally:
        _local.token = previous
        with _running_lock:
            RUNNING.pop(token, None)


def running_deadline() -> tuple[str, float] | None:
    """(token, deadline) of the fenced step this thread runs, if any."""
    token = getattr(_local, "token", None)
    if token is None:
        return None
    with _running_lock:
        return token, RUNNING.get(token, -math.inf)


def extend(token: str, deadline: float) -> bool:
    """Move a running step's deadline (never back); False if it is not running."""
    with _running_lock:
        if token not in RUNNING:
            return False
        RUNNING[token] = max(RUNNING[token], float(deadline))
        return True


def abort(token: str) -> bool:
    """End a running step as soon as its runner looks; False if it is not running."""
    with _running_lock:
        if token not in RUNNING:
            return False
        RUNNING[token] = -math.inf
        return True
