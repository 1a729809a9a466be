"""What it costs to run a command as root: our privsep daemon against the alternatives.

remotefs_aa runs every privileged command (qemu-img above all) inside a
long-lived oslo.privsep daemon through ``remotefs_aa.privsep.runner.run``. The
point of that design is speed and least privilege: the classic OpenStack way,
``sudo oslo-rootwrap`` per call, starts sudo and a whole Python interpreter
(which loads its filters) for every command. This script measures, in one run
and interleaved so that machine drift hits every path alike (the machines
these run on are shared and noisy, so only ratios taken under the same
conditions mean anything), three workloads:

* ``/bin/true``: the cheapest possible command, so the overhead shows;
* ``qemu-img --version``: a real binary with real start-up cost;
* a pure no-op: no process at all, only the round trip to the daemon;

through these paths:

a. ``direct``: ``subprocess.run`` from this (root) process, the floor; for the
   no-op a plain Python function call;
b. ``ours``: an oslo.privsep daemon (our transport is oslo.privsep's own) running
   the command with ``runner.run``, the code path of our qemu entrypoints; the
   no-op is ``remotefs_aa.privsep.files.ping()`` through our real file context
   and helper (``remotefs-aa-privsep-helper``, which serves only our own
   contexts, so the command-running one is started by ``privsep-helper``);
c. ``stock privsep``: that daemon running the command with oslo.concurrency's
   ``processutils.execute``, as most OpenStack privsep entrypoints do;
d. ``rootwrap daemon``: stock ``oslo-rootwrap-daemon`` started with sudo, through
   ``oslo_rootwrap.client.Client``;
e. ``sudo rootwrap``: ``sudo oslo-rootwrap CONF CMD`` forked per call (legacy).

The goals: our daemon runs ``/bin/true`` within 1.7x of direct, at least 80x
faster than sudo per call, and faster than the stock rootwrap daemon. It is a
benchmark, not a test: it says "goal met" or "goal missed" and never fails on
timing. It must run as root, and as the module ``benchmarks.privileged_exec``
(the privsep helper imports the benchmark's own context by that name). From
the repository root::

    .venv/bin/python -m benchmarks.privileged_exec [--rounds 1200]
        [--sudo-rounds 30] [--json results.json]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import math
import os
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

from oslo_concurrency import processutils
from oslo_config import cfg
from oslo_privsep import priv_context

from benchmarks._common import machine_header, machine_meta, percentile, publish, render_table
from remotefs_aa import opts, privsep
from remotefs_aa.privsep import HELPER_NAME, files, runner

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.dirname(sys.executable)

if __name__ == "__main__":
    # oslo.privsep only accepts entrypoints whose __module__ starts with the
    # context's prefix, and privsep-helper finds the context by its dotted
    # name; neither works for a module called "__main__". So run the same
    # file again under its importable name and hand over to it.
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    from benchmarks.privileged_exec import main as _main

    sys.exit(_main())

#: The fixed commands; entrypoints take a key of this table, never an argv,
#: like the real entrypoints (none of which runs an arbitrary command).
COMMANDS: dict[str, list[str]] = {
    "true": ["/bin/true"],
    "qemu-img": ["qemu-img", "--version"],
}
WORKLOADS = ("true", "qemu-img", "noop")
WORKLOAD_TITLES = {
    "true": "/bin/true",
    "qemu-img": "qemu-img --version",
    "noop": "no-op (no process: call overhead / daemon round trip only)",
}
PATHS = ("direct", "ours", "stock-privsep", "rootwrap-daemon", "sudo-rootwrap")
PATH_LABELS = {
    "direct": "a direct subprocess.run",
    "ours": "b ours: privsep + runner.run",
    "stock-privsep": "e stock: privsep + processutils",
    "rootwrap-daemon": "c stock oslo-rootwrap-daemon",
    "sudo-rootwrap": "d sudo oslo-rootwrap per call",
}
NOOP_LABELS = {
    "direct": "a direct Python call",
    "ours": "b ours: files.ping()",
}

#: Goals for /bin/true, judged on the ratio of medians.
GOAL_DIRECT_RATIO = 1.7
GOAL_SUDO_SPEEDUP = 80.0

COMMAND_TIMEOUT = 60.0

#: The benchmark's own privsep context, with the capabilities of the real file
#: context (the one qemu-img runs in); started by oslo.privsep's privsep-helper.
BENCH_SECTION = "remotefs_aa_benchmark_privsep"
bench_pctxt = priv_context.PrivContext(
    "benchmarks",
    cfg_section=BENCH_SECTION,
    pypath=__name__ + ".bench_pctxt",
    capabilities=privsep.FILES_CAPS,
)

LOG = logging.getLogger("benchmarks.privileged_exec")

Variant = tuple[str, str]  # (workload, path)


# --------------------------------------------------------------------------
# Entrypoints run inside the benchmark's daemon
# --------------------------------------------------------------------------


@bench_pctxt.entrypoint
def run_with_runner(command: str) -> str:
    """Path b: the code path our real qemu entrypoints use, ``runner.run``."""
    _rc, out, _err = runner.run(COMMANDS[command], timeout=COMMAND_TIMEOUT)
    return out


@bench_pctxt.entrypoint
def run_with_processutils(command: str) -> str:
    """Path e: what a stock privsep entrypoint does, ``processutils.execute``."""
    out, _err = processutils.execute(*COMMANDS[command])
    return out


@bench_pctxt.entrypoint
def daemon_pid() -> int:
    """The daemon's pid, so that it can be checked to be gone at the end."""
    return os.getpid()


