"""A random workload through the driver's front door, with a history to check it against.

Used by ``remotefs-aa demo`` (the main job), the concurrency tests and the
two-host tests: several processes, each with its own driver, privileged daemon
and lock connection, run random operations on the same volumes, and afterwards
:func:`verify` proves that every chain is intact and every byte is where the
history says it should be.

Through the front door
    Workers call only the driver's public, decorated methods, as a volume
    service does: ``create_snapshot``, ``delete_snapshot``, ``revert_to_snapshot``,
    ``create_cloned_volume``, ``create_volume_from_snapshot``, ``extend_volume``,
    ``create_volume`` (half of them followed by ``copy_image_to_volume``) and
    ``delete_volume``. They take no lock of their own: the driver's
    ``synchronized`` is all that stands between them, so a provider that locks
    nothing (tests/functional/nolock.py) or a method that lost its decorator
    shows in the results. What a worker knows about a volume when it picks an
    operation (its snapshots, from ``verify_volume(deep=False)``, a lock-free
    read; its size and the volumes that exist, from a catalog file the creators
    write) may be stale by the time the call runs, as in a real deployment:
    the driver then refuses (the snapshot is gone, it is no longer the latest,
    the volume has grown or was deleted), and the checker verifies that each
    such refusal had a cause in the history and changed nothing.

The history (remotefs_aa.history)
    Each process appends a JSON-lines file: for every call its kind, the ids,
    the monotonic start and end, the result, and what the driver's own log
    records said it produced (the ``.info`` generation, intents it finished,
    the lock wait). The checker (remotefs_aa.checker) replays the successful
    calls of all processes in generation order per volume and compares the
    model with every chain and every byte.

Guest writes, without locks, and still a deterministic model
    Each volume has one guest, like one VM per volume: the worker that owns it
    (shared volume ``i`` belongs to worker ``i % workers``, a derived volume to
    its creator) writes, at the start of each of its steps, one 64 KiB region
    of one of its volumes through ``remotefs_aa.privsep.qemu.write_pattern`` into
    the file ``initialize_connection`` names as the active image, as a
    hypervisor would, while the other workers change the chains. Three rules
    make the outcome predictable:

    * every write goes to a *fresh* region: region numbers are unique across
      the whole run (worker ``w`` of ``n`` uses ``1024 + w + n*k``), so a region
      is written once in the lineage of every volume and its pattern (a
      function of the region) can only be where that one write put it;
    * the write's start and end are in the history; a write that ended before
      a chain change started (snapshot create, delete, revert, a recovery) is
      in the image that change saw, one that started after it ended is not;
    * a write whose interval overlaps chain changes of its volume (their
      lock-held intervals) may have landed in the image active before or after
      each of them (the name was resolved before, the data written after). For
      exactly that region the checker then accepts both outcomes (all the
      pattern, or all zeros) in the snapshots those changes created and in a
      clone read meanwhile. A snapshot create never loses a write, so the
      active image must hold it afterwards; only if a delete or revert
      overlapped it (the commit may have copied the file before the write
      landed, the revert discards the image) is the active image, and whatever
      copies it later, accepted either way too. Everything else stays exact: a
      snapshot taken before the write started must read zeros there, one taken
      after it ended its pattern.

    A write that fails (qemu's image lock: a driver step such as ``qemu-img
    commit`` or ``convert`` held the image) is ambiguous in the same way; so is
    a driver step that fails on that lock because the guest held the image (it
    is retried a few times, each attempt recorded). The same lock is why
    only one guest writes each volume: two writers on one image fail each
    other, which says nothing about the driver.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import time
from collections.abc import Callable
from typing import Any

from remotefs_aa import history
from remotefs_aa.history import MAX_REGIONS, REGION, Outcome, Recorder, pattern_of
from remotefs_aa.image.store import DirectoryImageService
from remotefs_aa.objects import Snapshot, Volume

LOG = logging.getLogger(__name__)

#: Regions below this are written by ``prepare`` (the shared volumes, the image).
#: Each worker of ``n`` gets (MAX_REGIONS - RESERVED_REGIONS) / n writes; then its
#: guest stops writing (the operations go on).
RESERVED_REGIONS = 1024
IMAGE_REGIONS = 3
#: Shared volumes ``prepare`` can make: one reserved region each, besides the image's.
MAX_SHARED = RESERVED_REGIONS - IMAGE_REGIONS
IMAGE_ID = "workload-image"
IMAGE_SIZE = 64 * 1024 * 1024

WEIGHTS = {
    "create_snapshot": 4.0,
    "delete_snapshot": 3.0,
    "revert_to_snapshot": 1.0,
    "create_cloned_volume": 1.0,
    "create_volume_from_snapshot": 1.0,
    "extend_volume": 0.3,
    "delete_volume": 0.7,
    "create_volume": 0.5,
}
CREATING = ("create_cloned_volume", "create_volume_from_snapshot", "create_volume")
#: Volumes grow to at most this many GiB (extend is +1 GiB).
MAX_SIZE = 3
#: At most this many derived volumes live at once (more: delete one instead).
MAX_DERIVED = 6
#: How often a step works on a derived volume rather than a shared one.
DERIVED_SHARE = 0.3
#: Pauses before retrying a step a guest's image lock refused.
RETRY_PAUSES = (0.02, 0.05, 0.1, 0.2, 0.4)


class Workspace:
    """The workload's directory: histories, the catalog of volumes, the image store.

    Every process of a run (both "hosts" of the two-host tests too) uses the
    same directory on the local machine.
    """

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.history = os.path.join(self.root, "history")
        self.catalog = os.path.join(self.root, "catalog")
        self.images = os.path.join(self.root, "images")

    def make(self) -> Workspace:
        for d in (self.history, self.catalog, self.images):
            os.makedirs(d, exist_ok=True)
        return self

    def history_file(self, name: str) -> str:
        return os.path.join(self.history, f"{name}.jsonl")

    def recorder(
        self, capture: history.LogCapture | None, worker: int, host: str | None = None
    ) -> Recorder:
        host = host or socket.gethostname()
        return Recorder(self.history_file(f"{host}-{os.getpid()}"), capture, worker, host)

    # -- the catalog: what a volume service's database would know -----------

    def publish(self, entry: dict) -> None:
        """Add or update a volume's catalog entry (atomic; last writer wins)."""
        path = os.path.join(self.catalog, f"{entry['id']}.json")
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(entry, f)
        os.replace(tmp, path)

    def withdraw(self, volume_id: str) -> None:
        try:
            os.unlink(os.path.join(self.catalog, f"{volume_id}.json"))
        except FileNotFoundError:
            pass

    def entries(self) -> list[dict]:
        """The catalog, sorted by id (entries that vanish while read are skipped)."""
        out = []
        for name in sorted(os.listdir(self.catalog)):
            if not name.endswith(".json"):
                continue
            try:
                with open(os.path.join(self.catalog, name)) as f:
                    out.append(json.load(f))
            except (FileNotFoundError, ValueError):
                continue
        return out


