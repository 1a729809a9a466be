"""What reading image headers in Python saves over ``qemu-img info``, per chain.

Before it touches a volume, remotefs_aa checks the volume's whole snapshot
chain: format, virtual size, backing file and its format, external data file
and encryption of every link (``image.chain.trusted_chain``). Those facts sit
in the first few hundred bytes of each qcow2 file, so
``remotefs_aa.privsep.qcow2.read_header`` reads them with one ``read`` per link
instead of starting a ``qemu-img`` process. This script measures what that
saves, on a chain of ``--depth`` qcow2 overlays over a raw base (the layout a
volume with that many snapshots has), per chain walk:

a. ``python``: ``read_header`` on each link, following the ``backing_file``
   names from the top down to the raw base;
b. ``qemu-img chain``: one ``qemu-img info --output=json --backing-chain -U``
   on the top, which is what the rootwrap modes (no direct file access) run;
c. ``qemu-img per link``: one ``qemu-img info --output=json -U`` per link,
   following ``backing-filename``, the naive way.

All three parse their output into the same fields, and the script checks that
they agree before timing anything. Every round runs each variant once, in a
shuffled order, so drift on a shared, noisy machine hits them alike; only the
ratios within one run mean anything. The files stay in the page cache
throughout, so this is the warm-cache cost, the common case for a service that
checks the same chains again and again. CPU caches are another matter: a
python walk that runs right after a qemu-img process finds them cold, and
costs about twice what it does in a tight loop; that is kept, because a
service also does other work between two checks.

It is a benchmark, not a test: it prints numbers and never fails on timing.
Run it from the repository root::

    .venv/bin/python benchmarks/image_header.py [--rounds 100] [--depth 8]
        [--json results.json]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

# Run as a script (python benchmarks/image_header.py): make the repo root importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._common import machine_header, machine_meta, percentile, publish, render_table
from remotefs_aa import exception
from remotefs_aa.privsep import qcow2

#: Variants in report order; the first is the baseline of every ratio.
VARIANTS = ("python", "python 4 KiB first", "qemu-img chain", "qemu-img per link")
#: What ``python 4 KiB first`` reads before it falls back to the full read.
FIRST_READ = 4096

#: The fields every variant reports for each link, compared before timing.
Link = tuple[str, str, int, str | None, str | None, str | None, bool]


# --------------------------------------------------------------------------
# The chain and the three ways to walk it
# --------------------------------------------------------------------------


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


def make_chain(workdir: str, depth: int, size: str) -> str:
    """A raw base and ``depth`` qcow2 overlays, each on the one below; the top's path.

    Names as a volume's snapshots have them (``volume-<id>.<snap>``), relative
    backing names, backing formats recorded, as remotefs_aa creates them.
    """
    base = "volume-bench"
    qemu_img("create", "-q", "-f", "raw", os.path.join(workdir, base), size)
    below, fmt = base, "raw"
    for i in range(1, depth + 1):
        name = f"{base}.snap-{i:02d}"
        qemu_img("create", "-q", "-f", "qcow2", "-b", below, "-F", fmt, os.path.join(workdir, name))
        below, fmt = name, "qcow2"
    return os.path.join(workdir, below)


def read_4k_first(path: str) -> qcow2.ImageHeader:
    """The removed alternative: 4 KiB first, the full read only if a field lies beyond."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        size = os.fstat(fd).st_size
        if size > FIRST_READ:
            with contextlib.suppress(exception.InvalidImage):
                return qcow2.parse_header(os.pread(fd, FIRST_READ, 0), size, path)
        return qcow2.parse_header(os.pread(fd, min(qcow2.READ_LIMIT, size), 0), size, path)
    finally:
        os.close(fd)


def walk_python(top: str, read: Callable[[str], Any] = qcow2.read_header) -> list[Link]:
    """(a) One read_header per link, following backing names (``read``: which reader)."""
    links: list[Link] = []
    path = top
    while True:
        h = read(path)
        links.append(
            (
                os.path.basename(path),
                h.format,
                h.virtual_size,
                h.backing_file,
                h.backing_format,
                h.data_file,
                h.encrypted,
            )
        )
        if not h.backing_file:
            return links
        path = os.path.join(os.path.dirname(path), h.backing_file)


def _link(info: dict) -> Link:
    data = (info.get("format-specific") or {}).get("data") or {}
    return (
        os.path.basename(info["filename"]),
        info["format"],
        info["virtual-size"],
        info.get("backing-filename"),
        info.get("backing-filename-format"),
        data.get("data-file"),
        bool(info.get("encrypted")),
    )


def walk_qemu_chain(top: str) -> list[Link]:
    """(b) One qemu-img process for the whole chain."""
    out = qemu_img("info", "--output=json", "--backing-chain", "-U", top)
    return [_link(info) for info in json.loads(out)]


def walk_qemu_per_link(top: str) -> list[Link]:
    """(c) One qemu-img process per link, following backing-filename."""
    links: list[Link] = []
    path = top
    while True:
        link = _link(json.loads(qemu_img("info", "--output=json", "-U", path)))
        links.append(link)
        if not link[3]:
            return links
        path = os.path.join(os.path.dirname(path), link[3])


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------


def run_interleaved(
    variants: dict[str, Callable[[], Any]], rounds: int, warmup: int, seed: int
) -> dict[str, list[float]]:
    """One timed call of each variant per round, in an order shuffled each round.

    Returns µs per call, in round order, so that round i of every variant
    ran within moments of each other (see the paired ratio).
    """
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            variants[name]()
    samples: dict[str, list[float]] = {n: [0.0] * rounds for n in names}
    rng = random.Random(seed)
    clock = time.perf_counter_ns
    gc.collect()
    for r in range(rounds):
        order = names[:]
        rng.shuffle(order)
        for name in order:
            op = variants[name]
            t0 = clock()
            op()
            samples[name][r] = (clock() - t0) / 1000.0
    return samples


