"""``python -m benchmarks.races``: run the study and write CSV, markdown, PNG and JSON."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time

from benchmarks._common import machine_header, machine_meta
from benchmarks.races import report, runner
from benchmarks.races.strategies import CORRECT, STRATEGIES
from benchmarks.races.topology import Lab

TOPOLOGIES = ["galera", "mariadb", "postgresql"]


def _terminate(signum: int, _frame: object) -> None:
    # Turn SIGTERM into an exception so every finally block stops its servers.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.races", description=__doc__)
    p.add_argument("--quick", action="store_true", help="the functional test's small run")
    p.add_argument("--topologies", default=",".join(TOPOLOGIES))
    p.add_argument("--strategies", default=",".join(CORRECT), help=f"of {', '.join(STRATEGIES)}")
    p.add_argument(
        "--workloads",
        default=None,
        help="names from the full set (default all), or 'seed' for the study's sizes",
    )
    p.add_argument(
        "--load",
        choices=["off", "on", "both"],
        default="both",
        help="the 50 synthetic workers: without, with, or both",
    )
    p.add_argument("--no-control", action="store_true", help="skip the negative control")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--procs", type=int, default=4, help='worker processes ("hosts")')
    p.add_argument("--check-timeout", type=float, default=5.0)
    p.add_argument("--out", default="races-out", help="directory for CSV, markdown and PNGs")
    p.add_argument("--json", default=None, help="also write every figure here")
    p.add_argument("--replot", metavar="JSON", help="only rewrite CSV, markdown, PNGs from JSON")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    if args.replot:
        return _replot(args.replot, args.out)

    strategies = [s for s in args.strategies.split(",") if s]
    for s in strategies:
        if s not in STRATEGIES:
            p.error(f"unknown strategy {s!r}")
    topologies = [t for t in args.topologies.split(",") if t]
    if args.quick:
        workloads = runner.QUICK_WORKLOADS
        cfg = runner.Config(
            check_timeout=2.0,
            acquire_timeout=30.0,
            release_timeout=20.0,
            run_timeout=60.0,
            procs=3,
            synthetic_workers=10,
        )
    else:
        pool = runner.SEED_WORKLOADS if args.workloads == "seed" else runner.FULL_WORKLOADS
        names = None if args.workloads in (None, "seed") else args.workloads.split(",")
        workloads = [w for w in pool if names is None or w.name in names]
        cfg = runner.Config(check_timeout=args.check_timeout, procs=args.procs)
    loads = ["off", "on"] if args.load == "both" else [args.load]
    os.makedirs(args.out, exist_ok=True)
    meta = machine_meta(("tooz", "PyMySQL", "psycopg2-binary", "redis", "matplotlib"))
    t0 = time.monotonic()

    done: list[dict] = []

    def progress(r: dict) -> None:
        # Written as we go: a run cut short still leaves its figures.
        done.append(r)
        report.write_csv(done, os.path.join(args.out, "races.partial.csv"))
        with open(os.path.join(args.out, "races.partial.json"), "w") as f:
            json.dump(
                {
                    "meta": {
                        **meta,
                        "wall_s": time.monotonic() - t0,
                        "loadavg_end": os.getloadavg(),
                    },
                    "results": done,
                },
                f,
            )
        print(
            f"  {r['topology']:<10} load {r['load']:<3} {r['workload']:<8} {r['strategy']:<16}"
            f" total {r['total_s']:6.1f} s  acq p50 {r['acquire_p50']:8.1f} p99"
            f" {r['acquire_p99']:8.1f} ms  deadlocks {r['deadlocks_sum']:5.0f}"
            f"  failed {r['changes_failed']}  violations {r['violations']}"
            f"  (load {r['loadavg_start']:.1f})",
            flush=True,
        )

    with Lab(topologies, dlm=any(STRATEGIES[s].lock_backend for s in strategies)) as lab:
        print(f"lab up: {lab.timings}", flush=True)
        out = runner.run(
            lab,
            topologies,
            strategies,
            workloads,
            loads,
            cfg,
            control=None if args.no_control else runner.CONTROL_WORKLOAD,
            repeat=args.repeat,
            on_result=progress,
        )
        out["lab_timings"] = dict(lab.timings)
    meta["wall_s"] = time.monotonic() - t0
    meta["loadavg_end"] = os.getloadavg()
    results = out["results"]
    csv_path = os.path.join(args.out, "races.csv")
    md_path = os.path.join(args.out, "races.md")
    report.write_csv(results, csv_path)
    for partial in ("races.partial.csv", "races.partial.json"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(args.out, partial))
    header = "\n".join(machine_header(meta))
    with open(md_path, "w") as f:
        f.write(header + "\n\n" + report.markdown(results))
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(report.summary(results))
    pngs = report.plots(results, args.out)
    print()
    print(header)
    print(f"lab start-up (s): {out['lab_timings']}")
    if out["synthetic"]:
        print(f"synthetic load achieved: {json.dumps(out['synthetic'])}")
    print(report.text_table(results))
    bad = [
        r for r in results if r["strategy"] in CORRECT and (r["violations"] or r["failed_workers"])
    ]
    missed = [r for r in results if r["strategy"] not in CORRECT and not r["violations"]]
    for r in bad:
        print(
            f"PROBLEM {r['topology']} {r['workload']} {r['strategy']}: "
            f"{r['violation_types']} failures {r['failures'][:2]} {r['violation_examples'][:2]}"
        )
    for r in missed:
        print(f"negative control NOT caught: {r['topology']} {r['workload']} load {r['load']}")
    print(f"\nwritten: {csv_path}, {md_path}" + "".join(f", {p}" for p in pngs))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, **out}, f, indent=1, default=str)
    return 1 if bad or missed else 0


def _replot(path: str, out_dir: str) -> int:
    with open(path) as f:
        data = json.load(f)
    os.makedirs(out_dir, exist_ok=True)
    results = data["results"]
    report.write_csv(results, os.path.join(out_dir, "races.csv"))
    with open(os.path.join(out_dir, "races.md"), "w") as f:
        f.write("\n".join(machine_header(data["meta"])) + "\n\n" + report.markdown(results))
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(report.summary(results))
    for png in report.plots(results, out_dir):
        print(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