def _volume(entry: dict, size: int | None = None) -> Volume:
    return Volume(
        id=entry["id"],
        size=entry["size"] if size is None else size,
        provider_location=entry["share"],
    )


def _guest_write(driver: Any, volume: Volume, region: int, extra: dict) -> None:
    """Write ``region`` of the volume's active image, as a hypervisor would (no lock)."""
    from remotefs_aa.privsep import qemu

    info = driver.initialize_connection(volume, {})["data"]
    extra["image"] = info["name"]
    path = os.path.join(driver.share_path(info["export"]), info["name"])
    qemu.write_pattern(path, info["format"], region * REGION, REGION, pattern_of(region))


def prepare(driver: Any, workspace: Workspace, count: int, size: int = 1) -> list[str]:
    """Create ``count`` shared volumes (through the driver) with one region each; their ids.

    Also writes the raw image ``copy_image_to_volume`` copies in (three regions
    of its own), and records all of it in this process's history.
    """
    if not 1 <= count <= MAX_SHARED:
        raise ValueError(f"prepare makes 1 to {MAX_SHARED} shared volumes, not {count}")
    workspace.make()
    ids = []
    # Captured like every other call: the checker credits each volume's first
    # generation to the create that published it.
    with history.capturing() as capture:
        rec = workspace.recorder(capture, worker=-1)
        try:
            for i in range(count):
                vol = Volume(size=size)
                done = rec.call("create_volume", driver.create_volume, vol, fields=_new(vol, size))
                if not done.ok:
                    raise done.error  # type: ignore[misc]
                vol.provider_location = done.value["provider_location"]
                workspace.publish(
                    {
                        "id": vol.id,
                        "share": vol.provider_location,
                        "size": size,
                        "shared": True,
                        "slot": i,
                    }
                )
                extra: dict = {}
                wrote = rec.call(
                    "write",
                    _guest_write,
                    driver,
                    vol,
                    i,
                    extra,
                    fields={"volume": vol.id, "region": i, "pattern": pattern_of(i)},
                    extra=extra,
                )
                if not wrote.ok:
                    raise wrote.error  # type: ignore[misc]
                ids.append(vol.id)
            regions = [count + j for j in range(IMAGE_REGIONS)]
            path = os.path.join(workspace.images, IMAGE_ID)
            with open(path, "wb") as f:
                f.truncate(IMAGE_SIZE)
                for r in regions:
                    f.seek(r * REGION)
                    f.write(bytes([pattern_of(r)]) * REGION)
            with open(path + ".json", "w") as f:
                json.dump({"disk_format": "raw"}, f)
            rec.note("image", image=IMAGE_ID, size=IMAGE_SIZE, regions=regions)
        finally:
            rec.close()
    return ids