def summarize(samples: dict[str, list[float]], links: int) -> dict[str, Any]:
    """Median, p90, p99 per variant and both ratios to the baseline (VARIANTS[0])."""
    base = samples[VARIANTS[0]]
    base_median = statistics.median(base)
    stats = {}
    for name, values in samples.items():
        median = statistics.median(values)
        stats[name] = {
            "n": len(values),
            "median_us": median,
            "p90_us": percentile(values, 90),
            "p99_us": percentile(values, 99),
            "per_link_median_us": median / links,
            "ratio_median": median / base_median,
            # Per round, this call over the baseline's call of the same round:
            # the ratio least affected by drift.
            "ratio_paired": statistics.median(v / b for v, b in zip(values, base, strict=True)),
        }
    return stats


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------


def _qemu_version() -> str:
    try:
        first = qemu_img("--version").splitlines()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "unknown"
    return first.removeprefix("qemu-img version ").strip()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the chain, check the variants agree, time them, remove the chain."""
    meta = machine_meta(())
    meta["versions"]["qemu-img"] = _qemu_version()
    meta["args"] = {k: v for k, v in vars(args).items() if k not in ("t0", "json")}
    workdir = tempfile.mkdtemp(prefix="rfsaa-hdrbench-", dir=args.dir)
    try:
        top = make_chain(workdir, args.depth, args.size)
        variants = {
            "python": lambda: walk_python(top),
            "python 4 KiB first": lambda: walk_python(top, read_4k_first),
            "qemu-img chain": lambda: walk_qemu_chain(top),
            "qemu-img per link": lambda: walk_qemu_per_link(top),
        }
        results = {name: fn() for name, fn in variants.items()}
        reference = results["python"]
        for name, links in results.items():
            if links != reference:
                raise RuntimeError(f"{name} disagrees with python:\n{links}\n{reference}")
        if len(reference) != args.depth + 1:
            raise RuntimeError(f"walked {len(reference)} links, expected {args.depth + 1}")
        began = time.monotonic()
        samples = run_interleaved(variants, args.rounds, args.warmup, args.seed)
        timed = time.monotonic() - began
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    meta["loadavg_end"] = os.getloadavg()
    meta["wall_s"] = time.monotonic() - args.t0
    meta["timed_s"] = timed
    return {
        "meta": meta,
        "links": len(reference),
        "stats": summarize(samples, len(reference)),
        "samples_us": samples,
    }


def _fmt(value: float, digits: int = 0) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.{digits}f}"


def report(out: dict[str, Any]) -> str:
    """The human-readable table."""
    meta = out["meta"]
    a = meta["args"]
    links = out["links"]
    lines = [
        "",
        *machine_header(meta, meta["timed_s"]),
        "",
        f"CHAIN WALK, µs per walk of a chain of {links} links ({a['depth']} qcow2 overlays "
        f"over a raw base), {a['rounds']} rounds, variants interleaved in shuffled order",
        "  python            = qcow2.read_header per link, following backing_file",
        "  python 4 KiB first = the same, reading 4 KiB first (the full read only if needed)",
        "  qemu-img chain    = one qemu-img info --output=json --backing-chain -U on the top",
        "  qemu-img per link = one qemu-img info --output=json -U per link",
        "  x python          = median over median; paired = median over rounds of "
        "call / python call",
        "",
    ]
    rows = []
    for name in VARIANTS:
        s = out["stats"][name]
        rows.append(
            [
                name,
                str(s["n"]),
                _fmt(s["median_us"], 1 if s["median_us"] < 1000 else 0),
                _fmt(s["p90_us"], 1 if s["p90_us"] < 1000 else 0),
                _fmt(s["p99_us"], 1 if s["p99_us"] < 1000 else 0),
                _fmt(s["per_link_median_us"], 1),
                _ratio(s["ratio_median"]) if name != VARIANTS[0] else "1x",
                _ratio(s["ratio_paired"]) if name != VARIANTS[0] else "1x",
            ]
        )
    lines.append(
        render_table(
            ["variant", "n", "median", "p90", "p99", "per link", "x python", "paired"],
            rows,
        )
    )
    return "\n".join(lines)


def _ratio(x: float) -> str:
    return f"{x:.2f}x" if x < 10 else f"{x:,.0f}x"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line; the defaults take about 10 s on 2 cores."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=100, help="interleaved rounds (default 100)")
    p.add_argument("--depth", type=int, default=8, help="qcow2 overlays over the base (default 8)")
    p.add_argument("--size", default="1G", help="virtual size of the images (default 1G)")
    p.add_argument("--warmup", type=int, default=3, help="untimed walks per variant (default 3)")
    p.add_argument("--seed", type=int, default=1, help="seed of the order shuffle")
    p.add_argument("--json", metavar="PATH", help="also write all results as JSON here")
    p.add_argument("--dir", help="where to build the chain (e.g. a GlusterFS mount; default /tmp)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.depth < 1:
        p.error("--rounds and --depth must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, optionally write JSON."""
    args = parse_args(argv)
    args.t0 = time.monotonic()
    if shutil.which("qemu-img") is None:
        print("qemu-img is not installed; nothing to compare with", file=sys.stderr)
        return 1
    out = run(args)
    publish(report(out), out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
