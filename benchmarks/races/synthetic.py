"""The study's synthetic load: N workers, each 5 updates and 10 selects a second on its own row.

Run as ``python -m benchmarks.races.synthetic SPEC.json``. Each thread
inserts a row of its own (``kind='synthetic'``), then loops over 15
operations a second (10 ``SELECT``, 5 ``UPDATE ... SET note``) on one
persistent connection (on the cluster through HAProxy, so the connections
spread over the nodes), reconnecting after an error. It stops when stdin
closes or says ``stop``, deletes its rows and writes what it achieved (the
load actually offered) to the result path.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time

from benchmarks.races import sql


def run(spec: dict, index: int, stop: threading.Event, stats: dict) -> None:
    dialect = sql.DIALECTS[spec["topology"]["dialect"]]
    addr = tuple(spec["topology"]["request"])
    row = f"syn-{index}"
    ops = ["select"] * 10 + ["update"] * 5
    # Interleave: select, select, update, ... (2:1), at 15 operations a second.
    ops = [op for pair in zip(ops[:10:2], ops[1:10:2], ops[10:], strict=True) for op in pair]
    period = 1.0 / len(ops)
    conn = None
    inserted = False
    nxt = time.monotonic()
    k = 0
    while not stop.is_set():
        try:
            if conn is None:
                conn = dialect.connect(*addr)
            cur = conn.cursor()
            if not inserted:
                cur.execute("DELETE FROM volumes WHERE id=%s", (row,))
                cur.execute(
                    "INSERT INTO volumes (id, kind, status) VALUES (%s, 'synthetic', 'available')",
                    (row,),
                )
                inserted = True
            op = ops[k % len(ops)]
            if op == "select":
                cur.execute("SELECT status, note FROM volumes WHERE id=%s", (row,))
                cur.fetchone()
            else:
                cur.execute("UPDATE volumes SET note=%s WHERE id=%s", (f"{index}-{k}", row))
            stats[op] += 1
            k += 1
        except Exception:
            stats["errors"] += 1
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
            conn = None
            stop.wait(0.1)
        nxt += period
        stop.wait(max(0.0, nxt - time.monotonic()))
        if time.monotonic() - nxt > 1.0:  # fell behind by a second: do not burst to catch up
            nxt = time.monotonic()
    if conn is not None:
        with contextlib.suppress(Exception):
            conn.cursor().execute("DELETE FROM volumes WHERE id=%s", (row,))
            conn.close()


def main(argv: list[str]) -> int:
    with open(argv[0]) as f:
        spec = json.load(f)
    stop = threading.Event()
    stats = [{"select": 0, "update": 0, "errors": 0} for _ in range(spec["workers"])]
    threads = [
        threading.Thread(target=run, args=(spec, i, stop, stats[i]), daemon=True)
        for i in range(spec["workers"])
    ]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    print("ready", flush=True)
    while True:
        line = sys.stdin.readline()
        if not line or line.strip() == "stop":
            break
    stop.set()
    for t in threads:
        t.join(timeout=10)
    elapsed = time.monotonic() - t0
    total = {k: sum(s[k] for s in stats) for k in ("select", "update", "errors")}
    result = {
        "seconds": elapsed,
        **total,
        "ops_per_s": (total["select"] + total["update"]) / elapsed if elapsed else 0.0,
        "target_ops_per_s": 15 * spec["workers"],
    }
    with open(spec["result_path"], "w") as f:
        json.dump(result, f)
    print("done", flush=True)
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
