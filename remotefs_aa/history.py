"""The history of a front-door workload: what each process did, when, and what it produced.

The concurrency tests, the demo and the two-host benchmark call the driver the
way a volume service does, through its public, decorated methods, and take no
lock of their own. So nothing on the test side knows the order in which the
driver's locks let the operations through. This module records what is needed
to find that order afterwards (:mod:`remotefs_aa.checker` does): every process
appends one JSON-lines file, one ``start`` line before each call (flushed, so
the ids an operation may create are announced even if the process dies
during the call) and one ``end`` line after it::

    {"event": "end", "host": "host-a", "pid": 4711, "worker": 1, "seq": 17,
     "kind": "create_snapshot", "volume": "<id>", "snapshot": "<id>", "size": 1,
     "start": 812.214, "end": 812.275, "result": "ok", "generation": 9,
     "published": [["<id>", 9, "snapshot <id>"]], "noop": false, "recovered": [],
     "swept": [], "lock_wait": 0.012}

``kind`` is the driver method's name (``create_snapshot``, ``delete_snapshot``,
``revert_to_snapshot``, ``create_cloned_volume``, ``create_volume_from_snapshot``,
``extend_volume``, ``create_volume``, ``delete_volume``, ``copy_image_to_volume``)
or ``write``, a guest write (``region``, ``pattern``, and ``image``: the file the
write resolved as the active image). ``volume`` is the volume the call works on
(the source of a clone, the snapshot's volume for ``create_volume_from_snapshot``),
``new_volume`` the one it creates. ``start`` and ``end`` are ``time.monotonic()``
taken just around the call (lock waits included): processes in one host's
namespaces share CLOCK_MONOTONIC, so records of the two-host tests (network
namespaces on one machine) compare directly; hosts on different machines would
need a common clock. ``result`` is ``ok`` or ``error`` with ``error: {"class",
"message"}``.

What the call produced is read from the driver's own log records for that call
in that thread (:class:`LogCapture`), so the driver's return values stay
Cinder's:

* ``published``: every ``.info`` generation the call published, on any volume,
  with what it is: ``[volume, generation, label]``, the label being
  ``create``, ``snapshot <id>``, ``delete <id>``, ``revert <id>``, ``image``
  (claimed just before the image replaces the base), ``intent <op> <id>``,
  ``claim <step> of <op> <id>``, ``claim extend`` or ``claim delete_volume``
  (the chain logs ``volume %s: published generation %d (%s)`` for each). Failed
  calls publish too (an intent, a claim), and so do recoveries: the checker
  credits every generation of every chain to exactly one call.
* ``generation``: the generation a snapshot create or delete logged at INFO
  (``... generation %d``), kept for the operator's log and the reports.
* ``noop``: the chain said the snapshot to delete was already gone (no write).
* ``recovered``: intents of interrupted operations this call finished on the
  way (``finishing interrupted ... generation %d``: the intent's generation),
  with the volume they belong to: a failed snapshot delete is finished by the
  next operation on that volume (whose ``published`` then holds the rest of
  the interrupted operation's generations).
* ``swept``: overlays removed as orphans (an interrupted snapshot create).
* ``lock_wait``: the seconds the driver's ``synchronized`` waited for its locks.
* ``held_from``, ``held_until``: monotonic times taken when the guard logged
  that it had the locks and that it had released them. The decorated body ran
  in between, so every chain change of the call did; the checker uses this
  narrower interval (a call that waited long for its lock is otherwise
  "concurrent" with everything that happened while it waited).

The recognisers match the messages' templates, not their text, in one place
(:func:`_absorb`); if a message changes, the checker reports missing
generations instead of passing silently.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from oslo_utils import units

#: One guest write of the workload: one qcow2 cluster, so a write allocates exactly one.
REGION = 64 * 1024
#: Regions of the smallest volume (1 GiB): writes stay below, so every view has them.
MAX_REGIONS = units.Gi // REGION


def pattern_of(region: int) -> int:
    """The byte a region is filled with (never 0: zeros mean "not written")."""
    return 1 + (region * 113) % 255


#: Where the facts come from: the driver, the chain module, the lock guard.
DRIVER_LOGGERS = "remotefs_aa.drivers"
CHAIN_LOGGER = "remotefs_aa.image.chain"
GUARD_LOGGER = "remotefs_aa.coordination.guard"

#: Why a call may fail without anything being wrong: the caller's view was
#: stale (another process changed the volume first) or a guest held the image.
#: The checker verifies each such refusal against the history.
REFUSALS = ("snapshot-gone", "not-latest", "stale-size", "volume-gone", "image-in-use")


def refusal(error_class: str, message: str) -> str | None:
    """The refusal reason for a failed call, or None for an unexpected error.

    The messages matched here are the driver's and the chain's (one place to
    change if they do). ``image-in-use``: qemu's image lock ("Failed to get
    ... lock"), held by a guest write to the same image; a hypervisor holding
    a volume makes offline chain steps fail just so.
    """
    if error_class == "SnapshotNotFound":
        return "snapshot-gone"
    if error_class == "InvalidSnapshot" and "latest" in message:
        return "not-latest"
    if error_class == "InvalidImage" and "exceeds the volume size" in message:
        return "stale-size"
    if error_class == "VolumeError" and "cannot shrink" in message:
        return "stale-size"
    if error_class == "VolumeNotFound" or (
        error_class == "InvalidImage" and "image is missing" in message
    ):
        return "volume-gone"
    if (
        error_class == "PrivilegedCommandFailed"
        and "lock" in message
        and "Failed to get" in message
    ):
        return "image-in-use"
    return None


@dataclasses.dataclass
class Facts:
    """What the driver's log records said about one call."""

    generation: int | None = None
    #: Every generation the call published, with what it is (the chain's
    #: ``volume %s: published generation %d (%s)``):
    #: ``[[volume, generation, label], ...]``.
    published: list[list] = dataclasses.field(default_factory=list)
    noop: bool = False
    recovered: list[dict] = dataclasses.field(default_factory=list)
    swept: list[str] = dataclasses.field(default_factory=list)
    lock_wait: float | None = None
    held_from: float | None = None
    held_until: float | None = None