# --------------------------------------------------------------------------
# Statistics and tables (same conventions as locks.py)
# --------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


def _ratio(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:.2f}x" if value < 10 else f"{value:.0f}x"


# --------------------------------------------------------------------------
# Setup: config files, daemons, callables
# --------------------------------------------------------------------------


def write_service_conf(workdir: str) -> str:
    """The service config privsep-helper is started with (root_helper empty: we are root)."""
    state = os.path.join(workdir, "state")
    os.makedirs(state, exist_ok=True)
    path = os.path.join(workdir, "remotefs_aa.conf")
    with open(path, "w") as f:
        f.write(
            f"[DEFAULT]\nstate_path = {state}\n"
            f"[privileged]\nmode = privsep\nroot_helper =\nallowed_paths = {state}\n"
        )
    return path


def write_rootwrap_conf(workdir: str) -> str:
    """rootwrap.conf plus a filters dir allowing exactly the benchmark's commands.

    Written by root into a root-owned temporary directory, which is what
    oslo.rootwrap insists on.
    """
    filters_dir = os.path.join(workdir, "rootwrap.d")
    os.makedirs(filters_dir, exist_ok=True)
    with open(os.path.join(filters_dir, "benchmark.filters"), "w") as f:
        f.write(
            "[Filters]\n"
            "true: CommandFilter, /bin/true, root\n"
            "qemu-img: CommandFilter, qemu-img, root\n"
        )
    path = os.path.join(workdir, "rootwrap.conf")
    with open(path, "w") as f:
        f.write(
            "[DEFAULT]\n"
            f"filters_path = {filters_dir}\n"
            "exec_dirs = /usr/local/sbin,/usr/local/bin,/usr/sbin,/usr/bin,/sbin,/bin\n"
            "use_syslog = False\n"
        )
    return path


