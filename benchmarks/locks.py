"""What remotefs_aa's locking costs on top of the lock backends it wraps.

Every volume operation takes its locks through ``coordination.synchronized``,
so the wrapper (name rendering, sorting, logging, the provider's reconnect
bookkeeping) is paid on every call. This script measures, for each backend in
one run and side by side, because the machines these run on are shared and
noisy, so only ratios taken under the same conditions mean anything:

1. uncontended acquire+release latency of the bare backend lock, our
   provider's lock, ``coordination.locked`` and a ``synchronized`` function,
   interleaved in randomly ordered blocks so drift hits every variant alike;
   the goal is that ``synchronized`` adds at most 10 % or at most 50 µs
   (either suffices) over the bare lock;
2. contended throughput and fairness: N spawned processes loop on
   ``synchronized`` over one name for a fixed time.

It is a benchmark, not a test: it reports whether the goal is met and never
fails on timing. Run it from the repository root::

    .venv/bin/python benchmarks/locks.py [--backends local,file,redis]
        [--rounds 100] [--duration 3] [--procs 4] [--json results.json]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import itertools
import logging
import math
import multiprocessing
import os
import queue
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

from oslo_concurrency import lockutils
from oslo_config import cfg
from tooz import coordination as tooz_coordination

from remotefs_aa import coordination, exception, opts

# Run as a script (python benchmarks/locks.py): make the repo root importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._common import machine_header, machine_meta, percentile, publish, render_table

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ("local", "file", "redis", "zookeeper", "etcd", "memcached", "mysql", "postgresql")
SERVER_BACKENDS = frozenset({"redis", "zookeeper", "etcd", "memcached", "mysql", "postgresql"})

#: The goal for the uncontended path: synchronized adds at most this much...
GOAL_PCT = 10.0
#: ...or at most this many microseconds over the bare backend lock.
GOAL_US = 50.0

#: What ``synchronized('{volume_id}')`` is called with, and the name it renders.
VOLUME_ID = "bench-volume-6f1c"
LOCK_NAME = coordination.LOCK_PREFIX + VOLUME_ID

#: Uncontended variants, cheapest first; "bare" is the goal's baseline.
VARIANTS = ("bare", "bare-reuse", "provider", "locked", "synchronized")

LOG = logging.getLogger("benchmarks.locks")

Settings = dict[str, str]


# --------------------------------------------------------------------------
# Configuration and backends
# --------------------------------------------------------------------------


def make_conf(settings: Settings) -> cfg.ConfigOpts:
    """A ConfigOpts as a service would build it, for one backend.

    ``settings`` is a plain dict (not a ConfigOpts) so that spawned worker
    processes can receive it and build the same configuration themselves.
    """
    conf = cfg.ConfigOpts()
    opts.register_opts(conf)
    conf([], project="remotefs_aa", default_config_files=[])
    conf.set_override("state_path", settings["state_path"])
    conf.set_override("lock_provider", settings["lock_provider"], group="coordination")
    if settings.get("backend_url"):
        conf.set_override("backend_url", settings["backend_url"], group="coordination")
    opts.validate(conf)
    return conf


def _servers() -> ModuleType:
    """The functional tests' server helpers (tests/ is not an installed package)."""
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    return importlib.import_module("tests.functional.servers")


def backend_available(backend: str) -> bool:
    """Whether the server binary a backend needs is installed."""
    if backend not in SERVER_BACKENDS:
        return True
    return bool(_servers().SERVERS[backend].available())


@contextlib.contextmanager
def backend_settings(backend: str, workdir: str) -> Iterator[Settings]:
    """Start what ``backend`` needs (a server, a directory); yield its settings."""
    state = os.path.join(workdir, backend)
    os.makedirs(state, exist_ok=True)
    if backend == "local":
        yield {"lock_provider": "local", "state_path": state}
    elif backend == "file":
        url = f"file://{state}/coordination"
        yield {"lock_provider": "tooz", "state_path": state, "backend_url": url}
    else:
        with _servers().running(backend) as server:
            yield {"lock_provider": "tooz", "state_path": state, "backend_url": server.url}