def _new(volume: Volume, size: int) -> dict:
    return {"new_volume": volume.id, "size": size}


class Worker:
    """One process's share of the workload (see the module docstring)."""

    def __init__(
        self,
        driver: Any,
        workspace: Workspace,
        recorder: Recorder,
        index: int,
        workers: int,
        seed: int,
    ) -> None:
        self.driver = driver
        self.ws = workspace
        self.rec = recorder
        self.index = index
        self.workers = max(1, workers)
        self.rng = random.Random(seed)
        self.images = DirectoryImageService(workspace.images)
        self.counts: dict[str, int] = {}
        self.ok: dict[str, int] = {}
        self.refused: dict[str, int] = {}
        self.errors: list[str] = []
        self.lock_waits: list[float] = []
        self.writes = {"ok": 0, "failed": 0}
        self._next_write = 0

    # -- what this worker believes ------------------------------------------

    def _owner(self, entry: dict) -> int:
        return entry.get("slot", 0) % self.workers

    def _snapshots(self, entry: dict) -> list[str] | None:
        """The volume's snapshots, oldest first, from a lock-free read (None: unreadable)."""
        try:
            report = self.driver.verify_volume(_volume(entry, size=0), deep=False)
        except Exception:  # a view is a hint; the call itself will tell
            return None
        chain = report.get("chain")
        if chain is None:
            return None
        by_file = {f: s for s, f in report.get("snapshots", {}).items()}
        return [by_file[name] for name in reversed(chain) if name in by_file]

    # -- one step ---------------------------------------------------------------

    def step(self) -> str:
        """One guest write (if this worker owns a volume), then one random operation."""
        entries = self.ws.entries()
        self._write_one(entries)
        kind = self._run_one(entries)
        self.counts[kind] = self.counts.get(kind, 0) + 1
        return kind

    def _write_one(self, entries: list[dict]) -> None:
        mine = [e for e in entries if self._owner(e) == self.index]
        region = RESERVED_REGIONS + self.index + self.workers * self._next_write
        if not mine or region >= MAX_REGIONS:
            return
        self._next_write += 1
        entry = self.rng.choice(mine)
        extra: dict = {}
        done = self.rec.call(
            "write",
            _guest_write,
            self.driver,
            _volume(entry),
            region,
            extra,
            fields={"volume": entry["id"], "region": region, "pattern": pattern_of(region)},
            extra=extra,
        )
        self.writes["ok" if done.ok else "failed"] += 1

    def _run_one(self, entries: list[dict]) -> str:
        shared = [e for e in entries if e.get("shared")]
        derived = [e for e in entries if not e.get("shared")]
        if not shared:
            raise RuntimeError(f"no shared volume in the catalog {self.ws.catalog}")
        kind = self.rng.choices(list(WEIGHTS), list(WEIGHTS.values()))[0]
        if kind in CREATING and len(derived) >= MAX_DERIVED:
            kind = "delete_volume"
        if kind == "delete_volume" and not derived:
            kind = "create_cloned_volume"
        if kind == "delete_volume":
            target = self.rng.choice(derived)
        elif derived and self.rng.random() < DERIVED_SHARE:
            target = self.rng.choice(derived)
        else:
            target = self.rng.choice(shared)
        vol = _volume(target)
        snaps: list[str] | None = []
        if kind in ("delete_snapshot", "revert_to_snapshot", "create_volume_from_snapshot"):
            snaps = self._snapshots(target)
            if not snaps:
                kind = "create_snapshot"
        if kind == "extend_volume" and vol.size >= MAX_SIZE:
            kind = "create_snapshot"
        d = self.driver
        if kind == "create_snapshot":
            snap = Snapshot(vol)
            self._call(kind, d.create_snapshot, snap, fields=_on(vol, snapshot=snap.id))
        elif kind == "delete_snapshot":
            snap = Snapshot(vol, id=self.rng.choice(snaps))
            self._call(kind, d.delete_snapshot, snap, fields=_on(vol, snapshot=snap.id))
        elif kind == "revert_to_snapshot":
            snap = Snapshot(vol, id=snaps[-1])
            self._call(
                kind, d.revert_to_snapshot, None, vol, snap, fields=_on(vol, snapshot=snap.id)
            )
        elif kind == "create_cloned_volume":
            new = Volume(size=vol.size)
            done = self._call(kind, d.create_cloned_volume, new, vol, fields=_on(vol, new=new))
            self._publish(done, new)
        elif kind == "create_volume_from_snapshot":
            snap = Snapshot(vol, id=self.rng.choice(snaps))
            new = Volume(size=vol.size)
            done = self._call(
                kind,
                d.create_volume_from_snapshot,
                new,
                snap,
                fields=_on(vol, snapshot=snap.id, new=new),
            )
            self._publish(done, new)
        elif kind == "extend_volume":
            size = vol.size + 1
            done = self._call(kind, d.extend_volume, vol, size, fields=_on(vol, new_size=size))
            if done.ok:
                self.ws.publish({**target, "size": size})
        elif kind == "delete_volume":
            done = self._call(kind, d.delete_volume, vol, fields=_on(vol))
            if done.ok:
                self.ws.withdraw(vol.id)
        elif kind == "create_volume":
            new = Volume(size=1)
            done = self._call(kind, d.create_volume, new, fields=_new(new, 1))
            if done.ok:
                new.provider_location = done.value["provider_location"]
                if self.rng.random() < 0.5:
                    self._call(
                        "copy_image_to_volume",
                        d.copy_image_to_volume,
                        None,
                        new,
                        self.images,
                        IMAGE_ID,
                        fields={"volume": new.id, "size": 1, "image": IMAGE_ID},
                    )
            self._publish(done, new)
        return kind

    def _publish(self, done: Outcome, new: Volume) -> None:
        if done.ok:
            share = done.value["provider_location"]
            self.ws.publish(
                {
                    "id": new.id,
                    "share": share,
                    "size": new.size,
                    "shared": False,
                    "slot": self.index,
                }
            )

    def _call(self, kind: str, fn: Callable, *args: Any, fields: dict) -> Outcome:
        """Call the driver; retry while a guest's image lock refuses; count the outcome."""
        for pause in (*RETRY_PAUSES, None):
            done = self.rec.call(kind, fn, *args, fields=fields)
            if done.record.get("lock_wait") is not None:
                self.lock_waits.append(done.record["lock_wait"])
            if done.refusal != "image-in-use" or pause is None:
                break
            time.sleep(pause)
        if done.ok:
            self.ok[kind] = self.ok.get(kind, 0) + 1
        elif done.refusal:
            self.refused[done.refusal] = self.refused.get(done.refusal, 0) + 1
            LOG.info("workload %s refused (%s): %s", kind, done.refusal, done.error)
        else:
            error = done.record["error"]
            volume = fields.get("volume") or fields.get("new_volume")
            self.errors.append(f"{kind} on {volume}: {error['class']}: {error['message']}")
            LOG.error("workload %s on volume %s failed: %s", kind, volume, done.error)
        return done