def start_privsep(service_conf: str) -> None:
    """Configure both our real contexts and the benchmark's, as a service would.

    The benchmark's daemon needs ``benchmarks`` importable, hence PYTHONPATH
    in its helper command; otherwise it is started exactly like ours. The
    daemons themselves start on the first call.
    """
    conf = cfg.ConfigOpts()
    opts.register_opts(conf)
    privsep.register_opts(conf)
    conf(["--config-file", service_conf], project="remotefs_aa", default_config_files=[])
    privsep.init(conf)
    for ctx, helper in ((bench_pctxt, "privsep-helper"),):
        command = shlex.join(
            [
                "env",
                f"PYTHONPATH={REPO_ROOT}",
                os.path.join(VENV_BIN, helper),
                "--config-file",
                service_conf,
            ]
        )
        ctx.set_client_mode(True)
        cfg.CONF.set_override("helper_command", command, group=ctx.cfg_section)


def _wait_gone(pid: int | None, timeout: float = 5.0) -> bool:
    """Wait for a daemon we started to exit; SIGTERM it (by pid) if it does not."""
    if pid is None:
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not os.path.exists(f"/proc/{pid}"):
            return True
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    return not os.path.exists(f"/proc/{pid}")


def stop_privsep(pids: list[int]) -> None:
    """Close the channels (the daemons exit on EOF) and make sure they did."""
    with contextlib.suppress(Exception):
        privsep.stop()
    for ctx in (bench_pctxt,):
        if ctx.channel is not None:
            with contextlib.suppress(Exception):
                ctx.stop()
    for pid in pids:
        if not _wait_gone(pid):
            LOG.warning("privsep daemon %s did not exit", pid)


def stop_rootwrap(client: Any) -> None:
    """Ask the rootwrap daemon to shut down; then reap the sudo process we started.

    oslo_rootwrap.client has no public stop: the client's finalizer, run
    here explicitly, is what sends the shutdown request.
    """
    finalize = getattr(client, "_finalize", None)
    process = getattr(client, "_process", None)
    if finalize is not None:
        with contextlib.suppress(Exception):
            finalize()
    if process is not None and process.poll() is None:
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)


def _direct(argv: list[str]) -> Callable[[], None]:
    def call() -> None:
        subprocess.run(argv, capture_output=True, check=True)

    return call


def _noop() -> bool:
    return True


def _rootwrap(client: Any, argv: list[str]) -> Callable[[], None]:
    def call() -> None:
        rc, _out, err = client.execute(argv)
        if rc != 0:
            raise RuntimeError(f"rootwrap daemon: {argv} exited {rc}: {err}")

    return call


def _sudo(rootwrap_conf: str, argv: list[str]) -> Callable[[], None]:
    # Really through sudo: processutils.execute(root_helper=...) drops the
    # root helper when the caller is already root, which would measure nothing.
    full = ["sudo", "-n", os.path.join(VENV_BIN, "oslo-rootwrap"), rootwrap_conf, *argv]

    def call() -> None:
        subprocess.run(full, capture_output=True, check=True)

    return call


def build_variants(client: Any, rootwrap_conf: str) -> dict[Variant, Callable[[], None]]:
    """One callable per (workload, path); each runs one command or one no-op."""
    variants: dict[Variant, Callable[[], None]] = {}
    for name, argv in COMMANDS.items():
        variants[name, "direct"] = _direct(argv)
        variants[name, "ours"] = lambda name=name: run_with_runner(name)
        variants[name, "stock-privsep"] = lambda name=name: run_with_processutils(name)
        variants[name, "rootwrap-daemon"] = _rootwrap(client, argv)
        variants[name, "sudo-rootwrap"] = _sudo(rootwrap_conf, argv)
    variants["noop", "direct"] = _noop
    variants["noop", "ours"] = files.ping
    return variants


def _timed(call: Callable[[], Any]) -> float:
    t0 = time.perf_counter_ns()
    call()
    return (time.perf_counter_ns() - t0) / 1000.0


