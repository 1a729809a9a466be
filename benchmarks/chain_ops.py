"""Chain operations through the whole driver stack against the bare qemu-img commands.

Why: every driver operation adds bookkeeping to the qemu-img commands it must
run anyway (a lock, reading and checking the chain's headers, a fenced atomic
.info write, an intent record, privsep round trips). This measures what that
costs, per operation, in one run with both sides interleaved (the machines are
shared and noisy; only ratios taken side by side mean anything):

* ``driver``: ``LocalDriver`` method, with the real privsep daemon (started
  without sudo: we are root), tooz file locks and fsync'd .info writes;
* ``bare``: the qemu-img (and rm / truncate) commands of the same operation,
  run directly with ``subprocess.run`` as root, nothing else: the floor.

Operations (1 GiB volumes, ``--data`` MiB written into the base and into each
overlay so commit and convert move real data): create volume, snapshot create,
snapshot delete of the active top, snapshot delete in the middle of the chain,
clone, create volume from snapshot, extend, delete volume (with 2 snapshots).
The goal is at most 1.3x the bare commands for each. It is a benchmark, not a
test: it prints "goal met" or "goal missed" and never fails on timing.

    .venv/bin/python -m benchmarks.chain_ops [--rounds 15] [--share DIR] [--json out.json]

``--share DIR`` runs on another filesystem (a GlusterFS mount, say); it must be
empty or absent, and it is created and removed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from benchmarks._common import machine_header, machine_meta, percentile, publish, render_table  # noqa: E402
from remotefs_aa import service  # noqa: E402
from remotefs_aa.objects import Snapshot, Volume  # noqa: E402

GiB = 1024**3
OPS = (
    "create_volume",
    "snapshot_create",
    "snapshot_delete_top",
    "snapshot_delete_middle",
    "clone",
    "create_from_snapshot",
    "extend",
    "delete_volume",
)
GOAL = 1.3
#: Cinder's NFS driver on GlusterFS over FUSE, as root, 1 GiB empty volumes,
#: median ms (from the issue); the goal on GlusterFS is at most half of each.
CINDER_MS = {
    "create_volume": 73,
    "snapshot_create": 202,
    "snapshot_delete_top": 229,
    "snapshot_delete_middle": 607,
    "clone": 625,
    "create_from_snapshot": 332,
    "extend": 59,
    "delete_volume": 22,
}


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def _fill(path: str, fmt: str, mib: int, pattern: int, offset_mib: int = 0) -> None:
    if mib:
        _run("qemu-io", "-f", fmt, "-c", f"write -P {pattern} {offset_mib}M {mib}M", path)


class Bare:
    """The same operations as plain commands on files in ``directory``."""

    def __init__(self, directory: str, data_mib: int) -> None:
        self.dir = directory
        self.data = data_mib
        os.makedirs(directory, exist_ok=True)

    def p(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def volume(self, snaps: int = 0) -> list[str]:
        """A base with data and ``snaps`` overlays with data; names bottom first."""
        base = f"b-{uuid.uuid4().hex[:8]}"
        _run("qemu-img", "create", "-q", "-f", "raw", self.p(base), "1G")
        _fill(self.p(base), "raw", self.data, 1)
        names = [base]
        for i in range(snaps):
            names.append(self.snapshot(names[-1], "raw" if i == 0 else "qcow2"))
            _fill(self.p(names[-1]), "qcow2", self.data, 2 + i, 2 * (i + 1) * self.data)
        return names

    def snapshot(self, top: str, top_fmt: str) -> str:
        new = f"{top}.s{uuid.uuid4().hex[:6]}"
        _run("qemu-img", "create", "-q", "-f", "qcow2", "-b", top, "-F", top_fmt, self.p(new), "1G")
        return new

    def remove(self, names: list[str]) -> None:
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.p(name))


class Driver:
    """The same operations through LocalDriver."""

    def __init__(self, driver: Any, data_mib: int) -> None:
        self.d = driver
        self.data = data_mib

    def image(self, vol: Volume) -> tuple[str, str]:
        info = self.d.initialize_connection(vol, {})["data"]
        return os.path.join(self.d.share_path(info["export"]), info["name"]), info["format"]

    def volume(self, snaps: int = 0) -> tuple[Volume, list[Snapshot]]:
        vol = Volume(size=1)
        vol.provider_location = self.d.create_volume(vol)["provider_location"]
        _fill(*self.image(vol), self.data, 1)
        taken = []
        for i in range(snaps):
            snap = Snapshot(vol)
            self.d.create_snapshot(snap)
            taken.append(snap)
            _fill(*self.image(vol), self.data, 2 + i, 2 * (i + 1) * self.data)
        return vol, taken


#: Time the privileged daemon spent checking chains (privsep/images.py) during
#: the last driver call timed, in ms: read from the daemon's own counters
#: before and after the timed window, so the reading costs nothing inside it.
last_check_ms = 0.0


def _check_ns() -> int:
    from remotefs_aa.privsep import files

    return files.daemon_info()["checks"]["ns"]


def _timed(call: Callable[[], Any], checks: bool = True) -> float:
    global last_check_ms
    before = _check_ns() if checks else 0
    t0 = time.perf_counter()
    call()
    ms = (time.perf_counter() - t0) * 1000.0
    last_check_ms = (_check_ns() - before) / 1e6 if checks else 0.0
    return ms


def _place(vol: Volume, update: dict) -> None:
    vol.provider_location = update["provider_location"]


def measure_driver(op: str, drv: Driver) -> float:
    """Set up untimed, time the one driver call, clean up untimed."""
    d = drv.d
    if op == "create_volume":
        vol = Volume(size=1)
        ms = _timed(
            lambda: vol.__setattr__("provider_location", d.create_volume(vol)["provider_location"])
        )
        d.delete_volume(vol)
        return ms
    if op == "delete_volume":
        vol, _ = drv.volume(2)
        return _timed(lambda: d.delete_volume(vol))
    vol, snaps = drv.volume(2)
    new = Volume(size=1)
    try:
        if op == "snapshot_create":
            return _timed(lambda: d.create_snapshot(Snapshot(vol)))
        if op == "snapshot_delete_top":
            return _timed(lambda: d.delete_snapshot(snaps[1]))
        if op == "snapshot_delete_middle":
            return _timed(lambda: d.delete_snapshot(snaps[0]))
        if op == "clone":
            return _timed(lambda: _place(new, d.create_cloned_volume(new, vol)))
        if op == "create_from_snapshot":
            return _timed(lambda: _place(new, d.create_volume_from_snapshot(new, snaps[1])))
        if op == "extend":
            return _timed(lambda: d.extend_volume(vol, 2))
        raise ValueError(op)
    finally:
        vol.size = 2 if op == "extend" else vol.size
        d.delete_volume(vol)
        if new.provider_location:
            d.delete_volume(new)


def measure_bare(op: str, bare: Bare) -> float:
    """The commands of the same operation, on plain files."""
    p = bare.p
    if op == "create_volume":
        name = f"n-{uuid.uuid4().hex[:8]}"
        ms = _timed(lambda: _run("qemu-img", "create", "-q", "-f", "raw", p(name), "1G"), False)
        bare.remove([name])
        return ms
    names = bare.volume(2)
    base, s1, s2 = names
    extra: list[str] = []
    try:
        if op == "delete_volume":
            return _timed(lambda: bare.remove(list(reversed(names))), False)
        if op == "snapshot_create":
            new = f"{s2}.x"
            extra.append(new)
            return _timed(
                lambda: _run(
                    "qemu-img", "create", "-q", "-f", "qcow2", "-b", s2, "-F", "qcow2", p(new), "1G"
                ),
                False,
            )
        if op == "snapshot_delete_top":

            def delete_top() -> None:
                _run("qemu-img", "commit", "-q", "-d", "-f", "qcow2", p(s2))
                os.unlink(p(s2))

            return _timed(delete_top, False)
        if op == "snapshot_delete_middle":

            def delete_middle() -> None:
                _run("qemu-img", "commit", "-q", "-d", "-f", "qcow2", p(s1))
                _run(
                    "qemu-img", "rebase", "-q", "-f", "qcow2", "-u", "-b", base, "-F", "raw", p(s2)
                )
                os.unlink(p(s1))

            return _timed(delete_middle, False)
        if op in ("clone", "create_from_snapshot"):
            src = s2 if op == "clone" else s1
            dst = f"c-{uuid.uuid4().hex[:8]}"
            extra.append(dst)
            return _timed(
                lambda: _run(
                    "qemu-img", "convert", "-q", "-f", "qcow2", "-O", "raw", p(src), p(dst)
                ),
                False,
            )
        if op == "extend":
            # The command the driver runs: the top, its backing chain left closed.
            spec = {"driver": "qcow2", "file": {"driver": "file", "filename": p(s2)}}
            image = "json:" + json.dumps({**spec, "backing": None})
            return _timed(
                lambda: _run("qemu-img", "resize", "-q", "-f", "qcow2", image, "2G"), False
            )
        raise ValueError(op)
    finally:
        bare.remove([*names, *extra])


def write_config(workdir: str, share: str, share_root: str) -> str:
    path = os.path.join(workdir, "bench.conf")
    with open(path, "w") as f:
        f.write(
            f"[DEFAULT]\nstate_path = {workdir}/state\nlocal_shares = {share}\n"
            "[privileged]\nmode = privsep\nroot_helper =\n"
            f"allowed_paths = {workdir}/state,{share_root}\n"
        )
    return path


def measure(drv: Driver, bare: Bare, args: argparse.Namespace) -> tuple[dict, float]:
    """All rounds, both sides and every operation shuffled within each round."""
    samples: dict[str, dict[str, list[float]]] = {
        op: {"driver": [], "bare": [], "checks": []} for op in OPS
    }
    rng = random.Random(args.seed)
    for _ in range(args.warmup):
        measure_driver("snapshot_create", drv)
        measure_bare("snapshot_create", bare)
    t0 = time.monotonic()
    for r in range(args.rounds):
        order = [(op, side) for op in OPS for side in ("driver", "bare")]
        rng.shuffle(order)
        for op, side in order:
            if side == "driver":
                samples[op][side].append(measure_driver(op, drv))
                samples[op]["checks"].append(last_check_ms)
            else:
                samples[op][side].append(measure_bare(op, bare))
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
    return samples, time.monotonic() - t0


def run(args: argparse.Namespace) -> dict[str, Any]:
    if os.geteuid() != 0:
        raise SystemExit("run this benchmark as root (qemu-io writes test data as root)")
    if args.glusterfs:
        return run_glusterfs(args)
    workdir = tempfile.mkdtemp(prefix="rfsaa-chainbench-")
    share_root = args.share or os.path.join(workdir, "share")
    if args.share and os.path.exists(args.share) and os.listdir(args.share):
        raise SystemExit(f"--share {args.share} is not empty")
    try:
        share = os.path.join(share_root, "driver")
        conf = service.make_config(["--config-file", write_config(workdir, share, share_root)])
        driver = service.start(conf)
        try:
            samples, timed = measure(
                Driver(driver, args.data), Bare(os.path.join(share_root, "bare"), args.data), args
            )
        finally:
            service.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if args.share:
            shutil.rmtree(os.path.join(share_root, "driver"), ignore_errors=True)
            shutil.rmtree(os.path.join(share_root, "bare"), ignore_errors=True)
    return {"stats": _stats(samples), "samples_ms": samples, "seconds": timed, "share": share_root}


def run_glusterfs(args: argparse.Namespace) -> dict[str, Any]:
    """The GlusterFS driver on a real volume; the bare commands on a second mount of it.

    Both mounts use the driver's default mount options (no FUSE caches, see
    doc/glusterfs.md), so the two sides are compared like for like; Cinder's
    reference times (its NFS driver on GlusterFS FUSE) are printed beside.
    """
    from tests.functional import gluster

    work = tempfile.mkdtemp(prefix="rfsaa-chainbench-gl-", dir="/var/tmp")
    volume = gluster.GlusterVolume(os.path.join(work, "gluster"))
    os.makedirs(volume.workdir)
    try:
        volume.start()
        with gluster.entered(volume.netns_path):
            shares = os.path.join(work, "shares")
            with open(shares, "w") as f:
                f.write(volume.share + "\n")
            path = os.path.join(work, "bench.conf")
            with open(path, "w") as f:
                f.write(
                    f"[DEFAULT]\nstate_path = {work}/state\nvolume_driver = glusterfs\n"
                    f"glusterfs_shares_config = {shares}\n"
                    "[privileged]\nmode = privsep\nroot_helper =\n"
                )
            conf = service.make_config(["--config-file", path])
            options = conf.glusterfs_mount_options
            driver = service.start(conf)
            try:
                bare_mount = volume.mount(os.path.join(work, "bare-mnt"), options)
                samples, timed = measure(
                    Driver(driver, args.data),
                    Bare(os.path.join(bare_mount, "bare"), args.data),
                    args,
                )
                driver.unmount_shares()
            finally:
                service.stop()
    finally:
        volume.cleanup()
    return {
        "stats": _stats(samples),
        "samples_ms": samples,
        "seconds": timed,
        "cinder": True,
        "share": f"GlusterFS {volume.share} over FUSE, -o {options}",
    }


def _stats(samples: dict) -> dict:
    stats = {}
    for op in OPS:
        d, b = samples[op]["driver"], samples[op]["bare"]
        paired = [x / y for x, y in zip(d, b, strict=True) if y > 0]
        stats[op] = {
            "driver_median_ms": statistics.median(d),
            "driver_p90_ms": percentile(d, 90),
            "bare_median_ms": statistics.median(b),
            "bare_p90_ms": percentile(b, 90),
            "ratio": statistics.median(d) / statistics.median(b),
            "paired_ratio": statistics.median(paired),
            # The daemon's own chain checks, inside the driver's time.
            "checks_median_ms": statistics.median(samples[op]["checks"]),
            "checks_share": statistics.median(
                c / x for c, x in zip(samples[op]["checks"], d, strict=True) if x > 0
            ),
            "met": statistics.median(d) / statistics.median(b) <= GOAL,
            "cinder_ms": CINDER_MS[op],
        }
    return stats


def report(out: dict[str, Any]) -> str:
    meta = out["meta"]
    cinder = out.get("cinder", False)
    lines = ["", *machine_header(meta, out["seconds"]), ""]
    lines.append(
        f"ms per operation, {meta['args']['rounds']} rounds, driver and bare interleaved in "
        f"shuffled order; 1 GiB volumes, {meta['args']['data']} MiB of data per image; "
        f"share: {out['share']}"
    )
    lines.append("'x bare' = driver median / bare median; 'paired' = median of per-round ratios")
    lines.append(
        "'checks' = ms the daemon spent checking chains by descriptor (privsep/images.py) "
        "within the driver's time; 'of driver' = its median share (goal: at most 5 %)"
    )
    if cinder:
        lines.append("'Cinder' = Cinder's NFS driver on GlusterFS FUSE (reference, median ms)")
    lines.append("")
    rows = []
    for op, s in out["stats"].items():
        row = [
            op,
            f"{s['driver_median_ms']:.1f}",
            f"{s['driver_p90_ms']:.1f}",
            f"{s['bare_median_ms']:.1f}",
            f"{s['bare_p90_ms']:.1f}",
            f"{s['ratio']:.2f}x",
            f"{s['paired_ratio']:.2f}x",
            "goal met" if s["met"] else "goal missed",
            f"{s['checks_median_ms']:.2f}",
            f"{100 * s['checks_share']:.1f} %",
        ]
        if cinder:
            share_of = s["driver_median_ms"] / s["cinder_ms"]
            row += [
                f"{s['cinder_ms']}",
                f"{share_of:.2f}x",
                "goal met" if share_of <= 0.5 else "goal missed",
            ]
        rows.append(row)
    headers = ["operation", "driver", "p90", "bare", "p90", "x bare", "paired", f"<= {GOAL}x"]
    headers += ["checks", "of driver"]
    if cinder:
        headers += ["Cinder", "x Cinder", "<= 0.5x"]
    lines.append(render_table(headers, rows, right={1, 2, 3, 4, 5, 6, 8, 9, 10, 11}))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=15, help="rounds (default 15)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds of snapshot create")
    p.add_argument("--data", type=int, default=8, help="MiB written per image (default 8)")
    p.add_argument("--share", help="run on this directory instead of a temporary one")
    p.add_argument(
        "--glusterfs",
        action="store_true",
        help="the GlusterFS driver on a real GlusterFS volume started here (needs "
        "glusterfs-server); also compares with Cinder's reference times",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load = os.getloadavg()
    started = time.monotonic()
    out = run(args)
    meta = machine_meta(("oslo.privsep", "tooz"), load)
    meta["loadavg_end"] = os.getloadavg()
    meta["wall_s"] = time.monotonic() - started
    meta["args"] = vars(args)
    meta["versions"]["qemu-img"] = subprocess.run(
        ["qemu-img", "--version"], capture_output=True, text=True
    ).stdout.splitlines()[0]
    out["meta"] = meta
    publish(report(out), out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