# --------------------------------------------------------------------------
# Statistics and tables
# --------------------------------------------------------------------------


def _fmt(value: float, digits: int = 1) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


# --------------------------------------------------------------------------
# Uncontended latency
# --------------------------------------------------------------------------


def _must(got: bool, what: str) -> None:
    if not got:
        raise RuntimeError(f"{what}: uncontended acquire returned False")


@contextlib.contextmanager
def uncontended_variants(
    settings: Settings, provider: coordination.LockProvider
) -> Iterator[dict[str, Callable[[], None]]]:
    """One acquire+release per call, for each variant, over the same lock name.

    "bare" makes a new lock object per call, as the wrapper does, so both sides
    do the same backend work; "bare-reuse" keeps one object, to show what the
    per-call lock object costs by itself.
    """
    closers: list[Callable[[], None]] = []
    new_lock: Callable[[], Any]
    if settings["lock_provider"] == "local":
        # The local provider's baseline is the file lock it wraps, on its file.
        path = os.path.join(settings["state_path"], "locks", LOCK_NAME)

        def new_lock() -> Any:
            return lockutils.InterProcessLock(path)

    else:
        coord = tooz_coordination.get_coordinator(
            settings["backend_url"], f"bench-bare-{os.getpid()}".encode()
        )
        coord.start()
        closers.append(coord.stop)

        def new_lock() -> Any:
            return coord.get_lock(LOCK_NAME.encode())

    def bare() -> None:
        lk = new_lock()
        _must(lk.acquire(), "bare")
        lk.release()

    reused = new_lock()

    def bare_reuse() -> None:
        _must(reused.acquire(), "bare-reuse")
        reused.release()

    def provider_lock() -> None:
        lk = provider.get_lock(LOCK_NAME)
        _must(lk.acquire(), "provider")
        lk.release()

    def locked() -> None:
        with coordination.locked(VOLUME_ID):
            pass

    @coordination.synchronized("{volume_id}")
    def guarded(volume_id: str) -> None:
        pass

    def synchronized() -> None:
        guarded(VOLUME_ID)

    try:
        yield {
            "bare": bare,
            "bare-reuse": bare_reuse,
            "provider": provider_lock,
            "locked": locked,
            "synchronized": synchronized,
        }
    finally:
        for close in closers:
            with contextlib.suppress(Exception):
                close()


def run_interleaved(
    variants: dict[str, Callable[[], None]],
    rounds: int,
    block: int,
    warmup: int,
    budget: float,
    seed: int,
) -> dict[str, Any]:
    """Time every variant in blocks whose order is shuffled each round.

    Interleaving is what makes the variants comparable on a noisy host: a
    slow minute is spread over all of them instead of hitting whichever ran
    then. ``budget`` (seconds) ends the rounds early on a slow backend.
    """
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            variants[name]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    block_medians: dict[str, list[float]] = {n: [] for n in names}
    rng = random.Random(seed)
    clock = time.perf_counter_ns
    began = time.monotonic()
    done = 0
    for _ in range(rounds):
        order = names[:]
        rng.shuffle(order)
        for name in order:
            op = variants[name]
            times = []
            for _ in range(block):
                t0 = clock()
                op()
                times.append((clock() - t0) / 1000.0)
            samples[name].extend(times)
            block_medians[name].append(statistics.median(times))
        done += 1
        if time.monotonic() - began > budget:
            break
    return {
        "rounds": done,
        "seconds": time.monotonic() - began,
        "samples": samples,
        "block_medians": block_medians,
    }


