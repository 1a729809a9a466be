"""Figures per run, in the study's columns plus percentiles; CSV, markdown and PNG plots."""

from __future__ import annotations

import csv
import itertools
import math
import os
import statistics
from collections import defaultdict

from benchmarks._common import percentile, render_table


def _spread(values: list[float], prefix: str) -> dict:
    """max / mean / stddev / min, as the study printed them, plus p50 / p99."""
    if not values:
        return {f"{prefix}_{k}": math.nan for k in ("max", "mean", "stddev", "min", "p50", "p99")}
    return {
        f"{prefix}_max": max(values),
        f"{prefix}_mean": statistics.fmean(values),
        f"{prefix}_stddev": statistics.stdev(values) if len(values) > 1 else 0.0,
        f"{prefix}_min": min(values),
        f"{prefix}_p50": percentile(values, 50),
        f"{prefix}_p99": percentile(values, 99),
    }


def handoffs(records: list[dict]) -> list[float]:
    """Milliseconds from one holder's release to the next holder's acquire, when someone waited.

    Only pairs where the next change had started waiting before the release
    finished count: that is the hand-off a strategy controls.
    """
    by_row: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        if "t_released" in r:
            by_row[r["row"]].append(r)
    out = []
    for recs in by_row.values():
        recs.sort(key=lambda r: r["t_acquired"])
        for prev, nxt in itertools.pairwise(recs):
            if nxt["t_start"] < prev["t_released"]:
                out.append((nxt["t_acquired"] - prev["t_released"]) * 1000)
    return out


def stats(records: list[dict], total_s: float) -> dict:
    ok = [r for r in records if "t_released" in r]
    deadlocks = [float(r["deadlock"]) for r in ok]
    out = {
        "total_s": total_s,
        "changes_ok": len(ok),
        "changes_failed": sum(1 for r in records if "error" in r),
        **_spread([r["release_ms"] for r in ok], "release"),
        **_spread([r["acquire_ms"] for r in ok], "acquire"),
    }
    if deadlocks:
        out.update(
            deadlocks_max=max(deadlocks),
            deadlocks_sum=sum(deadlocks),
            deadlocks_mean=statistics.fmean(deadlocks),
            deadlocks_stddev=statistics.stdev(deadlocks) if len(deadlocks) > 1 else 0.0,
            deadlocks_min=min(deadlocks),
        )
    else:
        out.update(dict.fromkeys(
            ("deadlocks_max", "deadlocks_sum", "deadlocks_mean", "deadlocks_stddev",
             "deadlocks_min"), math.nan))  # fmt: skip
    out["disconnects"] = sum(r["disconnect"] for r in records)
    out["lock_timeouts"] = sum(r["lock_timeout"] for r in records)
    h = handoffs(records)
    out["handoff_p50"] = percentile(h, 50)
    out["handoff_p99"] = percentile(h, 99)
    out["handoffs"] = len(h)
    return out


#: (CSV key, markdown header) in the study's order, then ours.
COLUMNS = [
    ("total_s", "total s"),
    ("release_max", "rel max"), ("release_mean", "rel mean"), ("release_stddev", "rel sd"),
    ("release_min", "rel min"), ("release_p50", "rel p50"), ("release_p99", "rel p99"),
    ("acquire_max", "acq max"), ("acquire_mean", "acq mean"), ("acquire_stddev", "acq sd"),
    ("acquire_min", "acq min"), ("acquire_p50", "acq p50"), ("acquire_p99", "acq p99"),
    ("deadlocks_max", "dl max"), ("deadlocks_sum", "dl sum"), ("deadlocks_mean", "dl mean"),
    ("deadlocks_stddev", "dl sd"), ("deadlocks_min", "dl min"),
    ("disconnects", "disc"), ("lock_timeouts", "lock t/o"), ("handoff_p50", "hand-off p50"),
    ("changes_ok", "ok"), ("changes_failed", "failed"), ("violations", "violations"),
]  # fmt: skip
KEYS = ["topology", "load", "workload", "strategy", "round"]


def _fmt(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if value >= 100 or value == int(value):
            return f"{value:.0f}"
        return f"{value:.1f}" if value >= 10 else f"{value:.2f}"
    return str(value)


def write_csv(rows: list[dict], path: str) -> None:
    fields = [*KEYS, *(k for k, _ in COLUMNS), "acquire_p90", "handoff_p99", "handoffs",
              "violation_types", "loadavg_start", "loadavg_end", "synthetic_ops_per_s"]  # fmt: skip
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: row.get(k, "") for k in fields})


