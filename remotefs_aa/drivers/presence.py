"""Who works on a share, and whether they all take their locks from the same place.

Two services on one share with locks that do not exclude each other (host-
local file locks on two hosts, two different Redis servers, a typo in one
``backend_url``) break chains within seconds, and nothing on the share used
to say so. Each service therefore

* holds a *presence lock* (``remotefs_aa-presence-<host>-<pid>-<n>``) for as
  long as it runs, from its own lock provider;
* records itself on each share: ``.remotefs_aa/services/<host>-<pid>.json``
  (host, pid, lock backend as configured, presence lock, updated at), written
  at start and refreshed every ``PRESENCE_INTERVAL`` seconds, removed at stop;
* at start, for every other service recorded as live, tries that service's
  presence lock without waiting. With a lock backend the two share, the lock
  is busy; if it can be taken, the other service's locks do not exclude ours,
  and this service refuses to start, naming both.

A record counts as live if refreshed within ``3 * PRESENCE_INTERVAL`` (by the
recording host's clock: hosts are assumed to keep time within seconds); a
record of this host whose process is gone is stale and removed.

A presence lock can lapse like any lock on a lease (the service was paused
past its lease, cut off, the backend restarted). The service then takes it
back as soon as its provider says it was lost (checked every
``WATCH_INTERVAL``), and a newcomer that finds a live record's lock free tries
again for ``PROBE_WINDOW`` seconds before it concludes that the locks do not
exclude each other: a lapse is a moment, separate lock backends are for good.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from remotefs_aa import coordination, exception

LOG = logging.getLogger(__name__)

DIRECTORY = ".remotefs_aa/services"
#: Seconds between refreshes of this service's record.
PRESENCE_INTERVAL = 20.0
LIVE_FOR = 3 * PRESENCE_INTERVAL
#: Seconds between checks that this service still holds its presence lock.
WATCH_INTERVAL = 1.0
#: Seconds a newcomer keeps probing a free presence lock before it refuses to
#: start (the other service may be taking back a lock that just lapsed).
PROBE_WINDOW = 6.0
PROBE_INTERVAL = 0.5


class Presence:
    """This service's presence: its lock, its records on the shares, the checks."""

    def __init__(self, host: str, io: Any) -> None:
        self.host = host
        self.io = io
        self.pid = os.getpid()
        self.lock_name = f"presence-{host}-{self.pid}-{uuid.uuid4().hex[:6]}"
        self._lock: coordination.Lock | None = None
        self._shares: dict[str, str] = {}  # share -> its directory
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def record_name(self) -> str:
        return f"{self.host}-{self.pid}.json"

    def _record(self) -> dict:
        provider = coordination.get_provider()
        return {
            "host": self.host,
            "node": socket.gethostname(),
            "pid": self.pid,
            "lock_backend": provider.describe(),
            "spans_hosts": provider.spans_hosts,
            "presence_lock": coordination.LOCK_PREFIX + self.lock_name,
            "updated": time.time(),
        }

    def join(self, share: str, directory: str) -> None:
        """Check the share's other services, then record this one there."""
        if self._lock is None:
            lock = coordination.get_provider().get_lock(
                coordination.lock_names([self.lock_name])[0]
            )
            if not lock.acquire(blocking=False):
                raise exception.LockBusy(lock.name, "this service's presence lock is taken")
            self._lock = lock
        folder = os.path.join(directory, DIRECTORY)
        from remotefs_aa.privsep import files

        files.make_directory(folder, 0o755)
        for other in self.others(folder):
            self._check_shares_locks_with(share, other)
        self._write(folder)
        self._shares[share] = folder
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._refresh_loop, name="remotefs_aa-presence", daemon=True
            )
            self._thread.start()

    def others(self, folder: str) -> list[dict]:
        """The live records of other services in ``folder`` (stale ones of this node dropped)."""
        found = []
        for name in sorted(self.io.list_directory(folder)):
            if not name.endswith(".json") or name == self.record_name():
                continue
            path = os.path.join(folder, name)
            text = self.io.read_text(path)
            try:
                record = json.loads(text or "")
            except ValueError:
                continue
            if not isinstance(record, dict):
                continue
            age = time.time() - float(record.get("updated", 0))
            if record.get("node") == socket.gethostname() and record.get("pid") == self.pid:
                continue  # this process (another driver of it): one provider, one set of locks
            if record.get("node") == socket.gethostname() and not _alive(record.get("pid")):
                with contextlib.suppress(exception.RemoteFSAAError, OSError):
                    self.io.unlink(path)  # this node's, and its process is gone
                continue
            if age <= LIVE_FOR:
                found.append({**record, "age": age, "record": name})
        return found

    def _check_shares_locks_with(self, share: str, other: dict) -> None:
        name = str(other.get("presence_lock", ""))
        give_up = time.monotonic() + PROBE_WINDOW
        while True:
            try:
                probe = coordination.get_provider().get_lock(name)
                free = probe.acquire(blocking=False)
            except exception.LockError as exc:
                LOG.warning("share %s: could not probe %s of %s: %s", share, name, other, exc)
                return
            if not free:
                return  # busy: the other service's locks are ours too
            with contextlib.suppress(exception.RemoteFSAAError):
                probe.release()
                coordination.get_provider().clean(name)  # file backends: no file left behind
            if time.monotonic() >= give_up:
                break
            LOG.info(
                "share %s: presence lock %s of the service on host %s is free; trying again "
                "for up to %.0f s (it may be taking back a lock that lapsed)",
                share,
                name,
                other.get("host"),
                give_up - time.monotonic(),
            )
            time.sleep(PROBE_INTERVAL)
        provider = coordination.get_provider()
        raise exception.HostLocalLockProvider(
            f"share {share} is in use by the service on host {other.get('host')} "
            f"(node {other.get('node')}, pid {other.get('pid')}, lock backend "
            f"{other.get('lock_backend')}, seen {other.get('age', 0):.0f} s ago), whose locks "
            f"do not exclude this service's ({provider.describe()} here): its presence lock "
            f"{name} could be taken, again and again for {PROBE_WINDOW:.0f} s. Two services "
            f"with separate locks on one share corrupt snapshot chains. Give both the same "
            f"shared lock backend ([coordination] backend_url). If they do share it, that "
            f"service is cut off from it or paused: start this one once it is back. If "
            f"that service is gone, wait {LIVE_FOR:.0f} s or remove "
            f"{DIRECTORY}/{other.get('record')} on the share"
        )

    def _write(self, folder: str) -> None:
        from remotefs_aa.privsep import files

        files.write_file_atomic(
            os.path.join(folder, self.record_name()), json.dumps(self._record()) + "\n", 0o644
        )

    def _refresh_loop(self) -> None:
        """Take the presence lock back when it lapsed; refresh the records now and then."""
        next_write = time.monotonic() + PRESENCE_INTERVAL
        while not self._stop.wait(WATCH_INTERVAL):
            self._keep_lock()
            if time.monotonic() < next_write:
                continue
            next_write = time.monotonic() + PRESENCE_INTERVAL
            for share, folder in list(self._shares.items()):
                try:
                    self._write(folder)
                except Exception as exc:  # a share briefly unreachable: try next time
                    LOG.warning("share %s: could not refresh this service's record: %s", share, exc)

    def _keep_lock(self) -> None:
        lock = self._lock
        if lock is None or lock.lost_reason is None:
            return
        LOG.warning(
            "presence lock %s lapsed (%s); taking it back, or services starting on this "
            "service's shares would refuse to",
            lock.name,
            lock.lost_reason,
        )
        with contextlib.suppress(Exception):
            lock.release()  # ours no more: the backend may say so
        try:
            again = coordination.get_provider().get_lock(lock.name)
            if again.acquire(blocking=False):
                self._lock = again
                LOG.info("presence lock %s: held again", lock.name)
            else:
                LOG.warning("presence lock %s is busy (a newcomer's probe?): next try", lock.name)
        except Exception as exc:
            LOG.warning("presence lock %s: could not take it back yet: %s", lock.name, exc)

    def leave(self) -> None:
        """Remove this service's records and give up its presence lock."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            # A refresh taking the lock back right now would hold it after us.
            thread.join(2 * WATCH_INTERVAL)
        for folder in self._shares.values():
            with contextlib.suppress(Exception):
                self.io.unlink(os.path.join(folder, self.record_name()))
        self._shares.clear()
        if self._lock is not None:
            with contextlib.suppress(Exception):
                self._lock.release()
                coordination.get_provider().clean(self._lock.name)
            self._lock = None


def _alive(pid: object) -> bool:
    try:
        os.kill(int(pid), 0)  # type: ignore[arg-type]
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    return True