def _absorb(facts: Facts, record: logging.LogRecord) -> None:
    """Fold one log record of the current call into ``facts``."""
    msg = record.msg if isinstance(record.msg, str) else ""
    args = record.args if isinstance(record.args, tuple) else ()
    name = record.name
    try:
        if name == CHAIN_LOGGER and "published generation %d" in msg and len(args) >= 3:
            facts.published.append([str(args[0]), int(args[1]), str(args[2])])
        elif name.startswith(DRIVER_LOGGERS) and "generation %d" in msg and args:
            facts.generation = int(args[-1])
        elif name == CHAIN_LOGGER and "already gone" in msg:
            facts.noop = True
        elif name == CHAIN_LOGGER and "finishing interrupted" in msg and len(args) >= 4:
            intent = args[2] if isinstance(args[2], dict) else {}
            facts.recovered.append(
                {
                    "volume": str(args[0]),
                    "op": str(args[1]),
                    "snapshot": intent.get("snapshot"),
                    "generation": int(args[3]),
                }
            )
        elif name == CHAIN_LOGGER and "removing orphan" in msg and len(args) >= 2:
            facts.swept.append(str(args[1]))
        elif name == GUARD_LOGGER and "acquired locks" in msg and "waited" in msg and args:
            facts.lock_wait = (facts.lock_wait or 0.0) + float(args[-1])
            if facts.held_from is None:
                facts.held_from = time.monotonic()
        elif name == GUARD_LOGGER and "released locks" in msg:
            facts.held_until = time.monotonic()
    except (TypeError, ValueError):
        pass  # a record of another shape: not one of ours


class _Collector(logging.Handler):
    """Hands each record to the facts of the call running in the logging thread."""

    def __init__(self, local: threading.local) -> None:
        super().__init__(logging.DEBUG)
        self.local = local

    def emit(self, record: logging.LogRecord) -> None:
        facts = getattr(self.local, "facts", None)
        if facts is not None:
            _absorb(facts, record)


class _Forward(logging.Handler):
    """Passes records on to the parent logger's handlers from ``level`` up.

    The captured loggers are turned up to INFO/DEBUG so their records exist at
    all; this keeps what the process prints exactly as it was configured.
    """

    def __init__(self, logger: logging.Logger, level: int) -> None:
        super().__init__(level)
        self.logger = logger

    def emit(self, record: logging.LogRecord) -> None:
        # The parent as it is now: logging re-links parents as loggers appear.
        parent = self.logger.parent
        if parent is not None:
            parent.handle(record)


