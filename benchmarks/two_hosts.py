"""Two "hosts" on one GlusterFS volume hammer the snapshots of one volume, Active-Active.

Why: the point of remotefs_aa is several services on one share. This measures
what that gives on the worst case, one volume that both hosts change all the
time: throughput (operations/s), each host's share of the operations
(starvation shows here), and the lock waits (worst against median).

Setup (all real, all torn down at the end): a GlusterFS volume in its own
network namespace (tests/functional/gluster.py), a Redis server in that
namespace for the locks, and two worker processes, each with its own config
(``host``), its own GlusterFS mount (own ``glusterfs_mount_point_base``), its
own privileged daemon and its own lock connection. Each worker loops for
``--duration`` seconds: take the volume's lock, create a snapshot if the
volume has fewer than ``--depth`` snapshots (else delete a random one),
release. It records the wait for the lock and the time of each operation.

Reference (from the issue): Cinder's NFS driver on GlusterFS over FUSE with a
shared Redis lock did about 1.5-2 operations/s, one host starved (107 to 6),
worst wait 58 s. Goals: at least 3x that rate (>= 6 ops/s), no host below 35%
of the operations, worst lock wait at most 10x the median. A benchmark, not a
test: it prints "goal met"/"goal missed" and never fails on timing.

    .venv/bin/python -m benchmarks.two_hosts [--duration 30] [--depth 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from benchmarks._common import machine_header, machine_meta, percentile, publish, render_table  # noqa: E402

CINDER_OPS_PER_S = 2.0
GOAL_RATE_FACTOR = 3.0
GOAL_MIN_SHARE = 0.35
GOAL_WAIT_RATIO = 10.0


def write_config(directory: str, host: str, share: str, redis_url: str) -> str:
    os.makedirs(directory, exist_ok=True)
    shares = os.path.join(directory, "glusterfs_shares")
    with open(shares, "w") as f:
        f.write(share + "\n")
    path = os.path.join(directory, "rfsaa.conf")
    with open(path, "w") as f:
        f.write(
            f"[DEFAULT]\nstate_path = {directory}/state\nhost = {host}\ncluster = bench\n"
            f"volume_driver = glusterfs\nglusterfs_shares_config = {shares}\n"
            f"[privileged]\nmode = privsep\nroot_helper =\n"
            f"[coordination]\nbackend_url = {redis_url}\n"
        )
    return path


def worker(args: argparse.Namespace) -> int:
    """One host: lock, create or delete a snapshot, unlock; until the deadline."""
    from remotefs_aa import coordination, service
    from remotefs_aa.objects import Snapshot, Volume

    conf = service.make_config(["--config-file", args.config])
    driver = service.start(conf)
    rng = random.Random(args.seed)
    vol = Volume(id=args.volume, size=1, provider_location=args.share)
    create = driver.create_snapshot.__wrapped__
    delete = driver.delete_snapshot.__wrapped__
    records = []
    errors = []
    try:
        print("ready", flush=True)
        sys.stdin.readline()  # the parent starts both hosts at once
        deadline = time.monotonic() + args.duration
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            try:
                with coordination.locked(vol.id, purpose="two-host benchmark"):
                    t1 = time.monotonic()
                    snaps = list(driver.chain(vol).load().snapshots)
                    if len(snaps) < args.depth:
                        op = "create"
                        create(driver, Snapshot(vol))
                    else:
                        op = "delete"
                        delete(driver, Snapshot(vol, id=rng.choice(snaps)))
                    t2 = time.monotonic()
                records.append({"op": op, "wait_s": t1 - t0, "op_s": t2 - t1, "end": t2})
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        service.stop()
    print("result " + json.dumps({"host": conf.host, "records": records, "errors": errors}))
    return 0


def run(args: argparse.Namespace) -> dict:
    from remotefs_aa import service
    from tests.functional import gluster, servers

    work = tempfile.mkdtemp(prefix="rfsaa-twohosts-", dir="/var/tmp")
    volume = gluster.GlusterVolume(os.path.join(work, "gluster"))
    os.makedirs(volume.workdir)
    redis = servers.SERVERS["redis"](workdir=os.path.join(work, "redis"))
    os.makedirs(redis.workdir)
    procs: list[subprocess.Popen] = []
    try:
        volume.start()
        with gluster.entered(volume.netns_path):
            redis.start()
            configs = {
                h: write_config(os.path.join(work, h), h, volume.share, redis.url)
                for h in ("host-a", "host-b", "setup")
            }
            driver = service.start(service.make_config(["--config-file", configs["setup"]]))
            try:
                from remotefs_aa.objects import Volume

                vol = Volume(size=1)
                vol.provider_location = driver.create_volume(vol)["provider_location"]
                env = dict(os.environ, PYTHONPATH=REPO_ROOT)
                for i, host in enumerate(("host-a", "host-b")):
                    argv = [
                        sys.executable,
                        "-m",
                        "benchmarks.two_hosts",
                        "--worker",
                        "--config",
                        configs[host],
                        "--volume",
                        vol.id,
                        "--share",
                        volume.share,
                        "--duration",
                        str(args.duration),
                        "--depth",
                        str(args.depth),
                        "--seed",
                        str(i),
                    ]
                    procs.append(
                        subprocess.Popen(
                            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
                        )
                    )
                for proc in procs:
                    assert proc.stdout.readline().strip() == "ready"
                for proc in procs:
                    proc.stdin.write("go\n")
                    proc.stdin.flush()
                results = []
                for proc in procs:
                    out, _ = proc.communicate(timeout=args.duration + 300)
                    line = [x for x in out.splitlines() if x.startswith("result ")][-1]
                    results.append(json.loads(line[len("result ") :]))
                report = driver.verify_volume(vol)
                driver.delete_volume(vol)
                driver.unmount_shares()
            finally:
                service.stop()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        redis.cleanup()
        volume.cleanup()
        subprocess.run(["rm", "-rf", work], check=False)
    return summarize(results, report, args)


def summarize(results: list[dict], report: dict, args: argparse.Namespace) -> dict:
    per_host = {}
    waits = []
    total = 0
    for r in results:
        recs = r["records"]
        total += len(recs)
        waits += [x["wait_s"] for x in recs]
        per_host[r["host"]] = {
            "operations": len(recs),
            "creates": sum(1 for x in recs if x["op"] == "create"),
            "deletes": sum(1 for x in recs if x["op"] == "delete"),
            "op_median_ms": statistics.median([x["op_s"] for x in recs]) * 1000 if recs else None,
            "wait_median_ms": statistics.median([x["wait_s"] for x in recs]) * 1000
            if recs
            else None,
            "wait_max_ms": max([x["wait_s"] for x in recs], default=0) * 1000,
            "errors": r["errors"],
        }
    rate = total / args.duration
    shares = {h: (p["operations"] / total if total else 0) for h, p in per_host.items()}
    wait_median = statistics.median(waits) if waits else 0
    wait_max = max(waits, default=0)
    goals = [
        ("operations/s >= 3x Cinder's ~2/s", rate, rate >= GOAL_RATE_FACTOR * CINDER_OPS_PER_S),
        (
            "no host below 35% of the operations",
            min(shares.values(), default=0),
            min(shares.values(), default=0) >= GOAL_MIN_SHARE,
        ),
        (
            "worst lock wait <= 10x the median",
            (wait_max / wait_median) if wait_median else 0,
            wait_median > 0 and wait_max <= GOAL_WAIT_RATIO * wait_median,
        ),
    ]
    return {
        "duration_s": args.duration,
        "operations": total,
        "ops_per_s": rate,
        "share_per_host": shares,
        "per_host": per_host,
        "wait_median_ms": wait_median * 1000,
        "wait_p90_ms": percentile(waits, 90) * 1000,
        "wait_max_ms": wait_max * 1000,
        "chain_problems": report["problems"],
        "goals": [{"goal": g, "measured": m, "met": ok} for g, m, ok in goals],
    }


def report_text(out: dict) -> str:
    lines = ["", *machine_header(out["meta"], out["duration_s"]), ""]
    lines.append(
        f"{out['operations']} snapshot operations in {out['duration_s']:.0f} s on ONE volume by "
        f"two hosts (own GlusterFS mounts, own daemons, Redis locks): "
        f"{out['ops_per_s']:.1f} operations/s"
    )
    lines.append("")
    rows = []
    for host, p in out["per_host"].items():
        rows.append(
            [
                host,
                str(p["operations"]),
                f"{100 * out['share_per_host'][host]:.0f}%",
                f"{p['creates']}/{p['deletes']}",
                f"{p['op_median_ms']:.0f}",
                f"{p['wait_median_ms']:.0f}",
                f"{p['wait_max_ms']:.0f}",
                str(len(p["errors"])),
            ]
        )
    lines.append(
        render_table(
            [
                "host",
                "ops",
                "share",
                "create/delete",
                "op median ms",
                "wait median ms",
                "wait max ms",
                "errors",
            ],
            rows,
        )
    )
    lines += [
        "",
        f"lock wait, both hosts: median {out['wait_median_ms']:.0f} ms, p90 "
        f"{out['wait_p90_ms']:.0f} ms, worst {out['wait_max_ms']:.0f} ms",
        "chain after the run: "
        + ("intact" if not out["chain_problems"] else "; ".join(out["chain_problems"])),
        "",
    ]
    rows = [
        [g["goal"], f"{g['measured']:.2f}", "goal met" if g["met"] else "goal missed"]
        for g in out["goals"]
    ]
    lines.append(render_table(["goal", "measured", "verdict"], rows, right={1}))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=30.0, help="seconds (default 30)")
    p.add_argument("--depth", type=int, default=3, help="snapshots kept at most (default 3)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--volume", help=argparse.SUPPRESS)
    p.add_argument("--share", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if os.geteuid() != 0:
        raise SystemExit("run as root: it starts glusterd and mounts")
    load = os.getloadavg()
    started = time.monotonic()
    out = run(args)
    meta = machine_meta(("tooz", "redis", "oslo.privsep"), load)
    meta["loadavg_end"] = os.getloadavg()
    meta["wall_s"] = time.monotonic() - started
    out["meta"] = meta
    publish(report_text(out), out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
