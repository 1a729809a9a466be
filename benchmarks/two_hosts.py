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
``--duration`` seconds: read the volume's snapshots (lock-free, as a service's
database would know them), then call the driver's public ``create_snapshot``
if there are fewer than ``--depth`` (else ``delete_snapshot`` of a random one),
as a volume service does: only the driver's own locks keep the hosts apart.
Each worker writes a history (remotefs_aa.history); the wait for the lock and
the time the lock was held come from the driver's own log records for the
call, and afterwards the checker (remotefs_aa.checker) replays both histories
against the chain.

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
    """One host: create or delete a snapshot through the driver's front door, until the deadline."""
    from remotefs_aa import history, service, workload
    from remotefs_aa.objects import Snapshot, Volume

    conf = service.make_config(["--config-file", args.config])
    driver = service.start(conf)
    rng = random.Random(args.seed)
    vol = Volume(id=args.volume, size=1, provider_location=args.share)
    view = Volume(id=args.volume, size=0, provider_location=args.share)
    records = []
    errors = []
    with history.capturing() as capture:
        rec = workload.Workspace(args.workspace).recorder(capture, args.seed, conf.host)
        try:
            print("ready", flush=True)
            sys.stdin.readline()  # the parent starts both hosts at once
            deadline = time.monotonic() + args.duration
            in_a_row = 0
            while time.monotonic() < deadline:
                # A lock-free read: another host may change the chain before the call.
                snaps = list(driver.verify_volume(view, deep=False).get("snapshots", {}))
                if len(snaps) < args.depth:
                    snap = Snapshot(vol)
                    done = rec.call(
                        "create_snapshot",
                        driver.create_snapshot,
                        snap,
                        fields={"volume": vol.id, "snapshot": snap.id, "size": 1},
                    )
                else:
                    snap = Snapshot(vol, id=rng.choice(snaps))
                    done = rec.call(
                        "delete_snapshot",
                        driver.delete_snapshot,
                        snap,
                        fields={"volume": vol.id, "snapshot": snap.id, "size": 1},
                    )
                r = done.record
                if not done.ok:
                    errors.append(f"{r['error']['class']}: {r['error']['message']}")
                    in_a_row += 1
                    if in_a_row >= 20:  # the chain or the mount is broken: more proves nothing
                        errors.append("stopped after 20 failed calls in a row")
                        break
                    continue
                in_a_row = 0
                held = (r["held_until"] or r["end"]) - (r["held_from"] or r["start"])
                records.append(
                    {
                        "op": "create" if r["kind"] == "create_snapshot" else "delete",
                        "noop": r["noop"],
                        "wait_s": r["lock_wait"] or 0.0,
                        "op_s": held,
                        "end": r["end"],
                    }
                )
        finally:
            rec.close()
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
                from remotefs_aa import workload
                from remotefs_aa.objects import Volume

                workspace = workload.Workspace(os.path.join(work, "setup", "state", "workload"))
                (volume_id,) = workload.prepare(driver, workspace, 1)
                vol = Volume(id=volume_id, size=1, provider_location=volume.share)
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
                        "--workspace",
                        workspace.root,
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
                report = workload.verify(driver, workspace)
                workload.cleanup(driver, workspace)
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
        # Both hosts may pick the same snapshot: the second delete finds it gone
        # and changes nothing. Those are counted apart, not in the rate.
        gone = sum(1 for x in r["records"] if x["noop"])
        recs = [x for x in r["records"] if not x["noop"]]
        total += len(recs)
        waits += [x["wait_s"] for x in r["records"]]  # a no-op waited for the lock too
        per_host[r["host"]] = {
            "operations": len(recs),
            "creates": sum(1 for x in recs if x["op"] == "create"),
            "deletes": sum(1 for x in recs if x["op"] == "delete"),
            "deletes_already_gone": gone,
            "op_median_ms": statistics.median([x["op_s"] for x in recs]) * 1000 if recs else None,
            "wait_median_ms": statistics.median([x["wait_s"] for x in r["records"]]) * 1000
            if r["records"]
            else None,
            "wait_max_ms": max([x["wait_s"] for x in r["records"]], default=0) * 1000,
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
        "chain_problems": report["errors"] + report["problems"],
        "checked": report["checked"],
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
                str(p["deletes_already_gone"]),
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
                "already gone",
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
        "chain after the run, replayed from both hosts' histories: "
        + (
            f"intact ({out['checked']['generations']} generations, every byte)"
            if not out["chain_problems"]
            else "; ".join(out["chain_problems"][:10])
        ),
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
    p.add_argument("--workspace", help=argparse.SUPPRESS)
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
