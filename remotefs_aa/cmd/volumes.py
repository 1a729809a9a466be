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
from oslo_utils import units

from remotefs_aa import coordination, exception, opts, service, workload
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
    p = vcmds.add_parser(
        "repair",
        parents=[fmt],
        help="rebuild a volume's .info file from its images (shows the change; --yes writes)",
        description="Read the headers of the volume's images under its lock, rebuild "
        "the .info file they imply and show the change. Nothing is written without "
        "--yes; a chain the files do not make unambiguous is refused (doc/chains.md).",
    )
    p.add_argument("volume")
    p.add_argument(
        "--base-format",
        choices=("raw", "qcow2"),
        help="the base image's format (default: the current .info file's if it parses, "
        "else the configured one); never probed",
    )
    p.add_argument("--yes", action="store_true", help="write the rebuilt file")
    p.set_defaults(func=cmd_volume_repair)

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

    # No help=: argparse lists a sub-command given help=SUPPRESS as "==SUPPRESS==".
    p = commands.add_parser("demo-worker")
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
    # true/false as in the JSON, not Python's True/False.
    print(key_values([(k, str(v).lower() if isinstance(v, bool) else v) for k, v in rows]))


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
        raise exception.UsageError("volume create: --image-format applies only with --image FILE")
    with service.running(conf) as driver:
        vol = Volume(size=args.size) if not args.id else Volume(id=args.id, size=args.size)
        if args.clone:
            src = _find(driver, args.clone)
            update, ms = _timed(lambda: driver.create_cloned_volume(vol, src))
            how = f"clone of {src.id}"
        elif args.from_snapshot:
            src_id, _, snap_id = args.from_snapshot.partition(":")
            if not snap_id:
                raise exception.UsageError("volume create: --from-snapshot wants VOLUME:SNAPSHOT")
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
        driver.clean_volume_file_locks(vol.id)  # as Cinder's manager does after a delete
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
    order, latest = snapshot_order(report.get("chain", []), report.get("snapshots", {}))
    result = {
        "id": vol.id,
        "size_gib": vol.size,
        "share": vol.provider_location,
        "generation": report.get("generation"),
        "chain": report.get("chain", []),
        "snapshots": report.get("snapshots", {}),
        "snapshot_order": order,
        "latest_snapshot": latest,
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
                (
                    "snapshots (oldest first)",
                    ", ".join(f"{s} (latest)" if s == latest else s for s in order) or "none",
                ),
                ("verdict", "intact" if not result["problems"] else "; ".join(result["problems"])),
            ],
        )
    return 0 if not result["problems"] else 1


def snapshot_order(chain: list[str], snapshots: dict[str, str]) -> tuple[list[str], str | None]:
    """Snapshot ids oldest to newest, and the latest (the only one revert accepts).

    ``snapshots[S]`` is the overlay made when S was taken, and overlays stack
    in the order they were made, so walking the chain from the base up gives
    the snapshots in the order they were taken; the latest is the one whose
    overlay is the active image. Ids the .info file names outside the chain
    (``volume show`` reports those as problems) come last.
    """
    by_file = {f: s for s, f in snapshots.items()}
    order = [by_file[name] for name in reversed(chain) if name in by_file]
    order += sorted(s for s in snapshots if s not in order)
    latest = by_file.get(chain[0]) if chain else None
    return order, latest


