"""Statistics and tables shared by the benchmarks."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
from importlib import metadata

from remotefs_aa.cmd.tables import render_table

__all__ = ["machine_header", "machine_meta", "percentile", "publish", "render_table"]


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (no interpolation: every result was observed)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return ordered[rank - 1]


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


def publish(text: str, out: dict, json_path: str | None) -> None:
    """Print the report; with ``--json``, also write every figure there."""
    print(text, flush=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(out, f, indent=1, default=str)
        print(f"\nJSON written to {json_path}")
