"""The checker: what went wrong, from evidence, not from the workers' verdicts.

Its inputs are the workers' raw records (times, what each node showed), the
database's own audit trail (``history``: every change of status, holder or
count, written by a trigger in the same transaction as the change, read
from every node) and the final rows on every node. A violation is:

- ``two_holders``: two changes of one row whose holding intervals
  (acquired .. release begun, on the machine's one monotonic clock)
  overlap;
- ``overwrote_holder``: the audit shows ``deleting -> deleting``: a write
  took a row somebody held;
- ``released_by_other``: the audit shows a release by somebody other than
  the holder;
- ``lost_update``: a release whose count is not the previous count plus one,
  two changes that built on the same count, or a final count that is not the
  number of completed changes;
- ``phantom_acquire``: a worker went on as the holder but the database never
  committed its marker (e.g. a write it believed succeeded was rolled back
  by certification);
- ``marker_not_shown``: a node was read but never showed the change's
  marker within the check timeout;
- ``nodes_disagree``: at the end, the nodes hold different rows or different
  audit trails.

Failures (a worker that timed out, crashed or never finished) are counted
apart: a strategy with failures did not show that it is correct.
"""

from __future__ import annotations

from collections import defaultdict


def check(
    records: list[dict],
    workers: list[dict],
    histories: dict[str, list[tuple]],
    finals: dict[str, dict[str, tuple]],
    rows: list[str],
) -> dict:
    """Return ``{"violations": [...], "failures": [...], "counts": {...}}``."""
    violations: list[dict] = []

    def flag(kind: str, row: str, detail: str) -> None:
        violations.append({"type": kind, "row": row, "detail": detail})

    by_row: dict[str, list[dict]] = defaultdict(list)
    for rec in records:
        by_row[rec["row"]].append(rec)

    # 1. Holding intervals must not overlap.
    for row, recs in by_row.items():
        held = sorted((r for r in recs if "t_acquired" in r), key=lambda r: r["t_acquired"])
        current = None
        for rec in held:
            if current is not None and rec["t_acquired"] < current.get(
                "t_release_begin", float("inf")
            ):
                early = current.get("t_release_begin", rec["t_acquired"]) - rec["t_acquired"]
                flag(
                    "two_holders",
                    row,
                    f"{rec['marker']} acquired {1000 * early:.1f} ms "
                    f"before {current['marker']} began to release",
                )
            end = rec.get("t_release_begin", float("inf"))
            if current is None or end > current.get("t_release_begin", float("inf")):
                current = rec

    # 2. Every node must have shown the marker.
    for rec in records:
        for node in rec.get("nodes", []):
            # A node the check never managed to read is a failed check (the
            # worker reports it), not evidence about the node.
            if node["shown_ms"] is None and node["seen"]:
                last = node["seen"][-1][1:] if node["seen"] else None
                flag(
                    "marker_not_shown",
                    rec["row"],
                    f"{node['node']} never showed {rec['marker']} (last showed {last})",
                )

    # 3. The audit trail, from the first node; the others must match it.
    reference = next(iter(histories.values()), [])
    acquired_markers: dict[str, set[str]] = defaultdict(set)
    for _seq, row, old_s, new_s, old_h, new_h, old_c, new_c in reference:
        if new_s == "deleting":
            acquired_markers[row].add(new_h)
        if old_s == "deleting" and new_s == "deleting":
            flag("overwrote_holder", row, f"{new_h} overwrote {old_h} while it held the row")
        if new_s == "available" and old_s == "deleting" and old_h != new_h:
            flag("released_by_other", row, f"{new_h} released the row {old_h} held")
        if new_s == "available" and old_s == "available":
            flag("lost_update", row, f"{new_h} released a row nobody held (count {old_c}->{new_c})")
        if new_s == "available" and new_c != old_c + 1:
            flag("lost_update", row, f"release by {new_h} set count {new_c} over {old_c}")

    for rec in records:
        if "t_acquired" in rec and rec["marker"] not in acquired_markers[rec["row"]]:
            flag(
                "phantom_acquire",
                rec["row"],
                f"{rec['marker']} went on as holder but no commit of it is in the audit trail",
            )

    # 4. Counts: distinct critical sections, and the final count adds up.
    completed: dict[str, int] = defaultdict(int)
    for row, recs in by_row.items():
        reads = [r["count_read"] for r in recs if "t_released" in r]
        completed[row] = len(reads)
        dupes = {c for c in reads if reads.count(c) > 1}
        if dupes:
            flag("lost_update", row, f"two changes built on count {sorted(dupes)[:5]}")
    first_final = next(iter(finals.values()), {})
    for row in rows:
        final = first_final.get(row)
        if final is None:
            flag("nodes_disagree", row, "row missing")
            continue
        _status, _holder, count = final
        if count != completed[row]:
            flag(
                "lost_update",
                row,
                f"final count {count}, but {completed[row]} changes completed",
            )

    # 5. Every node must end with the same rows and the same audit trail.
    names = list(finals)
    for name in names[1:]:
        for row in rows:
            if finals[name].get(row) != first_final.get(row):
                flag(
                    "nodes_disagree",
                    row,
                    f"{names[0]} has {first_final.get(row)}, {name} has {finals[name].get(row)}",
                )
    hnames = list(histories)
    for name in hnames[1:]:
        if sorted(h[1:] for h in histories[name]) != sorted(h[1:] for h in reference):
            flag("nodes_disagree", "*", f"audit trail of {name} differs from {hnames[0]}'s")

    failures = [
        {"worker": w["worker"], "row": w["row"], "error": w["error"]}
        for w in workers
        if w.get("error")
    ]
    counts: dict[str, int] = defaultdict(int)
    for v in violations:
        counts[v["type"]] += 1
    return {"violations": violations, "failures": failures, "counts": dict(counts)}