def measure_startup(client: Any) -> dict[str, dict[str, Any]]:
    """First call of each daemon, which includes starting it."""
    return {
        "privsep (our file_pctxt)": {
            "started_by": f"{HELPER_NAME}, no sudo (root_helper empty)",
            "first_call_us": _timed(files.ping),
            "variant": ("noop", "ours"),
        },
        "privsep (benchmark ctx)": {
            "started_by": "env PYTHONPATH=... privsep-helper, no sudo",
            "first_call_us": _timed(lambda: run_with_runner("true")),
            "variant": ("true", "ours"),
        },
        "oslo-rootwrap-daemon": {
            "started_by": "sudo",
            "first_call_us": _timed(_rootwrap(client, COMMANDS["true"])),
            "variant": ("true", "rootwrap-daemon"),
        },
    }


# --------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------


def run_interleaved(
    variants: dict[Variant, Callable[[], None]],
    rounds: int,
    sudo_rounds: int,
    warmup: int,
    seed: int,
) -> dict[str, Any]:
    """Call every variant once per round, in an order shuffled every round.

    One call per variant per round, shuffled, is what makes the paths
    comparable on a noisy host: a slow second is spread over all of them
    instead of hitting whichever ran then. The sudo path costs ~100x more, so
    it runs in only ``sudo_rounds`` rounds, spread evenly over the run (not
    bunched at the start) so that it sees the same drift.
    """
    sudo_at = {i * rounds // sudo_rounds for i in range(min(sudo_rounds, rounds))}
    for key, call in variants.items():
        for _ in range(min(warmup, 2) if key[1] == "sudo-rootwrap" else warmup):
            call()
    keys = list(variants)
    by_round: dict[Variant, dict[int, float]] = {k: {} for k in keys}
    rng = random.Random(seed)
    clock = time.perf_counter_ns
    gc.collect()
    began = time.monotonic()
    for r in range(rounds):
        order = [k for k in keys if k[1] != "sudo-rootwrap" or r in sudo_at]
        rng.shuffle(order)
        for key in order:
            call = variants[key]
            t0 = clock()
            call()
            by_round[key][r] = (clock() - t0) / 1000.0
    return {"rounds": rounds, "seconds": time.monotonic() - began, "by_round": by_round}


def summarize(raw: dict[str, Any], startup: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Median/p90/p99 per variant, ratios to direct, goals and start-up times.

    Two ratios: median over median, which the goals use, and the median of
    per-round ratios (each call against the direct call of the same round),
    the figure least affected by drift; they should agree.
    """
    by_round: dict[Variant, dict[int, float]] = raw["by_round"]
    stats: dict[str, dict[str, dict[str, float]]] = {w: {} for w in WORKLOADS}
    for (workload, path), per_round in by_round.items():
        values = list(per_round.values())
        base = by_round[workload, "direct"]
        paired = [v / base[r] for r, v in per_round.items() if base.get(r)]
        stats[workload][path] = {
            "n": len(values),
            "median_us": statistics.median(values),
            "p90_us": percentile(values, 90),
            "p99_us": percentile(values, 99),
            "max_us": max(values),
            "paired_ratio": statistics.median(paired),
        }
    for workload in WORKLOADS:
        base = stats[workload]["direct"]["median_us"]
        for s in stats[workload].values():
            s["ratio"] = s["median_us"] / base

    true = stats["true"]
    ours = true["ours"]["median_us"]
    goals = [
        {
            "goal": f"ours within {GOAL_DIRECT_RATIO:g}x of direct (/bin/true)",
            "measured": true["ours"]["ratio"],
            "limit": f"<= {GOAL_DIRECT_RATIO:.2f}x",
            "met": true["ours"]["ratio"] <= GOAL_DIRECT_RATIO,
        },
        {
            "goal": f"ours >= {GOAL_SUDO_SPEEDUP:g}x faster than sudo oslo-rootwrap (/bin/true)",
            "measured": true["sudo-rootwrap"]["median_us"] / ours,
            "limit": f">= {GOAL_SUDO_SPEEDUP:.0f}x",
            "met": true["sudo-rootwrap"]["median_us"] / ours >= GOAL_SUDO_SPEEDUP,
        },
    ]
    for workload in COMMANDS:
        speedup = (
            stats[workload]["rootwrap-daemon"]["median_us"] / stats[workload]["ours"]["median_us"]
        )
        goals.append(
            {
                "goal": f"ours faster than stock rootwrap daemon ({WORKLOAD_TITLES[workload]})",
                "measured": speedup,
                "limit": "> 1.00x",
                "met": speedup > 1.0,
            }
        )
    # Where ours loses to direct: the daemon round trip (measured by the no-op)
    # and, the rest, running the command in the daemon rather than here.
    split = {
        "ours_minus_direct_us": true["ours"]["median_us"] - true["direct"]["median_us"],
        "round_trip_us": stats["noop"]["ours"]["median_us"],
    }
    for entry in startup.values():
        workload, path = entry["variant"]
        entry["steady_median_us"] = stats[workload][path]["median_us"]
        entry["startup_us"] = entry["first_call_us"] - entry["steady_median_us"]
    return {
        "rounds": raw["rounds"],
        "seconds": raw["seconds"],
        "stats": stats,
        "goals": goals,
        "overhead_split": split,
        "startup": {k: {**v, "variant": list(v["variant"])} for k, v in startup.items()},
        "samples_us": {
            f"{w}/{p}": [round(v, 1) for v in per_round.values()]
            for (w, p), per_round in by_round.items()
        },
    }


@contextlib.contextmanager
def environment() -> Iterator[tuple[Any, str, list[int]]]:
    """Temp dir, config files, privsep contexts and the rootwrap client; all undone on exit.

    Yields the rootwrap client, the rootwrap.conf path and a list the caller
    fills with the privsep daemons' pids, checked to be gone at the end.
    """
    from oslo_rootwrap import client as rootwrap_client  # only the benchmark process needs it

    workdir = tempfile.mkdtemp(prefix="rfsaa-execbench-")
    rw_client = None
    pids: list[int] = []
    try:
        service_conf = write_service_conf(workdir)
        rootwrap_conf = write_rootwrap_conf(workdir)
        start_privsep(service_conf)
        rw_client = rootwrap_client.Client(
            ["sudo", "-n", os.path.join(VENV_BIN, "oslo-rootwrap-daemon"), rootwrap_conf]
        )
        yield rw_client, rootwrap_conf, pids
    finally:
        if rw_client is not None:
            stop_rootwrap(rw_client)
        stop_privsep(pids)
        shutil.rmtree(workdir, ignore_errors=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start everything, time the first calls, then all variants interleaved."""
    if os.geteuid() != 0:
        raise SystemExit("run this benchmark as root (it starts root daemons)")
    with environment() as (client, rootwrap_conf, pids):
        startup = measure_startup(client)
        pids += [files.daemon_info()["pid"], daemon_pid()]
        print("daemons up; measuring", flush=True)
        variants = build_variants(client, rootwrap_conf)
        raw = run_interleaved(
            variants,
            rounds=args.rounds,
            sudo_rounds=args.sudo_rounds,
            warmup=args.warmup,
            seed=args.seed,
        )
    out = {"meta": _meta(args), **summarize(raw, startup)}
    out["meta"]["loadavg_end"] = os.getloadavg()
    out["meta"]["wall_s"] = time.monotonic() - args.t0
    return out


def _meta(args: argparse.Namespace) -> dict[str, Any]:
    meta = machine_meta(("oslo.privsep", "oslo.rootwrap", "oslo.concurrency"), args.loadavg_start)
    qemu = subprocess.run(["qemu-img", "--version"], capture_output=True, text=True, check=False)
    words = qemu.stdout.split()  # "qemu-img version 7.2.19 (Debian ...)"
    meta["versions"]["qemu-img"] = words[2] if len(words) > 2 else "?"
    return {
        **meta,
        "args": {k: v for k, v in vars(args).items() if k not in ("t0", "json", "loadavg_start")},
    }


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def report(out: dict[str, Any]) -> str:
    """The human-readable tables."""
    meta = out["meta"]
    a = meta["args"]
    lines = [
        "",
        *machine_header(meta, out["seconds"]),
        "",
        f"µs per call. {out['rounds']} rounds; every round calls each path once, in a "
        "shuffled order",
        f"(sudo path: {a['sudo_rounds']} rounds spread over the run). 'x direct' = median / "
        "direct median;",
        "'paired' = median over rounds of (call / direct call of the same round).",
        "  direct    = subprocess.run(argv, capture_output=True) in this root process",
        f"  ours      = lean privsep daemon via {HELPER_NAME}, entrypoint runs runner.run(argv)",
        "  stock privsep + runner.run = stock oslo.privsep transport and privsep-helper, "
        "same entrypoint",
        "  stock privsep + processutils = that daemon, entrypoint runs processutils.execute(*argv)",
        "  rootwrap daemon = oslo_rootwrap.client.Client(['sudo', 'oslo-rootwrap-daemon', "
        "conf]).execute(argv)",
        "  sudo      = subprocess.run(['sudo', 'oslo-rootwrap', conf, *argv]) per call",
    ]
    for workload in WORKLOADS:
        stats = out["stats"][workload]
        rows = []
        for path in PATHS:
            s = stats.get(path)
            if s is None:
                continue
            label = NOOP_LABELS[path] if workload == "noop" else PATH_LABELS[path]
            rows.append(
                [
                    label,
                    str(s["n"]),
                    _fmt(s["median_us"]),
                    _fmt(s["p90_us"]),
                    _fmt(s["p99_us"]),
                    _ratio(s["ratio"]),
                    _ratio(s["paired_ratio"]),
                ]
            )
        lines += ["", f"{WORKLOAD_TITLES[workload]}", ""]
        lines.append(
            render_table(["path", "n", "median", "p90", "p99", "x direct", "paired"], rows)
        )
    lines += ["", "GOALS (ratios of medians, /bin/true unless stated)", ""]
    rows = [
        [g["goal"], _ratio(g["measured"]), g["limit"], "goal met" if g["met"] else "goal missed"]
        for g in out["goals"]
    ]
    lines.append(render_table(["goal", "measured", "limit", "verdict"], rows, right={1, 2}))
    split = out["overhead_split"]
    lines += [
        "",
        f"ours - direct for /bin/true: {_fmt(split['ours_minus_direct_us'])} µs median, of which "
        f"{_fmt(split['round_trip_us'])} µs is the bare daemon round trip (files.ping)",
    ]
    lines += [
        "",
        "DAEMON START-UP: the first call starts the daemon; start-up ≈ first call - steady median",
        "",
    ]
    rows = [
        [
            name,
            e["started_by"],
            _fmt(e["first_call_us"] / 1000.0),
            _fmt(e["steady_median_us"] / 1000.0, 2),
            _fmt(e["startup_us"] / 1000.0),
        ]
        for name, e in out["startup"].items()
    ]
    lines.append(
        render_table(
            ["daemon", "started by", "first call ms", "steady ms", "start-up ms"],
            rows,
            right={2, 3, 4},
        )
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line; the defaults finish in well under two minutes on 2 cores."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=1200, help="interleaved rounds (default 1200)")
    p.add_argument(
        "--sudo-rounds",
        type=int,
        default=30,
        help="rounds that include the sudo-per-call path (~0.1 s a call; default 30)",
    )
    p.add_argument("--warmup", type=int, default=20, help="untimed calls per path (default 20)")
    p.add_argument("--seed", type=int, default=1, help="seed of the call order shuffle")
    p.add_argument("--json", metavar="PATH", help="also write all results as JSON here")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.sudo_rounds < 1:
        p.error("--rounds and --sudo-rounds must be at least 1")
    args.sudo_rounds = min(args.sudo_rounds, args.rounds)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the tables, optionally write JSON."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    args.t0 = time.monotonic()
    args.loadavg_start = os.getloadavg()
    out = run(args)
    publish(report(out), out, args.json)
    return 0
