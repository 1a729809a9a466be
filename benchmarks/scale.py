"""Does an operation's cost grow only with its own work? Share size, chain depth, data, processes.

Why: Cinder shares hold thousands of volumes and long-lived volumes collect deep
chains. An operation that lists the whole share, a stats poll that rescans it,
or a commit that opens a chain it does not change costs more the more *other*
things exist. This benchmark measures the driver stack (``LocalDriver``, the
real privsep daemon started without sudo, tooz file locks, fsync'd ``.info``
writes) along four axes, each in one run with its variants interleaved (the
machine is shared and noisy; only ratios taken side by side mean anything):

* **share size**: shares of 10 / 1,000 / 5,000 volumes (filled directly with the
  files the driver would have made: one volume in four with a snapshot), one
  driver per share; per round and share, in shuffled share order: create
  volume, snapshot create, clone, snapshot delete, delete volume (twice), the
  op-path stats (``get_volume_stats()``), Cinder's periodic refresh
  (``get_volume_stats(refresh=True)``) and ``list_volumes`` (the CLI's
  ``volume list``). Goal: every per-operation cost within 1.2x from 10 to 5,000.
* **chain depth**: volumes with 1 / 8 / 64 / 128 snapshots; snapshot create
  (then removed, untimed), delete of the newest snapshot (then re-taken,
  untimed), delete of the middle one, and a clone (flatten), in shuffled order.
  Goal: depth 128 within 1.5x of depth 1 for snapshot create and delete.
* **data**: 0 / 64 MiB / 1 GiB written into the base and into one overlay;
  clone and create-from-snapshot through the driver against a bare ``qemu-img
  convert`` of the same chain, and the bare convert's variants (cache modes
  ``-t/-T none``, copy offload ``-C``, each with and without an fsync of the
  result). Goal: clone throughput within 1.5x of the bare convert at every size.
* **processes**: 1 / 2 / 4 processes, each with its own driver, daemon and lock
  connection, on its own volume, looping snapshot create + delete for a fixed
  time; operations/s, CPU per operation (the process, its daemon and the
  daemon's qemu-img children), and how busy the machine's CPUs were. Goal:
  throughput limited only by the CPUs (the CPUs busy, CPU per operation flat).

It is a benchmark, not a test: it prints "goal met" / "goal missed" and never
fails on timing. ``--quick`` keeps every axis but fewer rounds, no 1 GiB case
and shorter parallel runs.

    .venv/bin/python -m benchmarks.scale [--quick] [--rounds N] [--sections a,b] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
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

GiB = 1024**3
MiB = 1024**2
SECTIONS = ("share", "depth", "data", "parallel")
SHARE_SIZES = (10, 1000, 5000)
DEPTHS = (1, 8, 64, 128)
SHARE_OPS = (
    "create_volume",
    "snapshot_create",
    "clone",
    "snapshot_delete",
    "delete_volume",
    "stats",
    "stats_refresh",
    "list_volumes",
)
#: Whole-share reads: they grow with the share by design (one directory read
#: plus one header per volume), so the per-operation goal does not apply.
WHOLE_SHARE_OPS = ("stats_refresh", "list_volumes")
DEPTH_OPS = ("snapshot_create", "snapshot_delete_newest", "snapshot_delete_middle", "clone")
GOAL_SHARE, GOAL_DEPTH, GOAL_CLONE = 1.2, 1.5, 1.5


# -- set-up ------------------------------------------------------------------


def write_config(workdir: str, name: str, share: str) -> str:
    path = os.path.join(workdir, f"{name}.conf")
    with open(path, "w") as f:
        f.write(
            f"[DEFAULT]\nstate_path = {workdir}/data/state\nlocal_shares = {share}\n"
            # The config lies outside allowed_paths, as the daemon demands.
            f"[privileged]\nmode = privsep\nroot_helper =\nallowed_paths = {workdir}/data\n"
            f"[coordination]\nbackend_url = file://{workdir}/coordination\n"
        )
    return path


def start_drivers(workdir: str, shares: dict[str, str]) -> dict[str, Any]:
    """One LocalDriver per share, in this process, sharing one daemon and lock provider."""
    from remotefs_aa import drivers, service

    out: dict[str, Any] = {}
    for name, share in shares.items():
        conf = service.make_config(["--config-file", write_config(workdir, name, share)])
        if not out:
            out[name] = service.start(conf)
        else:
            driver = drivers.load_driver(conf)
            service._drivers.append(driver)
            driver.do_setup()
            driver.check_for_setup_error()
            out[name] = driver
    return out


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def fill_share(share: str, count: int, template: bytes) -> None:
    """``count`` volumes as the driver lays them out, written directly (fast).

    Each is a sparse 1 GiB raw base with its ``.info`` and generation claim;
    one in four also has a snapshot (a qcow2 overlay cut from ``template``,
    whose backing name is patched to the volume's own).
    """
    os.makedirs(share, exist_ok=True)
    old = template.index(b"volume-") + len("volume-")
    for i in range(count):
        vid = str(uuid.UUID(int=random.getrandbits(128)))
        base = os.path.join(share, f"volume-{vid}")
        with open(base, "wb") as f:
            f.truncate(GiB)
        os.chmod(base, 0o660)
        info: dict[str, Any] = {"active": f"volume-{vid}", "generation": 1, "format": "raw"}
        texts = [json.dumps(info, indent=1) + "\n"]
        if i % 4 == 3:
            sid = str(uuid.uuid4())
            overlay = f"volume-{vid}.{sid}"
            data = template[:old] + vid.encode() + template[old + 36 :]
            with open(os.path.join(share, overlay), "wb") as f:
                f.write(data)
            os.chmod(os.path.join(share, overlay), 0o660)
            info = {"active": overlay, sid: overlay, "generation": 2, "format": "raw"}
            texts.append(json.dumps(info, indent=1) + "\n")
        for gen, text in enumerate(texts, 1):
            claim = os.path.join(share, f".volume-{vid}.gen.{gen}")
            with open(claim, "w") as f:
                f.write(text)
            os.chmod(claim, 0o640)
        os.link(claim, os.path.join(share, f"volume-{vid}.info"))


def overlay_template(workdir: str) -> bytes:
    path = os.path.join(workdir, "template.qcow2")
    backing = f"volume-{uuid.UUID(int=0)}"
    _run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "raw", path, "1G")
    with open(path, "rb") as f:
        data = f.read()
    os.unlink(path)
    return data


def timed(call: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    call()
    return (time.perf_counter() - t0) * 1000.0


def _fill(path: str, fmt: str, mib: int, pattern: int, offset_mib: int = 0) -> None:
    """``mib`` MiB of ``pattern`` at ``offset_mib`` (in 256 MiB writes, like a guest)."""
    done = 0
    while done < mib:
        step = min(256, mib - done)
        cmd = f"write -P {pattern} {offset_mib + done}M {step}M"
        _run("qemu-io", "-f", fmt, "-c", cmd, path)
        done += step


def image_of(driver: Any, vol: Any) -> tuple[str, str]:
    info = driver.initialize_connection(vol, {})["data"]
    return os.path.join(driver.share_path(info["export"]), info["name"]), info["format"]


# -- share size --------------------------------------------------------------


def run_share(workdir: str, args: argparse.Namespace, log: Callable[[str], None]) -> dict:
    from remotefs_aa.objects import Snapshot, Volume

    template = overlay_template(workdir)
    shares = {}
    for n in SHARE_SIZES:
        path = os.path.join(workdir, "data", f"share-{n}")
        t0 = time.monotonic()
        fill_share(path, n, template)
        log(f"share of {n} volumes filled in {time.monotonic() - t0:.1f} s")
        shares[str(n)] = path
    drivers = start_drivers(workdir, shares)
    samples: dict[str, dict[str, list[float]]] = {n: {op: [] for op in SHARE_OPS} for n in shares}
    rng = random.Random(args.seed)
    for r in range(args.warmup + args.rounds):
        order = list(shares)
        rng.shuffle(order)
        for n in order:
            d, s = drivers[n], samples[n]
            keep = r >= args.warmup
            vol = Volume(size=1)
            clone = Volume(size=1)
            snap = Snapshot(vol)

            def place(v: Any, update: dict) -> None:
                v.provider_location = update["provider_location"]

            ms = {
                "create_volume": timed(lambda: place(vol, d.create_volume(vol))),  # noqa: B023
                "snapshot_create": timed(lambda: d.create_snapshot(snap)),  # noqa: B023
                "clone": timed(lambda: place(clone, d.create_cloned_volume(clone, vol))),  # noqa: B023
                "snapshot_delete": timed(lambda: d.delete_snapshot(snap)),  # noqa: B023
            }
            deletes = [timed(lambda: d.delete_volume(clone)), timed(lambda: d.delete_volume(vol))]  # noqa: B023
            ms["stats"] = timed(lambda: d.get_volume_stats())  # noqa: B023
            ms["stats_refresh"] = timed(lambda: d.get_volume_stats(refresh=True))  # noqa: B023
            if r < args.warmup + args.list_rounds:
                ms["list_volumes"] = timed(lambda: d.list_volumes())  # noqa: B023
            if keep:
                for op, value in ms.items():
                    s[op].append(value)
                s["delete_volume"].extend(deletes)
        log(f"share round {r + 1}/{args.warmup + args.rounds}")
    return {"samples_ms": samples}


# -- chain depth -------------------------------------------------------------


def run_depth(workdir: str, args: argparse.Namespace, log: Callable[[str], None]) -> dict:
    from remotefs_aa.objects import Snapshot, Volume

    share = os.path.join(workdir, "data", "share-depth")
    d = start_drivers(workdir, {"depth": share})["depth"]
    chains: dict[int, tuple[Any, list[Any]]] = {}
    for depth in DEPTHS:
        vol = Volume(size=1)
        vol.provider_location = d.create_volume(vol)["provider_location"]
        snaps = []
        for _ in range(depth):
            snaps.append(Snapshot(vol))
            d.create_snapshot(snaps[-1])
        chains[depth] = (vol, snaps)
    log("chains built")
    samples: dict[str, dict[str, list[float]]] = {
        str(depth): {op: [] for op in DEPTH_OPS} for depth in DEPTHS
    }
    rng = random.Random(args.seed)
    for r in range(args.warmup + args.rounds):
        order = [(depth, op) for depth in DEPTHS for op in DEPTH_OPS]
        rng.shuffle(order)
        for depth, op in order:
            vol, snaps = chains[depth]
            if op == "snapshot_create":
                snap = Snapshot(vol)
                ms = timed(lambda: d.create_snapshot(snap))  # noqa: B023
                d.delete_snapshot(snap)
            elif op == "snapshot_delete_newest":
                ms = timed(lambda: d.delete_snapshot(snaps[-1]))  # noqa: B023
                snaps[-1] = Snapshot(vol)
                d.create_snapshot(snaps[-1])
            elif op == "snapshot_delete_middle":
                i = len(snaps) // 2 if len(snaps) > 1 else 0
                ms = timed(lambda: d.delete_snapshot(snaps[i]))  # noqa: B023
                # Keep the depth: a new snapshot on top (the chain is what counts).
                del snaps[i]
                snaps.append(Snapshot(vol))
                d.create_snapshot(snaps[-1])
            else:
                clone = Volume(size=1)

                def make(c: Any = clone) -> None:
                    c.provider_location = d.create_cloned_volume(c, vol)["provider_location"]  # noqa: B023

                ms = timed(make)
                d.delete_volume(clone)
            if r >= args.warmup:
                samples[str(depth)][op].append(ms)
        log(f"depth round {r + 1}/{args.warmup + args.rounds}")
    return {"samples_ms": samples}


# -- data --------------------------------------------------------------------

#: The bare convert's variants: extra qemu-img convert arguments, and whether
#: the result is fsync'd before the time is taken (the driver's always is).
CONVERTS = {
    "bare": ([], False),
    "bare+sync": ([], True),
    "none+sync": (["-t", "none", "-T", "none"], True),
    "offload+sync": (["-C"], True),
    "none+offload+sync": (["-t", "none", "-T", "none", "-C"], True),
}


def _convert(args: list[str], src: str, dst: str, sync: bool) -> None:
    _run("qemu-img", "convert", "-q", *args, "-f", "qcow2", "-O", "raw", src, dst)
    if sync:
        fd = os.open(dst, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def run_data(workdir: str, args: argparse.Namespace, log: Callable[[str], None]) -> dict:
    from remotefs_aa.objects import Snapshot, Volume

    share = os.path.join(workdir, "data", "share-data")
    d = start_drivers(workdir, {"data": share})["data"]
    bare_dir = os.path.join(workdir, "data", "bare-data")
    os.makedirs(bare_dir, exist_ok=True)
    sizes = (0, 64) if args.quick else (0, 64, 1024)
    setups = {}
    for mib in sizes:
        size = max(1, -(-2 * mib * MiB // GiB))
        vol = Volume(size=size)
        vol.provider_location = d.create_volume(vol)["provider_location"]
        _fill(*image_of(d, vol), mib, 1)
        snap = Snapshot(vol)
        d.create_snapshot(snap)
        _fill(*image_of(d, vol), mib, 2, mib)
        top, _fmt = image_of(d, vol)
        setups[mib] = (vol, snap, top)
    log("data chains built")
    variants = ["clone", "from_snapshot", *CONVERTS]
    samples = {str(mib): {v: [] for v in variants} for mib in sizes}
    rng = random.Random(args.seed)
    rounds = max(3, args.rounds // 2)
    for r in range(rounds + 1):
        order = [(mib, v) for mib in sizes for v in variants]
        rng.shuffle(order)
        for mib, variant in order:
            vol, snap, top = setups[mib]
            if variant in ("clone", "from_snapshot"):
                new = Volume(size=vol.size)

                def make(n: Any = new, which: str = variant) -> None:
                    if which == "clone":
                        update = d.create_cloned_volume(n, vol)  # noqa: B023
                    else:
                        update = d.create_volume_from_snapshot(n, snap)  # noqa: B023
                    n.provider_location = update["provider_location"]

                ms = timed(make)
                d.delete_volume(new)
            else:
                dst = os.path.join(bare_dir, f"c-{uuid.uuid4().hex[:8]}")
                extra, sync = CONVERTS[variant]
                ms = timed(lambda: _convert(extra, top, dst, sync))  # noqa: B023
                os.unlink(dst)
            if r:  # the first round warms the page cache for every variant alike
                samples[str(mib)][variant].append(ms)
        log(f"data round {r + 1}/{rounds + 1}")
    return {"samples_ms": samples, "moved_mib": {str(m): 2 * m for m in sizes}}


# -- processes ---------------------------------------------------------------


def _cpu_of(pid: int) -> float:
    """CPU seconds of ``pid`` and its reaped children (utime, stime, cutime, cstime)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return sum(int(x) for x in fields[11:15]) / ticks


def _busy() -> tuple[float, float]:
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def _worker(config: str, go: Any, seconds: float, queue: Any) -> None:
    from remotefs_aa import service
    from remotefs_aa.objects import Snapshot, Volume
    from remotefs_aa.privsep import files

    driver = service.start(service.make_config(["--config-file", config]))
    try:
        vol = Volume(size=1)
        vol.provider_location = driver.create_volume(vol)["provider_location"]
        daemon = files.daemon_info()["pid"]
        queue.put("ready")
        start_at = go.get(timeout=600)  # once every worker is ready, however loaded the host
        time.sleep(max(0.0, start_at - time.time()))
        cpu0 = time.process_time() + _cpu_of(daemon)
        ops, end = 0, start_at + seconds
        while time.time() < end:
            snap = Snapshot(vol)
            driver.create_snapshot(snap)
            driver.delete_snapshot(snap)
            ops += 2
        cpu = time.process_time() + _cpu_of(daemon) - cpu0
        driver.delete_volume(vol)
        queue.put({"ops": ops, "cpu_s": cpu})
    finally:
        service.stop()


def run_parallel(workdir: str, args: argparse.Namespace, log: Callable[[str], None]) -> dict:
    share = os.path.join(workdir, "data", "share-parallel")
    os.makedirs(share, exist_ok=True)
    config = write_config(workdir, "parallel", share)
    ctx = multiprocessing.get_context("spawn")
    seconds = 4.0 if args.quick else args.parallel_seconds
    runs: dict[str, list[dict]] = {str(p): [] for p in (1, 2, 4)}
    order = [p for p in (1, 2, 4) for _ in range(args.parallel_repeats)]
    random.Random(args.seed).shuffle(order)
    for procs in order:
        queue, go = ctx.Queue(), ctx.Queue()
        workers = [
            ctx.Process(target=_worker, args=(config, go, seconds, queue)) for _ in range(procs)
        ]
        for w in workers:
            w.start()
        for _ in workers:
            assert queue.get(timeout=600) == "ready"
        start_at = time.time() + 0.5
        for _ in workers:
            go.put(start_at)
        time.sleep(max(0.0, start_at - time.time()))
        busy0, total0 = _busy()
        time.sleep(seconds)
        busy1, total1 = _busy()
        results = [queue.get(timeout=120) for _ in workers]
        for w in workers:
            w.join(60)
        ops = sum(x["ops"] for x in results)
        cpu = sum(x["cpu_s"] for x in results)
        runs[str(procs)].append(
            {
                "ops_per_s": ops / seconds,
                "cpu_ms_per_op": 1000.0 * cpu / max(1, ops),
                "machine_busy": (busy1 - busy0) / max(1, total1 - total0),
            }
        )
        log(f"{procs} processes: {ops / seconds:.1f} operations/s")
    return {"runs": runs, "seconds": seconds}


# -- report ------------------------------------------------------------------


def _stat(values: list[float]) -> dict:
    if not values:
        return {"median": float("nan"), "p90": float("nan"), "n": 0}
    return {"median": statistics.median(values), "p90": percentile(values, 90), "n": len(values)}


def summarise(out: dict) -> dict:
    summary: dict[str, Any] = {}
    if "share" in out:
        s = out["share"]["samples_ms"]
        rows = {}
        for op in SHARE_OPS:
            stats = {n: _stat(s[n][op]) for n in s}
            small = stats[str(SHARE_SIZES[0])]["median"]
            big = stats[str(SHARE_SIZES[-1])]["median"]
            met = None if op in WHOLE_SHARE_OPS else big / small <= GOAL_SHARE
            rows[op] = {"stats": stats, "ratio": big / small, "met": met}
        summary["share"] = rows
    if "depth" in out:
        s = out["depth"]["samples_ms"]
        rows = {}
        for op in DEPTH_OPS:
            stats = {n: _stat(s[n][op]) for n in s}
            ratio = stats[str(DEPTHS[-1])]["median"] / stats[str(DEPTHS[0])]["median"]
            goal = op in ("snapshot_create", "snapshot_delete_newest")
            rows[op] = {
                "stats": stats,
                "ratio": ratio,
                "met": ratio <= GOAL_DEPTH if goal else None,
            }
        summary["depth"] = rows
    if "data" in out:
        s = out["data"]["samples_ms"]
        rows = {}
        for mib, variants in s.items():
            stats = {v: _stat(x) for v, x in variants.items()}
            ratio = stats["clone"]["median"] / stats["bare"]["median"]
            rows[mib] = {"stats": stats, "ratio": ratio, "met": ratio <= GOAL_CLONE}
        summary["data"] = rows
    if "parallel" in out:
        runs = out["parallel"]["runs"]
        rows = {}
        for p, results in runs.items():
            rows[p] = {
                k: statistics.median(r[k] for r in results)
                for k in ("ops_per_s", "cpu_ms_per_op", "machine_busy")
            }
        one = rows["1"]
        for row in rows.values():
            row["speedup"] = row["ops_per_s"] / one["ops_per_s"]
        summary["parallel"] = rows
    return summary


#: How a row's ``met`` reads in the report (None: no goal for that row).
VERDICT = {True: "goal met", False: "goal missed", None: ""}


def _ms(x: float) -> str:
    return "-" if x != x else (f"{x:.1f}" if x < 1000 else f"{x:,.0f}")


def _ratio_table(
    section: dict, sizes: tuple[int, ...], column: str, ratio: str, goal: float
) -> list[str]:
    """One row per operation: median / p90 at each size, the ratio and whether it met ``goal``."""
    headers = ["operation", *(column.format(n) for n in sizes), ratio, f"<= {goal}x"]
    rows = []
    for op, row in section.items():
        cells = [
            f"{_ms(row['stats'][str(n)]['median'])} / {_ms(row['stats'][str(n)]['p90'])}"
            for n in sizes
        ]
        rows.append([op, *cells, f"{row['ratio']:.2f}x", VERDICT[row["met"]]])
    return [render_table(headers, rows, right=set(range(1, len(sizes) + 2))), ""]


def report(out: dict) -> str:
    summary, meta = out["summary"], out["meta"]
    lines = ["", *machine_header(meta), ""]
    if "share" in summary:
        lines.append("Share size: ms per operation (median / p90), ratio of medians 5,000 : 10")
        lines += _ratio_table(summary["share"], SHARE_SIZES, "{} vols", "x 10", GOAL_SHARE)
    if "depth" in summary:
        lines.append("Chain depth: ms per operation (median / p90), ratio of medians 128 : 1")
        lines += _ratio_table(summary["depth"], DEPTHS, "depth {}", "x 1", GOAL_DEPTH)
    if "data" in summary:
        lines.append(
            "Data per layer (base + 1 overlay): ms (median / p90) and MB/s of data moved; "
            "'x bare' = clone median / bare qemu-img convert median"
        )
        variants = list(next(iter(summary["data"].values()))["stats"])
        headers = ["MiB per layer", *variants, "x bare", f"<= {GOAL_CLONE}x"]
        rows = []
        for mib, row in summary["data"].items():
            moved = 2 * int(mib) * MiB / 1e6
            cells = []
            for v in variants:
                med = row["stats"][v]["median"]
                rate = f" ({moved / (med / 1000):,.0f} MB/s)" if moved and med == med else ""
                cells.append(f"{_ms(med)} / {_ms(row['stats'][v]['p90'])}{rate}")
            rows.append([mib, *cells, f"{row['ratio']:.2f}x", VERDICT[row["met"]]])
        lines += [render_table(headers, rows, right=set(range(1, len(headers) - 1))), ""]
    if "parallel" in summary:
        lines.append(
            f"Processes on distinct volumes (snapshot create + delete loop, "
            f"{out['parallel']['seconds']:.0f} s each, medians of repeats)"
        )
        headers = ["processes", "operations/s", "x 1 process", "CPU ms / op", "machine CPU busy"]
        rows = [
            [
                p,
                f"{r['ops_per_s']:.1f}",
                f"{r['speedup']:.2f}x",
                f"{r['cpu_ms_per_op']:.1f}",
                f"{100 * r['machine_busy']:.0f} %",
            ]
            for p, r in summary["parallel"].items()
        ]
        lines += [render_table(headers, rows, right={1, 2, 3, 4}), ""]
        top = summary["parallel"][max(summary["parallel"], key=int)]
        cpu_bound = top["machine_busy"] >= 0.9
        lines.append(
            f"parallel: {'goal met' if cpu_bound else 'goal missed'} (with the most processes "
            f"the machine's CPUs were {100 * top['machine_busy']:.0f} % busy; "
            f"{meta['cpus']} CPUs)"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds, no 1 GiB case")
    p.add_argument("--rounds", type=int, help="timed rounds per axis (default 12, quick 4)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    p.add_argument(
        "--list-rounds", type=int, default=3, help="rounds that also time list_volumes (3)"
    )
    p.add_argument("--sections", default=",".join(SECTIONS), help="which axes (all)")
    p.add_argument("--parallel-seconds", type=float, default=10.0)
    p.add_argument("--parallel-repeats", type=int, help="repeats per process count (3, quick 1)")
    p.add_argument("--share-sizes", default="10,1000,5000", help="volumes per share")
    p.add_argument("--depths", default="1,8,64,128", help="chain depths")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", metavar="PATH", help="also write every figure as JSON")
    args = p.parse_args(argv)
    args.rounds = args.rounds or (4 if args.quick else 12)
    args.parallel_repeats = args.parallel_repeats or (1 if args.quick else 3)
    global SHARE_SIZES, DEPTHS
    SHARE_SIZES = tuple(int(x) for x in args.share_sizes.split(","))
    DEPTHS = tuple(int(x) for x in args.depths.split(","))
    args.sections = [s for s in args.sections.split(",") if s]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("run this benchmark as root (qemu-io writes test data as root)")
    load = os.getloadavg()
    started = time.monotonic()
    random.seed(args.seed)
    out: dict[str, Any] = {}
    runners = {"share": run_share, "depth": run_depth, "data": run_data, "parallel": run_parallel}

    def log(text: str) -> None:
        print(f"[{time.monotonic() - started:6.0f} s, load {os.getloadavg()[0]:.1f}] {text}",
              file=sys.stderr, flush=True)  # fmt: skip

    from remotefs_aa import service

    for section in args.sections:
        workdir = tempfile.mkdtemp(prefix=f"rfsaa-scale-{section}-", dir="/var/tmp")
        try:
            out[section] = runners[section](workdir, args, log)
        finally:
            service.stop()
            with contextlib.suppress(OSError):
                shutil.rmtree(workdir)
    meta = machine_meta(("oslo.privsep", "tooz"), load)
    meta["loadavg_end"] = os.getloadavg()
    meta["wall_s"] = time.monotonic() - started
    meta["args"] = vars(args)
    out["meta"] = meta
    out["summary"] = summarise(out)
    publish(report(out), out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
