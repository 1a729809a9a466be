"""One worker process: many worker threads, each changing its row, all recorded.

Run as ``python -m benchmarks.races.worker SPEC.json``. The process sets up
(connections, the tooz coordinator of this "host"), prints ``ready``, waits
for ``go`` on stdin, runs its threads, writes every record to the result
path in the spec, prints ``done`` and exits. The parent holds its PID and
kills it if it overstays; every wait in here is bounded as well.

A worker thread does what the study's workers did, ``changes`` times:
pause 5 ms, acquire the row (``available -> deleting`` with its marker),
check on every node that the row shows ``deleting`` with its marker (polling
until ``check_timeout``), hold it ``hold`` seconds, release it
(``deleting -> available``) writing the critical section's result: the
``count`` it read, plus one. It records what each node showed and when, and
the times it acquired and released; it judges nothing itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import random
import sys
import threading
import time
import traceback

from benchmarks.races import sql
from benchmarks.races.strategies import STRATEGIES, ChangeFailed

COUNTERS = ("deadlock", "lock_timeout", "disconnect")
#: At most this many distinct values are kept of what one node showed.
SEEN_LIMIT = 6


class NodePool:
    """Direct, persistent connections to each node for the checks, shared by threads."""

    def __init__(self, dialect: sql.Dialect, nodes: list, size: int) -> None:
        self.dialect = dialect
        self.nodes = {name: (host, port) for name, host, port in nodes}
        self.idle = {name: queue.LifoQueue() for name in self.nodes}
        self.free = {name: threading.Semaphore(size) for name in self.nodes}

    @contextlib.contextmanager
    def cursor(self, node: str, deadline: float):
        if not self.free[node].acquire(timeout=max(0.01, deadline - time.monotonic())):
            raise TimeoutError(f"no check connection to {node} free in time")
        conn = None
        try:
            try:
                conn = self.idle[node].get_nowait()
            except queue.Empty:
                conn = self.dialect.connect(*self.nodes[node])
            cur = conn.cursor()
            yield cur
            cur.close()
            self.idle[node].put(conn)
            conn = None
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
            self.free[node].release()

    def close(self) -> None:
        for q in self.idle.values():
            while not q.empty():
                with contextlib.suppress(Exception):
                    q.get_nowait().close()


class Ctx:
    """What a strategy sees of one worker: its row, requests, deadlines, counters."""

    def __init__(self, spec: dict, wid: int, row: str, lock_factory) -> None:
        topo = spec["topology"]
        self.dialect = sql.DIALECTS[topo["dialect"]]
        self.request_addr = tuple(topo["request"])
        self.per_request = topo["per_request"]
        self.wid = wid
        self.row = row
        self.conn = None
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.notes: list[str] = []
        self.state: dict = {}
        self.acquire_deadline = 0.0
        self.release_deadline = 0.0
        self._lock_factory = lock_factory
        self._lock = None

    # --- bookkeeping -------------------------------------------------------
    def count(self, kind: str) -> None:
        self.counters[kind] += 1

    def note(self, what: str) -> None:
        self.notes.append(what)

    def lock(self):
        if self._lock is None:
            self._lock = self._lock_factory(self.row)
        return self._lock

    # --- requests ----------------------------------------------------------
    def connect(self) -> None:
        if not self.per_request and self.conn is None:
            self.conn = self.dialect.connect(*self.request_addr)

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
            self.conn = None

    @contextlib.contextmanager
    def request(self):
        """A cursor for one request: a new connection (cluster) or the worker's own."""
        if self.per_request:
            conn = self.dialect.connect(*self.request_addr)
            try:
                yield conn.cursor()
            finally:
                with contextlib.suppress(Exception):
                    conn.close()
            return
        if self.conn is None:
            self.conn = self.dialect.connect(*self.request_addr)
        try:
            yield self.conn.cursor()
        except BaseException:
            # Leave no transaction (and no advisory lock) open on the
            # connection we keep; a connection that cannot even roll back
            # is dropped.
            try:
                self.conn.cursor().execute("ROLLBACK")
            except Exception:
                self.close()
            raise

    def transact(self, fn, deadline: float, what: str):
        """Run ``fn(cursor, uncertain)`` in one request; retry what correct code retries.

        ``uncertain`` is true after a disconnect: the previous attempt may
        have committed without our seeing it.
        """
        uncertain = False
        while True:
            if time.monotonic() > deadline:
                raise ChangeFailed(f"{what}: deadline passed while retrying")
            try:
                with self.request() as cur:
                    return fn(cur, uncertain)
            except ChangeFailed:
                raise
            except Exception as exc:
                kind = self.dialect.classify(exc)
                if kind is None:
                    raise
                self.counters[kind] += 1
                if kind == "disconnect":
                    uncertain = True
                    time.sleep(0.05)
                else:
                    time.sleep(random.uniform(0.001, 0.005))  # no lock-step retries


#: A node not read even once by the check timeout (the machine too busy to
#: run the check) is read until this much later: "never showed the marker"
#: must mean the node was read and showed something else.
UNREAD_GRACE = 30.0