class LogCapture:
    """Captures the driver's log records of each call, per thread, while installed."""

    LEVELS = {
        DRIVER_LOGGERS: logging.INFO,
        CHAIN_LOGGER: logging.DEBUG,
        GUARD_LOGGER: logging.DEBUG,
    }

    def __init__(self) -> None:
        self.local = threading.local()
        self.collector = _Collector(self.local)
        self._saved: list[tuple[logging.Logger, int, bool, logging.Handler]] = []

    def install(self) -> None:
        for name, wanted in self.LEVELS.items():
            logger = logging.getLogger(name)
            before = logger.getEffectiveLevel()
            forward = _Forward(logger, before)
            self._saved.append((logger, logger.level, logger.propagate, forward))
            logger.setLevel(min(before, wanted))
            logger.propagate = False
            logger.addHandler(self.collector)
            logger.addHandler(forward)

    def uninstall(self) -> None:
        for logger, level, propagate, forward in self._saved:
            logger.removeHandler(self.collector)
            logger.removeHandler(forward)
            logger.setLevel(level)
            logger.propagate = propagate
        self._saved = []

    @contextlib.contextmanager
    def call(self) -> Iterator[Facts]:
        """The facts of the driver call made inside this block, in this thread."""
        facts = Facts()
        previous = getattr(self.local, "facts", None)
        self.local.facts = facts
        try:
            yield facts
        finally:
            self.local.facts = previous


@contextlib.contextmanager
def capturing() -> Iterator[LogCapture]:
    """A :class:`LogCapture`, installed for the block."""
    capture = LogCapture()
    capture.install()
    try:
        yield capture
    finally:
        capture.uninstall()


@dataclasses.dataclass
class Outcome:
    """One recorded call: its return value or exception, and its ``end`` record."""

    record: dict
    value: Any = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def refusal(self) -> str | None:
        return None if self.ok else self.record.get("refusal")


class Recorder:
    """Appends this process's history file and runs calls under the log capture."""

    def __init__(
        self, path: str, capture: LogCapture | None, worker: int, host: str | None = None
    ) -> None:
        self.path = path
        self.capture = capture
        self.worker = worker
        self.host = host or socket.gethostname()
        self.pid = os.getpid()
        self.seq = 0
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._file = open(path, "a", buffering=1)  # closed in close()

    def close(self) -> None:
        self._file.close()

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()

    def note(self, kind: str, **fields: Any) -> None:
        """A record that is not a call (e.g. the content of a prepared image)."""
        self.seq += 1
        self._write(
            {
                "event": "note",
                "host": self.host,
                "pid": self.pid,
                "worker": self.worker,
                "seq": self.seq,
                "kind": kind,
                **fields,
            }
        )

    def call(
        self,
        kind: str,
        fn: Callable[..., Any],
        *args: Any,
        fields: dict[str, Any],
        extra: dict[str, Any] | None = None,
    ) -> Outcome:
        """Run ``fn(*args)`` and record it; exceptions are returned, not raised.

        ``fields`` go into both records (the ids: announced before the call);
        ``extra`` is a dict ``fn`` may fill, added to the ``end`` record. A
        model update's ``provider_location`` is recorded as ``share``.
        """
        self.seq += 1
        head = {
            "host": self.host,
            "pid": self.pid,
            "worker": self.worker,
            "seq": self.seq,
            "kind": kind,
            **fields,
        }
        self._write({"event": "start", **head, "t": time.monotonic()})
        value: Any = None
        error: BaseException | None = None
        facts_cm = self.capture.call() if self.capture else contextlib.nullcontext(Facts())
        with facts_cm as facts:
            start = time.monotonic()
            try:
                value = fn(*args)
            except Exception as exc:  # recorded: a failure is a fact of the history
                error = exc
            end = time.monotonic()
        record = {"event": "end", **head, **(extra or {}), "start": start, "end": end}
        if error is None:
            record["result"] = "ok"
            if isinstance(value, dict) and value.get("provider_location"):
                record["share"] = value["provider_location"]
        else:
            cls, msg = type(error).__name__, str(error)
            record["result"] = "error"
            record["error"] = {"class": cls, "message": msg}
            record["refusal"] = refusal(cls, msg)
        record.update(
            generation=facts.generation,
            published=facts.published,
            noop=facts.noop,
            recovered=facts.recovered,
            swept=facts.swept,
            lock_wait=facts.lock_wait,
            held_from=facts.held_from,
            held_until=facts.held_until,
        )
        self._write(record)
        return Outcome(record, value, error)


def load(directory: str) -> tuple[list[dict], list[dict]]:
    """Every ``end`` and ``note`` record under ``directory``, and calls that never ended.

    Records are returned in file order per process; the checker sorts.
    """
    ended: list[dict] = []
    starts: dict[tuple, dict] = {}
    names = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    for name in names:
        if not name.endswith(".jsonl"):
            continue
        with open(os.path.join(directory, name)) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a killed process
                key = (record.get("host"), record.get("pid"), record.get("seq"))
                if record.get("event") == "start":
                    starts[key] = record
                else:
                    starts.pop(key, None)
                    ended.append(record)
    return ended, list(starts.values())
