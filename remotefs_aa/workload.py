"""A random snapshot workload with a ground-truth registry, and its verification.

Used by ``remotefs-aa demo`` (the main job) and by the concurrency tests: several
processes, each with its own driver, run random operations on the same few
volumes, and afterwards :func:`verify` proves that every chain is intact and
every byte is where it should be.

How the truth is kept: each shared volume has a registry file (JSON, next to
the shares, under ``<state>/workload``) holding the byte pattern its active
image should read in region 0, and the pattern each of its snapshots should
read. A step takes the volume's lock (and the new volume's, for copies)
through ``coordination.locked``, writes the pattern like a guest would,
calls the driver operation *inside* that lock (its undecorated body: the
locks are already held, and they are not re-entrant), and updates the
registry, so registry, chain and data change together. With a provider that
locks nothing, those three drift apart and :func:`verify` says so.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import time
from collections.abc import Callable
from typing import Any

from remotefs_aa import coordination, exception
from remotefs_aa.objects import Snapshot, Volume

LOG = logging.getLogger(__name__)

REGION = 64 * 1024
OPERATIONS = (
    "snapshot_create",
    "snapshot_delete",
    "clone",
    "create_from_snapshot",
    "revert",
)
WEIGHTS = (4, 3, 1, 1, 1)


class PatternIO:
    """Guest-like data access through the privileged daemon (qemu-io)."""

    def __init__(self) -> None:
        from remotefs_aa.privsep import qemu

        self.qemu = qemu

    def write(self, path: str, fmt: str, pattern: int) -> None:
        self.qemu.write_pattern(path, fmt, 0, REGION, pattern)

    def matches(self, path: str, fmt: str, pattern: int) -> bool:
        return self.qemu.pattern_matches(path, fmt, 0, REGION, pattern)


def _raw(method: Callable) -> Callable:
    """The driver method's body without its ``synchronized`` wrapper."""
    return getattr(method, "__wrapped__", method)


@dataclasses.dataclass
class Registry:
    """The truth about one shared volume; stored as JSON, changed under its lock."""

    path: str
    volume_id: str
    size: int
    share: str
    pattern: int
    snapshots: dict[str, int]
    order: list[str]

    @classmethod
    def load(cls, path: str) -> Registry:
        with open(path) as f:
            data = json.load(f)
        return cls(path=path, **data)

    def save(self) -> None:
        data = dataclasses.asdict(self)
        data.pop("path")
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, self.path)

    def volume(self) -> Volume:
        return Volume(id=self.volume_id, size=self.size, provider_location=self.share)


def registry_dir(conf: Any) -> str:
    return os.path.join(conf.state_path, "workload")


def _image(driver: Any, volume: Volume) -> tuple[str, str]:
    info = driver.initialize_connection(volume, {})["data"]
    return os.path.join(driver.share_path(info["export"]), info["name"]), info["format"]


def prepare(driver: Any, conf: Any, count: int, size: int = 1) -> list[str]:
    """Create ``count`` shared volumes with a first pattern; their registry files."""
    directory = registry_dir(conf)
    os.makedirs(directory, exist_ok=True)
    data = PatternIO()
    paths = []
    for _ in range(count):
        vol = Volume(size=size)
        vol.provider_location = driver.create_volume(vol)["provider_location"]
        data.write(*_image(driver, vol), 1)
        reg = Registry(
            os.path.join(directory, f"{vol.id}.json"),
            vol.id,
            size,
            vol.provider_location,
            1,
            {},
            [],
        )
        reg.save()
        paths.append(reg.path)
    return paths