def summarize_uncontended(raw: dict[str, Any]) -> dict[str, Any]:
    """Median/p90/p99 per variant and the synchronized-over-bare overhead."""
    stats = {}
    for name, values in raw["samples"].items():
        stats[name] = {
            "n": len(values),
            "median_us": statistics.median(values),
            "p90_us": percentile(values, 90),
            "p99_us": percentile(values, 99),
            "max_us": max(values),
        }
    base = stats["bare"]["median_us"]
    sync = stats["synchronized"]["median_us"]
    blocks = raw["block_medians"]

    def paired(upper: str, lower: str) -> float:
        # Per round: each round's blocks ran within moments of each other, so
        # their difference is what drift affects least.
        return statistics.median(u - w for u, w in zip(blocks[upper], blocks[lower], strict=True))

    delta = paired("synchronized", "bare")
    overhead = {
        "delta_median_us": sync - base,
        "delta_median_pct": 100.0 * (sync - base) / base,
        "paired_delta_us": delta,
        "paired_delta_pct": 100.0 * delta / base,
        "delta_p99_us": stats["synchronized"]["p99_us"] - stats["bare"]["p99_us"],
        # Where the added time goes, one layer at a time.
        "layers_us": {
            "lock object": paired("bare", "bare-reuse"),
            "provider": paired("provider", "bare"),
            "locked()": paired("locked", "provider"),
            "synchronized()": paired("synchronized", "locked"),
        },
    }
    overhead["goal_met"] = delta <= GOAL_US or 100.0 * delta / base <= GOAL_PCT
    return {"rounds": raw["rounds"], "seconds": raw["seconds"], "stats": stats, **overhead}