def check_nodes(ctx: Ctx, pool: NodePool, nodes: list, marker: str, t_acq: float, timeout: float):
    """Poll every node until it shows (deleting, marker); record what each showed."""
    deadline = t_acq + timeout
    out = []
    for name, _host, _port in nodes:
        seen: list = []
        shown = None
        count = None
        delay = 0.002
        while True:
            try:
                with pool.cursor(name, deadline) as cur:
                    cur.execute("SELECT status, holder, count FROM volumes WHERE id=%s", (ctx.row,))
                    value = list(cur.fetchone())
            except Exception as exc:
                if ctx.dialect.classify(exc) is None and not isinstance(exc, TimeoutError):
                    raise
                ctx.count("disconnect")
                value = None
            now = time.monotonic()
            if value is not None:
                if (not seen or seen[-1][1:] != value) and len(seen) < SEEN_LIMIT:
                    seen.append([round((now - t_acq) * 1000, 2), *value])
                if value[0] == "deleting" and value[1] == marker:
                    shown = round((now - t_acq) * 1000, 2)
                    count = value[2]
                    break
            if now >= deadline and (seen or now >= deadline + UNREAD_GRACE):
                break
            time.sleep(delay)
            delay = min(0.02, delay * 2)
        out.append({"node": name, "shown_ms": shown, "count": count, "seen": seen})
    return out


def run_worker(spec: dict, ctx: Ctx, pool: NodePool, records: list, summary: dict) -> None:
    strategy = STRATEGIES[spec["strategy"]]
    nodes = spec["topology"]["nodes"]
    for i in range(spec["changes"]):
        marker = f"w{ctx.wid}c{i}"
        before = dict(ctx.counters)
        ctx.notes = []
        ctx.state = {}
        rec: dict = {"worker": ctx.wid, "row": ctx.row, "marker": marker, "i": i}
        try:
            time.sleep(0.005)
            t0 = time.monotonic()
            ctx.acquire_deadline = t0 + spec["acquire_timeout"]
            rec["t_start"] = t0
            strategy.acquire(ctx, marker)
            t1 = time.monotonic()
            rec["t_acquired"] = t1
            rec["nodes"] = check_nodes(ctx, pool, nodes, marker, t1, spec["check_timeout"])
            unread = [n["node"] for n in rec["nodes"] if not n["seen"]]
            if unread:
                # No value to build the critical section on: stop here, and
                # leave the row held (its rivals then fail, visibly).
                raise ChangeFailed(f"check could not read {unread} in time")
            counts = [n["count"] for n in rec["nodes"] if n["count"] is not None]
            if counts:
                read = counts[0]
            else:  # no node showed our marker; build on what the first showed last
                seen = rec["nodes"][0]["seen"]
                read = seen[-1][3] if seen else 0
            rec["count_read"] = read
            time.sleep(spec["hold"])
            t2 = time.monotonic()
            rec["t_release_begin"] = t2
            ctx.release_deadline = t2 + spec["release_timeout"]
            strategy.release(ctx, marker, read + 1)
            t3 = time.monotonic()
            rec["t_released"] = t3
            rec["acquire_ms"] = (t1 - t0) * 1000
            rec["release_ms"] = (t3 - t2) * 1000
        except Exception as exc:
            rec["error"] = f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, ChangeFailed):
                rec["traceback"] = traceback.format_exc(limit=6)
        finally:
            for k in COUNTERS:
                rec[k] = ctx.counters[k] - before[k]
            rec["notes"] = list(ctx.notes)
            records.append(rec)
        if "error" in rec:
            summary["error"] = rec["error"]
            break
        summary["done"] = i + 1


def _lock_factory(spec: dict, member: str):
    """A function row -> tooz lock, on one coordinator for this whole process."""
    backend = STRATEGIES[spec["strategy"]].lock_backend
    if backend is None:
        return (lambda _row: None), None
    from tooz import coordination

    coord = coordination.get_coordinator(spec["lock_url"], member.encode())
    coord.start(start_heart=False)
    if backend == "redis":
        # tooz's own heart sleeps for the whole lease between beats; renew
        # the held locks' leases every 2 s instead (lease: 10 s).
        def beat() -> None:
            while True:
                time.sleep(2.0)
                with contextlib.suppress(Exception):
                    coord.heartbeat()

        threading.Thread(target=beat, daemon=True, name="heartbeat").start()
    return (lambda row: coord.get_lock(f"races-{row}".encode())), coord


def main(argv: list[str]) -> int:
    sys.setswitchinterval(0.0005)  # many I/O-bound threads: hand the GIL over sooner
    with open(argv[0]) as f:
        spec = json.load(f)
    dialect = sql.DIALECTS[spec["topology"]["dialect"]]
    factory, coord = _lock_factory(spec, f"races-proc-{spec['proc']}")
    pool = NodePool(dialect, spec["topology"]["nodes"], spec["check_pool"])
    ctxs = [Ctx(spec, wid, row, factory) for wid, row in spec["workers"]]
    setup_error = None
    try:
        for ctx in ctxs:
            ctx.connect()
    except Exception as exc:
        setup_error = f"setup: {type(exc).__name__}: {exc}"
    print("ready" if setup_error is None else f"failed {setup_error}", flush=True)
    go = sys.stdin.readline().strip()
    records: list = []
    summaries = [{"worker": c.wid, "row": c.row, "done": 0, "error": setup_error} for c in ctxs]
    threads = []
    t_go = time.monotonic()
    if go == "go" and setup_error is None:
        for ctx, summary in zip(ctxs, summaries, strict=True):
            t = threading.Thread(
                target=run_worker, args=(spec, ctx, pool, records, summary), daemon=True
            )
            t.start()
            threads.append(t)
        deadline = t_go + spec["run_timeout"]
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
    for t, summary in zip(threads, summaries, strict=False):
        if t.is_alive():
            summary["error"] = summary["error"] or "did not finish within the run timeout"
    result = {
        "proc": spec["proc"],
        "t_go": t_go,
        "t_end": time.monotonic(),
        "records": list(records),
        "workers": summaries,
    }
    tmp = spec["result_path"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, spec["result_path"])
    print("done", flush=True)
    for ctx in ctxs:
        ctx.close()
    pool.close()
    if coord is not None:
        with contextlib.suppress(Exception):
            coord.stop()
    # Threads still stuck in a bounded wait would only delay the exit.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