class Worker:
    """One process's share of the workload: random operations on the shared volumes."""

    def __init__(self, driver: Any, registries: list[str], seed: int, derived_dir: str) -> None:
        self.driver = driver
        self.registries = registries
        self.rng = random.Random(seed)
        self.data = PatternIO()
        self.derived_dir = derived_dir
        self.counts: dict[str, int] = {op: 0 for op in OPERATIONS}
        self.errors: list[str] = []
        self.lock_waits: list[float] = []

    def _pattern(self, reg: Registry) -> int:
        used = {reg.pattern, *reg.snapshots.values()}
        while True:
            p = self.rng.randint(2, 255)
            if p not in used:
                return p

    def step(self) -> str:
        """Run one random operation; its name."""
        op = self.rng.choices(OPERATIONS, WEIGHTS)[0]
        path = self.rng.choice(self.registries)
        volume_id = os.path.basename(path)[: -len(".json")]
        new = Volume()
        names = [volume_id, new.id] if op in ("clone", "create_from_snapshot") else [volume_id]
        started = time.monotonic()
        # A volume this step may create: announced first, so that verify can
        # prove a failed copy left none of its files behind.
        pending = os.path.join(self.derived_dir, f"{new.id}.pending")
        if len(names) > 1:
            open(pending, "w").close()
        try:
            with coordination.locked(*names):
                self.lock_waits.append(time.monotonic() - started)
                reg = Registry.load(path)
                getattr(self, "_" + op)(reg, new)
            self.counts[op] += 1
        except Exception as exc:  # every failure is a finding, not a crash of the run
            self.errors.append(f"{op} on {volume_id}: {type(exc).__name__}: {exc}")
            LOG.error("workload %s on volume %s failed: %s", op, volume_id, exc)
        return op

    def _snapshot_create(self, reg: Registry, _new: Volume) -> None:
        vol = reg.volume()
        pattern = self._pattern(reg)
        self.data.write(*_image(self.driver, vol), pattern)
        snap = Snapshot(vol)
        _raw(self.driver.create_snapshot)(self.driver, snap)
        reg.snapshots[snap.id] = pattern
        reg.order.append(snap.id)
        reg.pattern = self._pattern(reg)
        self.data.write(*_image(self.driver, vol), reg.pattern)
        reg.save()

    def _pick_snapshot(self, reg: Registry, latest: bool = False) -> Snapshot | None:
        if not reg.order:
            return None
        snap_id = reg.order[-1] if latest else self.rng.choice(reg.order)
        return Snapshot(reg.volume(), id=snap_id)

    def _snapshot_delete(self, reg: Registry, _new: Volume) -> None:
        snap = self._pick_snapshot(reg)
        if snap is None:
            return self._snapshot_create(reg, _new)
        _raw(self.driver.delete_snapshot)(self.driver, snap)
        del reg.snapshots[snap.id]
        reg.order.remove(snap.id)
        reg.save()

    def _revert(self, reg: Registry, _new: Volume) -> None:
        snap = self._pick_snapshot(reg, latest=True)
        if snap is None:
            return self._snapshot_create(reg, _new)
        _raw(self.driver.revert_to_snapshot)(self.driver, None, reg.volume(), snap)
        reg.pattern = reg.snapshots[snap.id]
        reg.save()

    def _clone(self, reg: Registry, new: Volume) -> None:
        new.size = reg.size
        update = _raw(self.driver.create_cloned_volume)(self.driver, new, reg.volume())
        new.provider_location = update["provider_location"]
        self._record_derived(new, reg.pattern, f"clone of {reg.volume_id}")

    def _create_from_snapshot(self, reg: Registry, new: Volume) -> None:
        snap = self._pick_snapshot(reg)
        if snap is None:
            return self._clone(reg, new)
        new.size = reg.size
        update = _raw(self.driver.create_volume_from_snapshot)(self.driver, new, snap)
        new.provider_location = update["provider_location"]
        self._record_derived(new, reg.snapshots[snap.id], f"from snapshot {snap.id}")

    def _record_derived(self, vol: Volume, pattern: int, what: str) -> None:
        path = os.path.join(self.derived_dir, f"{vol.id}.json")
        with open(path, "w") as f:
            json.dump(
                {
                    "id": vol.id,
                    "size": vol.size,
                    "share": vol.provider_location,
                    "pattern": pattern,
                    "what": what,
                },
                f,
            )
        os.unlink(os.path.join(self.derived_dir, f"{vol.id}.pending"))


def _derived(derived_dir: str) -> list[dict]:
    """The volumes the workers made, as recorded."""
    names = sorted(os.listdir(derived_dir)) if os.path.isdir(derived_dir) else []
    out = []
    for name in names:
        if name.endswith(".json"):
            with open(os.path.join(derived_dir, name)) as f:
                out.append(json.load(f))
    return out