def _on(volume: Volume, new: Volume | None = None, **more: Any) -> dict:
    fields = {"volume": volume.id, "size": volume.size, **more}
    if new is not None:
        fields["new_volume"] = new.id
    return fields


def run_worker(
    driver: Any,
    workspace: Workspace,
    index: int,
    workers: int,
    seed: int,
    operations: int | None = None,
    duration: float | None = None,
    progress: Callable[[str], None] | None = None,
    host: str | None = None,
) -> dict:
    """Run steps until ``operations`` or ``duration``; what this worker did and saw."""
    with history.capturing() as capture:
        rec = workspace.recorder(capture, index, host)
        worker = Worker(driver, workspace, rec, index, workers, seed)
        deadline = None if duration is None else time.monotonic() + duration
        done = 0
        try:
            while (operations is None or done < operations) and (
                deadline is None or time.monotonic() < deadline
            ):
                kind = worker.step()
                done += 1
                if progress:
                    progress(kind)
        finally:
            rec.close()
    waits = sorted(worker.lock_waits)
    return {
        "pid": os.getpid(),
        "host": rec.host,
        "index": index,
        "operations": done,
        "counts": worker.counts,
        "ok": worker.ok,
        "refused": worker.refused,
        "errors": worker.errors,
        "writes": worker.writes,
        "lock_wait_max_s": waits[-1] if waits else 0.0,
        "history": rec.path,
    }


def verify(driver: Any, workspace: Workspace, deep: bool = True) -> dict:
    """Replay the history and compare it with every chain and every byte (the checker)."""
    from remotefs_aa import checker

    return checker.check(driver, workspace, deep=deep)


def cleanup(driver: Any, workspace: Workspace) -> None:
    """Delete every volume the history names that still has files on a share (and its locks)."""
    from remotefs_aa import checker

    records, unfinished = history.load(workspace.history)
    ids = checker.volume_ids(records + unfinished)
    for share in driver.shares:
        names = driver.io_for(share).list_directory(driver.share_path(share))
        for volume_id in sorted(ids):
            if checker.files_of(volume_id, names):
                driver.delete_volume(Volume(id=volume_id, provider_location=share))
                driver.clean_volume_file_locks(volume_id)