def measure_uncontended(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """Start the provider as a service does, then time all variants interleaved."""
    provider = coordination.start(make_conf(settings))
    try:
        with uncontended_variants(settings, provider) as variants:
            gc.collect()
            raw = run_interleaved(
                variants,
                rounds=args.rounds,
                block=args.block,
                warmup=args.warmup,
                budget=args.budget,
                seed=args.seed,
            )
    finally:
        coordination.stop()
    return summarize_uncontended(raw)


# --------------------------------------------------------------------------
# Contended throughput and fairness
# --------------------------------------------------------------------------


def contended_worker(
    index: int,
    settings: Settings,
    duration: float,
    hold: float,
    ready: Any,
    go: Any,
    start_at: Any,
    results: Any,
) -> None:
    """One competing process: loop on ``synchronized`` of one name until the end.

    A wait is measured from calling the decorated function to the first line
    of its body, so it includes name rendering and the provider's retries.
    Only acquisitions before the end count as operations, but the wait of a
    call still pending at the end is kept: a starved process's wait is the
    figure that matters most.
    """
    logging.basicConfig(level=logging.WARNING)
    report: dict[str, Any] = {
        "index": index,
        "pid": os.getpid(),
        "ops": 0,
        "errors": 0,
        "waits": [],
        "acquired_at": [],
        "error": None,
    }
    started = False
    try:
        coordination.start(make_conf(settings))
        started = True

        @coordination.synchronized("{volume_id}")
        def guarded(volume_id: str) -> float:
            got = time.monotonic()
            if hold > 0:
                time.sleep(hold)
            return got

        ready.wait(timeout=120)
        if not go.wait(timeout=120):
            raise RuntimeError("never told to start")
        begin = start_at.value
        time.sleep(max(0.0, begin - time.monotonic()))
        end = begin + duration
        waits, acquired = report["waits"], report["acquired_at"]
        while True:
            t0 = time.monotonic()
            if t0 >= end:
                break
            try:
                got = guarded(VOLUME_ID)
            except exception.LockError:
                report["errors"] += 1
                continue
            waits.append(got - t0)
            acquired.append(got)
            if got < end:
                report["ops"] += 1
    except Exception as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"
        with contextlib.suppress(Exception):
            ready.abort()
    finally:
        if started:
            with contextlib.suppress(Exception):
                coordination.stop()
        results.put(report)


def _collect(results: Any, workers: list[Any], deadline: float) -> list[dict[str, Any]]:
    reports: list[dict[str, Any]] = []
    while len(reports) < len(workers) and time.monotonic() < deadline:
        try:
            reports.append(results.get(timeout=0.5))
        except queue.Empty:
            if not any(w.is_alive() for w in workers):
                with contextlib.suppress(queue.Empty):
                    while True:
                        reports.append(results.get(timeout=0.5))
                break
    return reports


def _stop_workers(workers: list[Any]) -> None:
    """End every worker we started, by its own handle; never leave one behind."""
    for w in workers:
        w.join(timeout=10)
    for w in workers:
        if w.is_alive():
            w.terminate()
            w.join(timeout=5)
        if w.is_alive():
            w.kill()
            w.join(timeout=5)


def measure_contended(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """Run ``args.procs`` spawned workers against one lock name; summarize."""
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Barrier(args.procs + 1)
    go = ctx.Event()
    start_at = ctx.Value("d", 0.0)
    results = ctx.Queue()
    workers = [
        ctx.Process(
            target=contended_worker,
            args=(i, settings, args.duration, args.hold, ready, go, start_at, results),
            name=f"lockbench-worker-{i}",
            daemon=True,
        )
        for i in range(args.procs)
    ]
    try:
        for w in workers:
            w.start()
        with contextlib.suppress(Exception):
            ready.wait(timeout=120)
        start_at.value = time.monotonic() + 0.2
        go.set()
        reports = _collect(results, workers, time.monotonic() + args.duration + 120)
    finally:
        _stop_workers(workers)
    return summarize_contended(reports, args)


def summarize_contended(reports: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Throughput, per-process shares, waits and how often the lock changed hands."""
    reports = sorted(reports, key=lambda r: r["index"])
    errors = [r["error"] for r in reports if r["error"]]
    total = sum(r["ops"] for r in reports)
    counts = [r["ops"] for r in reports] + [0] * (args.procs - len(reports))
    shares = [100.0 * c / total if total else 0.0 for c in counts]
    waits_ms = [w * 1000.0 for r in reports for w in r["waits"]]
    squares = sum(c * c for c in counts)
    jain = (total * total) / (len(counts) * squares) if squares else math.nan
    timeline = sorted((t, r["index"]) for r in reports for t in r["acquired_at"])
    switches = sum(1 for a, b in itertools.pairwise(timeline) if a[1] != b[1])
    return {
        "procs": args.procs,
        "duration_s": args.duration,
        "hold_s": args.hold,
        "total_ops": total,
        "ops_per_s": total / args.duration,
        "ops_per_proc": counts,
        "share_pct": shares,
        "jain_fairness": jain,
        "handoff_pct": 100.0 * switches / (len(timeline) - 1) if len(timeline) > 1 else math.nan,
        "wait_median_ms": statistics.median(waits_ms) if waits_ms else math.nan,
        "wait_p99_ms": percentile(waits_ms, 99),
        "wait_max_ms": max(waits_ms) if waits_ms else math.nan,
        "wait_max_per_proc_ms": [max(r["waits"], default=math.nan) * 1000.0 for r in reports],
        "lock_errors": sum(r["errors"] for r in reports),
        "worker_failures": errors + ["no report"] * (args.procs - len(reports)),
    }


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every selected backend, one after the other, in this one process."""
    workdir = tempfile.mkdtemp(prefix="rfsaa-lockbench-")
    out: dict[str, Any] = {"meta": _meta(args), "backends": {}}
    try:
        for backend in args.backends:
            if not backend_available(backend):
                print(f"[{backend}] skipped: server binary not installed", flush=True)
                out["backends"][backend] = {"skipped": "server binary not installed"}
                continue
            print(f"[{backend}] starting", flush=True)
            entry: dict[str, Any] = {}
            out["backends"][backend] = entry
            try:
                with backend_settings(backend, workdir) as settings:
                    entry["url"] = settings.get("backend_url", "(file locks)")
                    entry["uncontended"] = measure_uncontended(settings, args)
                    u = entry["uncontended"]
                    print(
                        f"[{backend}] uncontended: {u['rounds']} rounds in "
                        f"{u['seconds']:.1f} s, synchronized +{u['paired_delta_us']:.1f} µs",
                        flush=True,
                    )
                    if args.procs > 0 and args.duration > 0:
                        entry["contended"] = measure_contended(settings, args)
                        c = entry["contended"]
                        print(
                            f"[{backend}] contended: {c['ops_per_s']:.0f} ops/s",
                            flush=True,
                        )
            except Exception as exc:
                LOG.exception("backend %s failed", backend)
                entry["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    out["meta"]["loadavg_end"] = os.getloadavg()
    out["meta"]["wall_s"] = time.monotonic() - args.t0
    return out


def _meta(args: argparse.Namespace) -> dict[str, Any]:
    dists = ("tooz", "oslo.concurrency", "fasteners", "redis", "kazoo", "etcd3gw", "pymemcache")
    return {
        **machine_meta(dists),
        "args": {k: v for k, v in vars(args).items() if k not in ("t0", "json")},
        "goal": f"synchronized adds <= {GOAL_PCT:g} % or <= {GOAL_US:g} µs over bare",
    }


def report(out: dict[str, Any]) -> str:
    """The human-readable tables."""
    meta = out["meta"]
    a = meta["args"]
    lines = [
        "",
        *machine_header(meta),
        "",
        f"UNCONTENDED acquire+release, µs per operation (up to {a['rounds']} rounds x "
        f"{a['block']} ops per variant, variants interleaved in shuffled blocks)",
        "  bare        = backend lock alone, new lock object per op (local: oslo InterProcessLock)",
        "  bare-reuse  = backend lock alone, one lock object reused",
        "  provider    = provider.get_lock(name).acquire()/release()",
        "  locked      = with coordination.locked(name)",
        "  synchronized= @coordination.synchronized('{volume_id}') function call",
        "",
    ]
    rows = []
    for backend, entry in out["backends"].items():
        u = entry.get("uncontended")
        if u is None:
            rows.append([backend, "-", "-", "-", "-", "-", entry.get("skipped") or "error"])
            continue
        for i, name in enumerate(VARIANTS):
            s = u["stats"][name]
            rel = 100.0 * s["median_us"] / u["stats"]["bare"]["median_us"]
            rows.append(
                [
                    backend if i == 0 else "",
                    name,
                    str(s["n"]),
                    _fmt(s["median_us"]),
                    _fmt(s["p90_us"]),
                    _fmt(s["p99_us"]),
                    f"{rel:.0f} %",
                ]
            )
    lines.append(
        render_table(
            ["backend", "variant", "n", "median", "p90", "p99", "vs bare"],
            rows,
            right={2, 3, 4, 5, 6},
        )
    )
    lines += [
        "",
        f"OVERHEAD of synchronized over bare (goal: <= {GOAL_PCT:g} % OR <= {GOAL_US:g} µs; "
        "judged on the paired per-round median difference)",
        "",
    ]
    rows = []
    for backend, entry in out["backends"].items():
        u = entry.get("uncontended")
        if u is None:
            continue
        rows.append(
            [
                backend,
                _fmt(u["stats"]["bare"]["median_us"]),
                _fmt(u["stats"]["synchronized"]["median_us"]),
                _fmt(u["delta_median_us"]),
                _fmt(u["delta_median_pct"]),
                _fmt(u["paired_delta_us"]),
                _fmt(u["paired_delta_pct"]),
                _fmt(u["delta_p99_us"]),
                "goal met" if u["goal_met"] else "goal missed",
            ]
        )
    lines.append(
        render_table(
            [
                "backend",
                "bare med",
                "sync med",
                "Δ µs",
                "Δ %",
                "paired Δ µs",
                "paired Δ %",
                "Δ p99 µs",
                "verdict",
            ],
            rows,
            right=set(range(1, 8)),
        )
    )
    lines += [
        "",
        "WHERE THE OVERHEAD GOES: paired per-round median differences, µs",
        "  lock object    = bare (new object per op) - bare-reuse",
        "  provider       = provider.get_lock().acquire/release - bare",
        "  locked()       = coordination.locked - provider (ordering, wait watch, options, logs)",
        "  synchronized() = synchronized function - locked (name rendering, wrapper)",
        "",
    ]
    rows = []
    for backend, entry in out["backends"].items():
        u = entry.get("uncontended")
        if u is None:
            continue
        rows.append([backend, *(_fmt(v) for v in u["layers_us"].values())])
    layer_names = next(
        (
            list(e["uncontended"]["layers_us"])
            for e in out["backends"].values()
            if e.get("uncontended")
        ),
        [],
    )
    lines.append(render_table(["backend", *layer_names], rows))
    lines += [
        "",
        f"CONTENDED: {a['procs']} spawned processes, synchronized('{{volume_id}}') on one "
        f"name, {a['duration']:g} s each, hold {a['hold'] * 1000:g} ms",
        "  share = each process's part of all acquisitions; Jain = fairness index "
        "(1.0 = equal shares);",
        "  handoff = how often the next acquisition went to a different process",
        "",
    ]
    rows = []
    for backend, entry in out["backends"].items():
        c = entry.get("contended")
        if c is None:
            continue
        failures = c["worker_failures"]
        rows.append(
            [
                backend,
                _fmt(c["ops_per_s"], 0),
                "/".join(f"{s:.0f}" for s in c["share_pct"]),
                _fmt(c["jain_fairness"], 2),
                _fmt(c["handoff_pct"], 0),
                _fmt(c["wait_median_ms"], 3),
                _fmt(c["wait_p99_ms"], 1),
                _fmt(c["wait_max_ms"], 1),
                str(c["lock_errors"] + len(failures)),
            ]
        )
    lines.append(
        render_table(
            [
                "backend",
                "ops/s",
                "share % per proc",
                "Jain",
                "handoff %",
                "wait med ms",
                "wait p99 ms",
                "worst wait ms",
                "errors",
            ],
            rows,
            right={1, 3, 4, 5, 6, 7, 8},
        )
    )
    for backend, entry in out["backends"].items():
        if entry.get("error"):
            lines.append(f"\n{backend}: FAILED: {entry['error']}")
        for failure in (entry.get("contended") or {}).get("worker_failures", []):
            lines.append(f"\n{backend}: a worker failed: {failure}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line; defaults finish all six backends in about three minutes."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help=f"comma-separated subset of {','.join(BACKENDS)} (default: all)",
    )
    p.add_argument("--rounds", type=int, default=100, help="interleaved rounds (default 100)")
    p.add_argument("--block", type=int, default=10, help="ops per variant per round (default 10)")
    p.add_argument("--warmup", type=int, default=20, help="untimed ops per variant (default 20)")
    p.add_argument(
        "--budget",
        type=float,
        default=20.0,
        help="stop a backend's uncontended rounds after this many seconds (default 20)",
    )
    p.add_argument("--duration", type=float, default=3.0, help="contended seconds per backend")
    p.add_argument("--procs", type=int, default=4, help="contending processes (0: skip)")
    p.add_argument("--hold", type=float, default=0.0, help="seconds each holder keeps the lock")
    p.add_argument("--seed", type=int, default=1, help="seed of the block order shuffle")
    p.add_argument("--json", metavar="PATH", help="also write all results as JSON here")
    args = p.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(args.backends) - set(BACKENDS))
    if unknown:
        p.error(f"unknown backend(s): {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")
    if args.rounds < 1 or args.block < 1:
        p.error("--rounds and --block must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the tables, optionally write JSON."""
    # The level a service runs at by default: DEBUG lines are built lazily and
    # dropped, which is the cost being measured.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    args.t0 = time.monotonic()
    out = run(args)
    publish(report(out), out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