def markdown(rows: list[dict]) -> str:
    """One table per (topology, load, workload), strategies as rows, the study's columns."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["topology"], row["load"], row["workload"])].append(row)
    parts = []
    for (topo, load, workload), group in groups.items():
        loads = [r["loadavg_start"] for r in group if r.get("loadavg_start") is not None]
        note = f", machine load {min(loads):.1f}-{max(loads):.1f}" if loads else ""
        parts.append(f"#### {topo}, {workload}, synthetic load {load}{note}\n")
        table = [["strategy", *(h for _, h in COLUMNS)]]
        for r in sorted(group, key=lambda r: (r["strategy"], r.get("round", 0))):
            name = r["strategy"] + (f" #{r['round']}" if r.get("round") else "")
            table.append([name, *(_fmt(r.get(k, math.nan)) for k, _ in COLUMNS)])
        parts.append(render_markdown(table))
    return "\n".join(parts)


def summary(rows: list[dict]) -> str:
    """Per topology and load: acquire p50 / p99 (ms), deadlocks and hand-off per workload.

    The winner of a workload is the correct strategy with the lowest acquire
    p99 that had no failure and no violation.
    """
    groups: dict[tuple, dict[str, dict[str, dict]]] = defaultdict(lambda: defaultdict(dict))
    workloads: dict[tuple, list[str]] = defaultdict(list)
    for r in rows:
        key = (r["topology"], r["load"])
        groups[key][r["strategy"]][r["workload"]] = r
        if r["workload"] not in workloads[key]:
            workloads[key].append(r["workload"])
    parts = []
    for (topo, load), by_strategy in groups.items():
        names = workloads[(topo, load)]
        loads = [r["loadavg_start"] for s in by_strategy.values() for r in s.values()]
        parts.append(
            f"**{topo}, synthetic load {load}** (machine load {min(loads):.0f}-{max(loads):.0f};"
            " cells: acquire p50 / p99 ms; deadlocks; hand-off p50 ms)\n"
        )
        table = [["strategy", *names]]
        for strategy in sorted(by_strategy):
            cells = [strategy]
            for w in names:
                r = by_strategy[strategy].get(w)
                if r is None:
                    cells.append("")
                    continue
                cell = f"{_fmt(r['acquire_p50'])} / {_fmt(r['acquire_p99'])}"
                cell += f"; {_fmt(r['deadlocks_sum'])}"
                if not math.isnan(r.get("handoff_p50", math.nan)):
                    cell += f"; {_fmt(r['handoff_p50'])}"
                if r["violations"]:
                    cell += f"; **{r['violations']} violations**"
                if r.get("failed_workers"):
                    cell += f"; **{r['failed_workers']} failed**"
                cells.append(cell)
            table.append(cells)
        best_row = ["lowest p99"]
        for w in names:
            ok = [
                by_strategy[s][w]
                for s in by_strategy
                if w in by_strategy[s] and s != "read_then_write" and _clean(by_strategy[s][w])
            ]
            best_row.append(min(ok, key=lambda r: r["acquire_p99"])["strategy"] if ok else "")
        table.append(best_row)
        parts.append(render_markdown(table))
    return "\n".join(parts)


def _clean(r: dict) -> bool:
    return not r["violations"] and not r.get("failed_workers")


def render_markdown(table: list[list[str]]) -> str:
    head, *body = table
    lines = ["| " + " | ".join(head) + " |", "|:--" + "|--:" * (len(head) - 1) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines) + "\n"


def text_table(rows: list[dict]) -> str:
    """A compact console summary: the figures one reads first."""
    headers = ["topology", "load", "workload", "strategy", "total s", "acq p50", "acq p99",
               "acq max", "rel p50", "dl sum", "disc", "hand-off p50", "ok", "fail",
               "viol"]  # fmt: skip
    table = []
    for r in rows:
        table.append([
            r["topology"], r["load"], r["workload"], r["strategy"], _fmt(r["total_s"]),
            _fmt(r["acquire_p50"]), _fmt(r["acquire_p99"]), _fmt(r["acquire_max"]),
            _fmt(r["release_p50"]), _fmt(r["deadlocks_sum"]), _fmt(r["disconnects"]),
            _fmt(r["handoff_p50"]), str(r["changes_ok"]), str(r["changes_failed"]),
            str(r["violations"]),
        ])  # fmt: skip
    return render_table(headers, table, right=set(range(4, len(headers))))


def plots(runs: list[dict], out_dir: str) -> list[str]:
    """One PNG per (topology, load): ECDF of acquire times, a panel per workload.

    Returns the paths written; none (and no error) without matplotlib.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    groups: dict[tuple, dict[str, dict[str, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for run in runs:
        key = (run["topology"], run["load"])
        groups[key][run["workload"]][run["strategy"]].extend(run["acquire_samples"])
    names_all = sorted({run["strategy"] for run in runs})
    palette = plt.get_cmap("tab10")
    colors = {name: palette(i % 10) for i, name in enumerate(names_all)}
    written = []
    for (topo, load), workloads in groups.items():
        names = list(workloads)
        cols = min(3, len(names))
        nrows = math.ceil(len(names) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.8 * nrows), squeeze=False)
        for ax, workload in zip(axes.flat, names, strict=False):
            for strategy, values in sorted(workloads[workload].items()):
                if not values:
                    continue
                xs = sorted(max(v, 0.01) for v in values)
                ys = [(i + 1) / len(xs) for i in range(len(xs))]
                style = ":" if strategy == "read_then_write" else "-"
                ax.step(
                    xs,
                    ys,
                    where="post",
                    label=strategy,
                    linestyle=style,
                    linewidth=1.3,
                    color=colors[strategy],
                )
            ax.set_xscale("log")
            ax.set_title(f"{workload}")
            ax.set_xlabel("acquire time, ms (log)")
            ax.set_ylabel("fraction of changes")
            ax.grid(True, which="both", alpha=0.3)
        for ax in list(axes.flat)[len(names) :]:
            ax.axis("off")
        legend: dict = {}
        for ax in axes.flat:
            for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
                legend.setdefault(label, handle)
        labels = sorted(legend)
        handles = [legend[k] for k in labels]
        fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=8)
        fig.suptitle(f"Acquire-time distribution: {topo}, synthetic load {load}")
        fig.tight_layout(rect=(0, 0.08, 1, 0.96))
        path = os.path.join(out_dir, f"acquire-{topo}-load-{load}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
