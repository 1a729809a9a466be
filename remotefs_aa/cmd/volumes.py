"""``remotefs-aa volume|snapshot|stats|demo``: single operations and the main job.

Each command starts the configured driver (privileged helper, lock provider,
shares) exactly as a service does, runs one operation through the full
driver stack, prints a readable table (or ``--format json`` for scripts) and
stops everything it started.

``demo`` is the main job: several worker processes, each with its own driver,
run random snapshot create / delete / clone / create-from-snapshot / revert
operations on the same volumes with a progress bar, through the driver's public
methods and its own locks (remotefs_aa.workload); then every chain and every
byte is verified against the history they wrote and the result printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from oslo_config import cfg

from remotefs_aa import exception, opts, service, workload
from remotefs_aa.cmd.tables import key_values, table
from remotefs_aa.image.store import DirectoryImageService
from remotefs_aa.objects import Snapshot, Volume


def add_parsers(commands: Any) -> None:
    """Register the volume, snapshot, stats and demo commands."""
    fmt = argparse.ArgumentParser(add_help=False)
    fmt.add_argument("--format", choices=("table", "json"), default="table")

    volume = commands.add_parser("volume", help="create, delete, extend, clone, show volumes")
    vcmds = volume.add_subparsers(dest="volume_command", required=True, metavar="ACTION")
    p = vcmds.add_parser("create", parents=[fmt], help="create a volume")
    p.add_argument("--size", type=int, required=True, help="size in GiB")
    p.add_argument("--id", help="volume id (default: a new UUID)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--clone", metavar="VOLUME", help="a full copy of this volume")
    src.add_argument("--from-snapshot", metavar="VOLUME:SNAPSHOT", help="the data of this snapshot")
    src.add_argument(
        "--image", metavar="FILE", help="the data of this raw or qcow2 image file (checked first)"
    )
    p.add_argument(
        "--image-format",
        choices=("raw", "qcow2"),
        help="the format FILE must have (default: what qemu-img finds)",
    )
    p.set_defaults(func=cmd_volume_create)
    p = vcmds.add_parser("export", parents=[fmt], help="copy a volume's data to an image file")
    p.add_argument("volume")
    p.add_argument("file", help="the image file to write (replaced atomically)")
    p.add_argument("--disk-format", choices=("raw", "qcow2"), default="raw")
    p.set_defaults(func=cmd_volume_export)
    p = vcmds.add_parser("delete", parents=[fmt], help="delete a volume and its snapshots")
    p.add_argument("volume")
    p.set_defaults(func=cmd_volume_delete)
    p = vcmds.add_parser("extend", parents=[fmt], help="grow a volume")
    p.add_argument("volume")
    p.add_argument("size", type=int, help="new size in GiB")
    p.set_defaults(func=cmd_volume_extend)
    p = vcmds.add_parser("show", parents=[fmt], help="a volume's chain, verified")
    p.add_argument("volume")
    p.add_argument("--deep", action="store_true", help="also qemu-img check every overlay")
    p.set_defaults(func=cmd_volume_show)
    p = vcmds.add_parser("list", parents=[fmt], help="volumes on the configured shares")
    p.set_defaults(func=cmd_volume_list)

    snapshot = commands.add_parser("snapshot", help="create, delete, revert to snapshots")
    scmds = snapshot.add_subparsers(dest="snapshot_command", required=True, metavar="ACTION")
    p = scmds.add_parser("create", parents=[fmt], help="snapshot a volume")
    p.add_argument("volume")
    p.add_argument("--id", help="snapshot id (default: a new UUID)")
    p.set_defaults(func=cmd_snapshot_create)
    p = scmds.add_parser("delete", parents=[fmt], help="delete a snapshot")
    p.add_argument("volume")
    p.add_argument("snapshot")
    p.set_defaults(func=cmd_snapshot_delete)
    p = scmds.add_parser("revert", parents=[fmt], help="revert a volume to its latest snapshot")
    p.add_argument("volume")
    p.add_argument("snapshot")
    p.set_defaults(func=cmd_snapshot_revert)

    p = commands.add_parser("stats", parents=[fmt], help="capacity per share (get_volume_stats)")
    p.set_defaults(func=cmd_stats)

    p = commands.add_parser(
        "demo",
        parents=[fmt],
        help="the main job: several processes hammer snapshots on shared volumes, then verify",
    )
    p.add_argument("--workers", type=int, default=4, help="worker processes (default 4)")
    p.add_argument("--volumes", type=int, default=3, help="shared volumes (default 3)")
    p.add_argument("--operations", type=int, default=15, help="operations per worker (default 15)")
    p.add_argument("--size", type=int, default=1, help="volume size in GiB (default 1)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: time)")
    p.add_argument("--keep", action="store_true", help="keep the volumes afterwards")
    p.set_defaults(func=cmd_demo)

    p = commands.add_parser("demo-worker", help=argparse.SUPPRESS)
    p.add_argument("--workspace", required=True, help="the workload's directory (history, catalog)")
    p.add_argument("--index", type=int, required=True, help="this worker's number, from 0")
    p.add_argument("--workers", type=int, required=True, help="how many workers run")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--operations", type=int, default=None)
    p.add_argument("--duration", type=float, default=None)
    p.set_defaults(func=cmd_demo_worker)


# -- output ---------------------------------------------------------------------


def _emit(args: argparse.Namespace, result: dict, rows: list[tuple[str, Any]]) -> None:
    if args.format == "json":
        print(json.dumps(result, indent=2, sort_keys=True))
        return
    print(key_values(rows))


# -- single operations ------------------------------------------------------------


def _find(driver: Any, volume_id: str) -> Volume:
    vol = driver.find_volume(volume_id)
    if vol is None:
        raise exception.VolumeNotFound(
            f"volume {volume_id} is on none of the shares {', '.join(driver.shares)}"
        )
    return vol


def _timed(call: Any) -> tuple[Any, float]:
    started = time.monotonic()
    result = call()
    return result, (time.monotonic() - started) * 1000


def cmd_volume_create(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
    if args.image_format and not args.image:
        raise exception.VolumeError("--image-format applies only with --image FILE")
    with service.running(conf) as driver:
        vol = Volume(size=args.size) if not args.id else Volume(id=args.id, size=args.size)
        if args.clone:
            src = _find(driver, args.clone)
            update, ms = _timed(lambda: driver.create_cloned_volume(vol, src))
            how = f"clone of {src.id}"
        elif args.from_snapshot:
            src_id, _, snap_id = args.from_snapshot.partition(":")
            if not snap_id:
                raise exception.InvalidSnapshot("--from-snapshot wants VOLUME:SNAPSHOT")
            snap = Snapshot(_find(driver, src_id), id=snap_id)
            update, ms = _timed(lambda: driver.create_volume_from_snapshot(vol, snap))
            how = f"from snapshot {snap_id} of {src_id}"
        elif args.image:
            update, ms = _timed(lambda: _create_from_image(driver, vol, args))
            how = f"from image {os.path.abspath(args.image)}"
        else:
            update, ms = _timed(lambda: driver.create_volume(vol))
            how = f"new {driver.volume_format}"
        vol.provider_location = update["provider_location"]
        result = {
            "id": vol.id,
            "size_gib": vol.size,
            "share": vol.provider_location,
            "file": driver.local_path(vol),
            "created": how,
            "ms": round(ms, 1),
        }
    _emit(args, result, [(k, v) for k, v in result.items()])
    return 0


def _image_service(path: str, disk_format: str | None = None) -> tuple[DirectoryImageService, str]:
    """The image service for an operator's own file ``path``, and the file's image id."""
    directory = os.path.dirname(os.path.abspath(path))
    images = DirectoryImageService(directory, sidecars=False, disk_format=disk_format)
    return images, os.path.basename(path)


def _create_from_image(driver: Any, vol: Volume, args: argparse.Namespace) -> dict:
    """A new volume filled from an image file; removed again if the image is refused."""
    images, image_id = _image_service(args.image, args.image_format)
    images.show(None, image_id)  # a missing file fails before anything is created
    update = driver.create_volume(vol)
    vol.provider_location = update["provider_location"]
    try:
        driver.copy_image_to_volume(None, vol, images, image_id)
    except BaseException:
        driver.delete_volume(vol)
        raise
    return update


def cmd_volume_export(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
    images, image_id = _image_service(args.file)
    with service.running(conf) as driver:
        vol = _find(driver, args.volume)
        _, ms = _timed(
            lambda: driver.copy_volume_to_image(
                None, vol, images, {"id": image_id, "disk_format": args.disk_format}
            )
        )
    path = os.path.join(images.directory, image_id)
    result = {
        "id": vol.id,
        "file": path,
        "disk_format": args.disk_format,
        "bytes": os.path.getsize(path),
        "ms": round(ms, 1),
    }
    _emit(args, result, list(result.items()))
    return 0


def cmd_volume_delete(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
    with service.running(conf) as driver:
        vol = _find(driver, args.volume)
        _, ms = _timed(lambda: driver.delete_volume(vol))
    result = {"id": vol.id, "deleted": True, "ms": round(ms, 1)}
    _emit(args, result, list(result.items()))
    return 0


def cmd_volume_extend(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
    with service.running(conf) as driver:
        vol = _find(driver, args.volume)
        old = vol.size
        _, ms = _timed(lambda: driver.extend_volume(vol, args.size))
    result = {"id": vol.id, "old_size_gib": old, "size_gib": args.size, "ms": round(ms, 1)}
    _emit(args, result, list(result.items()))
    return 0


def cmd_volume_show(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
    with service.running(conf) as driver:
        vol = _find(driver, args.volume)
        report = driver.verify_volume(vol, deep=args.deep)
    result = {
        "id": vol.id,
        "size_gib": vol.size,
        "share": vol.provider_location,
        "generation": report.get("generation"),
        "chain": report.get("chain", []),
        "snapshots": report.get("snapshots", {}),
        "problems": report["problems"],
    }
    if args.format == "json":
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        _emit(
            args,
            result,
            [
                ("volume", vol.id),
                ("size", f"{vol.size} GiB"),
                ("share", vol.provider_location),
                ("generation", result["generation"]),
                ("chain (top first)", " -> ".join(result["chain"]) or "-"),
                ("snapshots", ", ".join(result["snapshots"]) or "none"),
                ("verdict", "intact" if not result["problems"] else "; ".join(result["problems"])),
            ],
        )
    return 0 if not result["problems"] else 1


def cmd_volume_list(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
    with service.running(conf) as driver:
        vols = driver.list_volumes()
    result = [{"id": v.id, "size_gib": v.size, "share": v.provider_location} for v in vols]
    if args.format == "json":
        print(json.dumps(result, indent=2))
    else:
        print(table([[v["id"], v["size_gib"], v["share"]] for v in result], ["id", "GiB", "share"]))
    return 0


def cmd_snapshot_create(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
    with service.running(conf) as driver:
        vol = _find(driver, args.volume)
        snap = Snapshot(vol) if not args.id else Snapshot(vol, id=args.id)
        _, ms = _timed(lambda: driver.create_snapshot(snap))
    result = {"id": snap.id, "volume_id": vol.id, "ms": round(ms, 1)}
    _emit(args, result, list(result.items()))
    return 0


def cmd_snapshot_delete(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
    with service.running(conf) as driver:
        snap = Snapshot(_find(driver, args.volume), id=args.snapshot)
        _, ms = _timed(lambda: driver.delete_snapshot(snap))
    result = {"id": snap.id, "volume_id": args.volume, "deleted": True, "ms": round(ms, 1)}
    _emit(args, result, list(result.items()))
    return 0


def cmd_snapshot_revert(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
    with service.running(conf) as driver:
        vol = _find(driver, args.volume)
        snap = Snapshot(vol, id=args.snapshot)
        _, ms = _timed(lambda: driver.revert_to_snapshot(None, vol, snap))
    result = {"volume_id": vol.id, "reverted_to": snap.id, "ms": round(ms, 1)}
    _emit(args, result, list(result.items()))
    return 0


def cmd_stats(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
    with service.running(conf) as driver:
        stats = driver.get_volume_stats(refresh=True)
    if args.format == "json":
        print(json.dumps(stats, indent=2, sort_keys=True))
        return 0
    rows = [
        [
            p["pool_name"],
            p["total_capacity_gb"],
            p["free_capacity_gb"],
            p["provisioned_capacity_gb"],
            f"{p['reserved_percentage']}%",
            p["max_over_subscription_ratio"],
        ]
        for p in stats["pools"]
    ]
    print(
        f"backend {stats['volume_backend_name']} ({stats['storage_protocol']}), "
        f"thin provisioning: {'yes' if stats['thin_provisioning_support'] else 'no'}"
    )
    print(table(rows, ["share", "total GiB", "free GiB", "provisioned GiB", "reserved", "ratio"]))
    return 0


# -- the main job -------------------------------------------------------------------


def cmd_demo_worker(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
    """One demo process: progress lines on stdout, then one ``result`` JSON line."""

    def progress(op: str) -> None:
        print(f"op {op}", flush=True)

    with service.running(conf) as driver:
        result = workload.run_worker(
            driver,
            workload.Workspace(args.workspace),
            args.index,
            args.workers,
            args.seed,
            operations=args.operations,
            duration=args.duration,
            progress=progress,
        )
    print("result " + json.dumps(result), flush=True)
    return 0 if not result["errors"] else 1


class _Progress:
    """A one-line progress bar on stderr (plain lines when not a terminal)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.lock = threading.Lock()
        self.tty = sys.stderr.isatty()
        self.started = time.monotonic()
        self.last_line = 0.0

    def tick(self) -> None:
        with self.lock:
            self.done += 1
            now = time.monotonic()
            if not self.tty and self.done < self.total and now - self.last_line < 2:
                return
            self.last_line = now
            width = 30
            filled = int(width * self.done / max(self.total, 1))
            rate = self.done / max(now - self.started, 1e-6)
            line = (
                f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} operations, "
                f"{rate:.1f}/s"
            )
            sys.stderr.write(("\r" + line) if self.tty else (line + "\n"))
            sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def cmd_demo(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
    """Prepare volumes, run the workers with a progress bar, verify, report, clean up."""
    if args.workers < 1 or args.volumes < 1 or args.operations < 1:
        print(
            "remotefs-aa demo: --workers, --volumes and --operations must be >= 1", file=sys.stderr
        )
        return 2
    seed = args.seed if args.seed is not None else int(time.time())
    started = time.monotonic()
    with service.running(conf) as driver:
        parent = os.path.join(conf.state_path, "workload")
        os.makedirs(parent, exist_ok=True)
        workspace = workload.Workspace(tempfile.mkdtemp(prefix="demo-", dir=parent))
        workload.prepare(driver, workspace, args.volumes, args.size)
        bar = _Progress(args.workers * args.operations)
        procs = []
        results: list[dict] = []
        failures: list[str] = []
        try:
            for i in range(args.workers):
                argv = [
                    sys.executable,
                    "-m",
                    "remotefs_aa.cmd.main",
                    *opts.config_file_args(conf),
                    "demo-worker",
                    "--workspace",
                    workspace.root,
                    "--index",
                    str(i),
                    "--workers",
                    str(args.workers),
                    "--seed",
                    str(seed + i),
                    "--operations",
                    str(args.operations),
                ]
                procs.append(
                    subprocess.Popen(
                        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                    )
                )

            def follow(proc: subprocess.Popen) -> None:
                for line in proc.stdout:
                    if line.startswith("op "):
                        bar.tick()
                    elif line.startswith("result "):
                        results.append(json.loads(line[len("result ") :]))

            readers = [threading.Thread(target=follow, args=(p,)) for p in procs]
            for t in readers:
                t.start()
            for proc, t in zip(procs, readers, strict=True):
                t.join()
                err = proc.stderr.read()
                if proc.wait() not in (0, 1):
                    failures.append(f"worker pid {proc.pid} exited {proc.returncode}: {err[-500:]}")
            bar.close()
            run_s = time.monotonic() - started
            report = workload.verify(driver, workspace)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if not args.keep:
            workload.cleanup(driver, workspace)
        # The history stays for a look at what went wrong (or when asked to keep).
        kept = bool(args.keep or failures or report["errors"] or report["problems"])
        if not kept:
            shutil.rmtree(workspace.root, ignore_errors=True)
    errors = report["errors"] + failures
    counts: dict[str, int] = {}
    for r in results:
        for op, n in r["counts"].items():
            counts[op] = counts.get(op, 0) + n
    total = sum(counts.values())
    out = {
        "seed": seed,
        "workers": args.workers,
        "volumes": args.volumes,
        "operations": counts,
        "operations_total": total,
        "seconds": round(run_s, 2),
        "ops_per_second": round(total / run_s, 2) if run_s else None,
        "per_worker": [
            {
                "pid": r["pid"],
                "operations": r["operations"],
                "lock_wait_max_s": round(r["lock_wait_max_s"], 3),
            }
            for r in results
        ],
        "errors": errors,
        "verified": report["checked"],
        "refused": report["refused"],
        "problems": report["problems"],
        "kept": bool(args.keep),
        "history": workspace.history if kept else None,
    }
    ok = not errors and not report["problems"]
    if args.format == "json":
        print(json.dumps(out, indent=2))
    else:
        print()
        print(
            table([[op, n] for op, n in counts.items()] + [["total", total]], ["operation", "done"])
        )
        print()
        print(
            table(
                [
                    [w["pid"], w["operations"], round(w["lock_wait_max_s"] * 1000, 1)]
                    for w in out["per_worker"]
                ],
                ["worker pid", "operations", "worst lock wait ms"],
            )
        )
        c = report["checked"]
        print()
        print(
            f"{total} operations by {args.workers} processes on {args.volumes} shared "
            f"volumes in {run_s:.1f} s ({out['ops_per_second']}/s), seed {seed}"
        )
        print(
            f"verified against the history: {c['volumes']} volumes ({c['chain_links']} chain "
            f"links, qemu-img check on every overlay), {c['snapshots']} snapshots and "
            f"{c['derived']} derived volumes, every byte ({c['bytes'] / 2**30:.0f} GiB) "
            f"flattened and read back: {c['regions']} written regions exact, {c['ambiguous']} "
            f"either way (written during a chain change)"
        )
        refused = ", ".join(f"{n} {why}" for why, n in sorted(report["refused"].items()))
        print(f"refused, each a clean no with a cause in the history: {refused or 'none'}")
        for line in errors + report["problems"]:
            print(f"  PROBLEM: {line}")
        if out["history"]:
            print(f"history kept in {out['history']}")
        print(
            "RESULT: every chain intact, every byte where it should be"
            if ok
            else "RESULT: FAILED (see problems above)"
        )
    return 0 if ok else 1