def _failed_copies(driver: Any, derived_dir: str) -> dict[str, list[str]]:
    """Volumes a failed clone or copy meant to create: id -> files of it on any share."""
    names = sorted(os.listdir(derived_dir)) if os.path.isdir(derived_dir) else []
    ids = [n[: -len(".pending")] for n in names if n.endswith(".pending")]
    found: dict[str, list[str]] = {i: [] for i in ids}
    for share in driver.shares if ids else []:
        listing = driver.io.list_directory(driver.share_path(share))
        for volume_id in ids:
            base = f"volume-{volume_id}"
            found[volume_id] += [n for n in listing if n.lstrip(".").startswith(base)]
    return found


def run_worker(
    driver: Any,
    registries: list[str],
    seed: int,
    derived_dir: str,
    operations: int | None = None,
    duration: float | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Run steps until ``operations`` or ``duration`` is reached; counts and errors."""
    worker = Worker(driver, registries, seed, derived_dir)
    deadline = None if duration is None else time.monotonic() + duration
    done = 0
    while (operations is None or done < operations) and (
        deadline is None or time.monotonic() < deadline
    ):
        op = worker.step()
        done += 1
        if progress:
            progress(op)
    waits = sorted(worker.lock_waits)
    return {
        "pid": os.getpid(),
        "operations": done,
        "counts": worker.counts,
        "errors": worker.errors,
        "lock_wait_median_s": waits[len(waits) // 2] if waits else 0.0,
        "lock_wait_max_s": waits[-1] if waits else 0.0,
    }


def verify(driver: Any, registries: list[str], derived_dir: str, deep: bool = True) -> dict:
    """Check every shared and derived volume against the registry; problems listed."""
    data = PatternIO()
    problems: list[str] = []
    checked = {"volumes": 0, "snapshots": 0, "derived": 0, "chain_links": 0}
    for path in registries:
        reg = Registry.load(path)
        vol = reg.volume()
        report = driver.verify_volume(vol, deep=deep)
        problems += [f"volume {vol.id}: {p}" for p in report["problems"]]
        checked["volumes"] += 1
        checked["chain_links"] += len(report.get("chain", []))
        on_disk = set(report.get("snapshots", {}))
        if on_disk != set(reg.snapshots):
            problems.append(
                f"volume {vol.id}: .info has snapshots {sorted(on_disk)}, "
                f"registry {sorted(reg.snapshots)}"
            )
            continue
        if report["problems"]:
            continue
        try:
            if not data.matches(*_image(driver, vol), reg.pattern):
                problems.append(f"volume {vol.id}: active image does not hold {reg.pattern}")
            chain = driver.chain(vol)
            state = chain.load()
            for snap_id, pattern in reg.snapshots.items():
                link = chain.snapshot_image(state, snap_id)
                checked["snapshots"] += 1
                if not data.matches(chain.path(link.name), link.format, pattern):
                    problems.append(f"volume {vol.id}: snapshot {snap_id} does not hold {pattern}")
        except exception.RemoteFSAAError as exc:
            problems.append(f"volume {vol.id}: {exc}")
    for volume_id, left in _failed_copies(driver, derived_dir).items():
        if left:
            problems.append(f"a failed copy to volume {volume_id} left {sorted(left)}")
    for d in _derived(derived_dir):
        vol = Volume(id=d["id"], size=d["size"], provider_location=d["share"])
        checked["derived"] += 1
        report = driver.verify_volume(vol, deep=deep)
        problems += [f"volume {vol.id} ({d['what']}): {p}" for p in report["problems"]]
        try:
            if not report["problems"] and not data.matches(*_image(driver, vol), d["pattern"]):
                problems.append(f"volume {vol.id} ({d['what']}) does not hold {d['pattern']}")
        except exception.RemoteFSAAError as exc:
            problems.append(f"volume {vol.id}: {exc}")
    return {"problems": problems, "checked": checked}


def cleanup(driver: Any, registries: list[str], derived_dir: str) -> None:
    """Delete every volume the workload made (shared and derived)."""
    vols = [Registry.load(p).volume() for p in registries]
    vols += [
        Volume(id=d["id"], size=d["size"], provider_location=d["share"])
        for d in _derived(derived_dir)
    ]
    for volume_id, left in _failed_copies(driver, derived_dir).items():
        for share in driver.shares if left else []:
            vols.append(Volume(id=volume_id, provider_location=share))
    for vol in vols:
        driver.delete_volume(vol)
        driver.clean_volume_file_locks(vol.id)
