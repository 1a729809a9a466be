"""Statistics and tables shared by the benchmarks."""

from __future__ import annotations

import contextlib
import math
import os
import platform
from importlib import metadata


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (no interpolation: every result was observed)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return ordered[rank - 1]


def render_table(headers: list[str], rows: list[list[str]], right: set[int] | None = None) -> str:
    """Fixed-width text table; columns in ``right`` are right-aligned."""
    right = right if right is not None else set(range(1, len(headers)))
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]

    def line(cells: list[str]) -> str:
        out = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def machine_meta(dists: tuple[str, ...], loadavg_start: tuple[float, ...] | None = None) -> dict:
    """What a reader needs to judge a run: Python, CPUs, load, library versions."""
    versions = {}
    for dist in dists:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg_start": loadavg_start if loadavg_start is not None else os.getloadavg(),
        "versions": versions,
    }


def machine_header(meta: dict, timed_s: float | None = None) -> list[str]:
    """The two report lines describing the machine and the run (see machine_meta)."""
    timed = f" ({timed_s:.0f} s timed)" if timed_s is not None else ""
    return [
        f"Python {meta['python']}, {meta['cpus']} CPUs, load average "
        f"{meta['loadavg_start'][0]:.2f} at start, {meta['loadavg_end'][0]:.2f} at end; "
        f"wall time {meta['wall_s']:.0f} s{timed}",
        "versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
    ]