def cmd_volume_list(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
    with service.running(conf) as driver:
        vols = driver.list_volumes()
    result = [
        {
            "id": v.id,
            "size_gib": v.size,
            "share": v.provider_location,
            "status": "error" if v.error else "available",
            "error": v.error,
        }
        for v in vols
    ]
    if args.format == "json":
        print(json.dumps(result, indent=2))
    else:
        rows = [[v["id"], v["size_gib"], v["share"], v["status"]] for v in result]
        print(table(rows, ["id", "GiB", "share", "status"]))
        for v in result:
            if v["error"]:
                print(f"volume {v['id']}: {v['error']}")
    # Every volume is listed; exit 1 still tells a script that one needs repair.
    return 1 if any(v["error"] for v in result) else 0


def cmd_volume_repair(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
    """Plan (and with --yes write) a volume's .info file rebuilt from its images."""
    from remotefs_aa.image import repair

    with service.running(conf) as driver:
        # Not _find: it reads the .info file, which is what is broken.
        share = next(
            (
                s
                for s in driver.shares
                if f"volume-{args.volume}" in driver.io_for(s).list_directory(driver.share_path(s))
            ),
            None,
        )
        if share is None:
            raise exception.VolumeNotFound(
                f"volume {args.volume} is on none of the shares {', '.join(driver.shares)}"
            )
        chain = driver.chain(Volume(id=args.volume, size=0), share)
        with coordination.locked(args.volume, purpose="volume repair"):
            found = repair.plan(chain, args.base_format)
            written = bool(args.yes and found.needed)
            if written:
                repair.apply(chain, found)
    snaps = found.state.snapshots if found.state else {}
    order, latest = snapshot_order(found.chain, snaps)
    result = {
        "id": args.volume,
        "share": share,
        "info_file": found.info_path,
        "chain": found.chain,
        "snapshot_order": order,
        "latest_snapshot": latest,
        "current": found.current,
        "proposed": found.proposed,
        "diff": found.diff() if found.needed else "",
        "needed": found.needed,
        "written": written,
        "notes": found.notes,
        "problems": found.problems,
    }
    if args.format == "json":
        print(json.dumps(result, indent=2))
    else:
        print(
            key_values(
                [
                    ("volume", args.volume),
                    ("info file", found.info_path),
                    ("chain (top first)", " -> ".join(found.chain) or "-"),
                    ("snapshots (oldest first)", ", ".join(order) or "none"),
                ]
            )
        )
        for line in found.notes:
            print(f"note: {line}")
        for line in found.problems:
            print(f"REFUSED: {line}")
        if found.needed:
            print(found.diff(), end="")
            print("written" if written else "not written: run again with --yes to write it")
        elif not found.problems:
            print("nothing to repair")
    return 1 if found.problems else 0


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
        deleted, ms = _timed(lambda: driver.delete_snapshot(snap))
    # Deleting a missing snapshot succeeds (Cinder's rule, so retries are safe),
    # but says that nothing was there: a mistyped id must not read as "deleted".
    result: dict[str, Any] = {"id": snap.id, "volume_id": args.volume, "deleted": bool(deleted)}
    if not deleted:
        result["reason"] = "not found"
    result["ms"] = round(ms, 1)
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
            p.get("leftover_files", 0),
        ]
        for p in stats["pools"]
    ]
    print(
        f"backend {stats['volume_backend_name']} ({stats['storage_protocol']}), "
        f"thin provisioning: {'yes' if stats['thin_provisioning_support'] else 'no'}"
    )
    headers = ["share", "total GiB", "free GiB", "provisioned GiB", "reserved", "ratio"]
    print(table(rows, [*headers, "leftovers"]))
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
        self.last_tick: float | None = None

    def elapsed(self) -> float:
        """Seconds from the start to the last operation: the summary's rate uses this too."""
        return (self.last_tick or time.monotonic()) - self.started

    def tick(self) -> None:
        with self.lock:
            self.done += 1
            now = self.last_tick = time.monotonic()
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


def worker_summary(result: dict) -> dict:
    """One worker's line of the demo's report.

    The worst wait in ms is rounded from the unrounded seconds (12.3 ms), not
    from seconds already rounded to the ms, which printed 12 ms as a fake 12.0.
    """
    return {
        "pid": result["pid"],
        "operations": result["operations"],
        "lock_wait_max_s": round(result["lock_wait_max_s"], 4),
        "lock_wait_max_ms": round(result["lock_wait_max_s"] * 1000, 1),
    }


def cmd_demo(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
    """Prepare volumes, run the workers with a progress bar, verify, report, clean up."""
    if args.workers < 1 or args.volumes < 1 or args.operations < 1:
        raise exception.UsageError("demo: --workers, --volumes and --operations must be >= 1")
    seed = args.seed if args.seed is not None else int(time.time())
    with service.running(conf) as driver:
        parent = os.path.join(conf.state_path, "workload")
        os.makedirs(parent, exist_ok=True)
        workspace = workload.Workspace(tempfile.mkdtemp(prefix="demo-", dir=parent))
        workload.prepare(driver, workspace, args.volumes, args.size)
        # The bar's clock starts as the workers do; the summary reads the same clock.
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
            run_s = bar.elapsed()
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
        "per_worker": [worker_summary(r) for r in results],
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
                [[w["pid"], w["operations"], w["lock_wait_max_ms"]] for w in out["per_worker"]],
                ["worker pid", "operations", "worst lock wait ms"],
            )
        )
        c = report["checked"]
        print()
        print(
            f"{total} operations by {args.workers} processes on {args.volumes} shared "
            f"volumes in {run_s:.1f} s ({total / run_s if run_s else 0:.1f}/s, as on the bar), "
            f"seed {seed}"
        )
        print(
            f"verified against the history: {c['volumes']} volumes ({c['chain_links']} chain "
            f"links, qemu-img check on every overlay), {c['snapshots']} snapshots and "
            f"{c['derived']} derived volumes, every byte ({c['bytes'] / units.Gi:.0f} GiB) "
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
