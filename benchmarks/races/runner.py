"""Runs the study: workloads x strategies x topologies, each run checked and measured."""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from benchmarks.races import checker, report, sql
from benchmarks.races.strategies import CONTROL, CORRECT, STRATEGIES
from benchmarks.races.topology import Lab

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass(frozen=True)
class Workload:
    name: str
    rows: int
    per_row: int
    changes: int
    #: the study's workload this one stands for
    seed: str = ""

    @property
    def workers(self) -> int:
        return self.rows * self.per_row


#: The study's workloads, rows x workers per row, 10 changes per worker.
SEED_WORKLOADS = [
    Workload("100x1", 100, 1, 10, "100x1"),
    Workload("400x1", 400, 1, 10, "400x1"),
    Workload("100x3", 100, 3, 10, "100x3"),
    Workload("100x5", 100, 5, 10, "100x5"),
    Workload("5x100", 5, 100, 10, "5x100"),
]
#: What this 2-core machine holds in one run of every strategy on three
#: topologies, with and without the synthetic load, in about an hour
#: (README.md: what was scaled down, and why). Worker counts per row are the
#: study's except the hell case; the rows and changes per worker shrink.
FULL_WORKLOADS = [
    Workload("100x1", 100, 1, 10, "100x1"),
    Workload("400x1-3ch", 400, 1, 3, "400x1"),
    Workload("100x3-4ch", 100, 3, 4, "100x3"),
    Workload("100x5-2ch", 100, 5, 2, "100x5"),
    Workload("5x50-2ch", 5, 50, 2, "5x100"),
]
QUICK_WORKLOADS = [Workload("4x3", 4, 3, 3, "100x3")]
#: The negative control runs where it has rivals for every row.
CONTROL_WORKLOAD = Workload("3x4", 3, 4, 5, "control")


@dataclass
class Config:
    hold: float = 0.010
    check_timeout: float = 5.0
    acquire_timeout: float = 120.0
    release_timeout: float = 60.0
    run_timeout: float = 600.0
    procs: int = 4
    check_pool: int = 32
    synthetic_workers: int = 50
    seed: int = 0
    verbose: bool = True
    extra: dict = field(default_factory=dict)


# --- the database side of a run --------------------------------------------


def _node_conns(topo: dict):
    dialect = sql.DIALECTS[topo["dialect"]]
    conns = []
    for name, host, port in topo["nodes"]:
        conn = dialect.connect(host, port)
        if topo["causal"]:
            conn.cursor().execute(dialect.causal())
        conns.append((name, conn))
    return conns


def _admin(topo: dict, work, timeout: float = 60.0):
    """Run ``work(cursor)`` on the first node, retrying what the strategies retry.

    Housekeeping meets certification conflicts too: on the cluster with the
    synthetic load running, any write can lose a certification race.
    """
    dialect = sql.DIALECTS[topo["dialect"]]
    _name, host, port = topo["nodes"][0]
    deadline = time.monotonic() + timeout
    while True:
        conn = None
        try:
            conn = dialect.connect(host, port)
            return work(conn.cursor())
        except Exception as exc:
            if dialect.classify(exc) is None or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()


def create_schema(topo: dict) -> None:
    dialect = sql.DIALECTS[topo["dialect"]]

    def work(cur) -> None:
        for stmt in dialect.schema():
            cur.execute(stmt)

    _admin(topo, work)


def reset_rows(topo: dict, rows: list[str]) -> None:
    """Fresh rows for a run; on the cluster, wait until every node has them.

    Rows are new for every run (their ids carry the run's tag), so nothing
    is deleted: a scan-and-delete would lock the synthetic workers' rows and
    lose certification races against them.
    """

    def work(cur) -> None:
        for i in range(0, len(rows), 200):
            chunk = rows[i : i + 200]
            values = ",".join(["(%s, 'race', 'available')"] * len(chunk))
            cur.execute(f"INSERT INTO volumes (id, kind, status) VALUES {values}", chunk)  # noqa: S608

    _admin(topo, work)
    prefix = rows[0].rsplit("-", 1)[0] + "-%"
    for _name, conn in _node_conns(topo):
        try:
            cur = conn.cursor()
            cur.execute("SELECT COUNT(*) FROM volumes WHERE id LIKE %s", (prefix,))
            if cur.fetchone()[0] != len(rows):
                raise RuntimeError(f"node {_name} does not have the {len(rows)} rows")
        finally:
            conn.close()


def read_outcome(topo: dict, rows: list[str]) -> tuple[dict, dict]:
    """The audit trail and final rows on every node (causal reads on the cluster)."""
    histories, finals = {}, {}
    prefix = rows[0].rsplit("-", 1)[0] + "-%"
    for name, conn in _node_conns(topo):
        try:
            cur = conn.cursor()
            cur.execute(
                "SELECT seq, row_id, old_status, new_status, old_holder, new_holder,"
                " old_count, new_count FROM history WHERE row_id LIKE %s ORDER BY seq",
                (prefix,),
            )
            histories[name] = [tuple(r) for r in cur.fetchall()]
            cur.execute("SELECT id, status, holder, count FROM volumes WHERE id LIKE %s", (prefix,))
            finals[name] = {r[0]: (r[1], r[2], r[3]) for r in cur.fetchall()}
        finally:
            conn.close()
    return histories, finals


# --- processes ---------------------------------------------------------------


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    # tooz -> futurist imports eventlet, which warns that it is deprecated
    env["PYTHONWARNINGS"] = "ignore"
    return env


def _spawn(module: str, spec: dict, path: str) -> subprocess.Popen:
    with open(path, "w") as f:
        json.dump(spec, f)
    return subprocess.Popen(
        [sys.executable, "-m", module, path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=_env(),
        start_new_session=True,
    )


def _readline(proc: subprocess.Popen, deadline: float) -> str:
    """One line of the child's stdout, or '' when it died or the deadline passed."""
    buf = ""
    fd = proc.stdout.fileno()
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        ch = os.read(fd, 1).decode()
        if not ch:
            break
        if ch == "\n":
            return buf
        buf += ch
    return buf


def _kill(proc: subprocess.Popen) -> None:
    """Stop a child and its group by PID: SIGTERM, then SIGKILL."""
    if proc.poll() is None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=5)
                break
            except subprocess.TimeoutExpired:
                continue
    for stream in (proc.stdin, proc.stdout):
        with contextlib.suppress(Exception):
            stream.close()


class Synthetic:
    """The synthetic load process for one topology, started and stopped by PID."""

    def __init__(self, topo: dict, workers: int, tmp: str) -> None:
        self.result_path = os.path.join(tmp, f"synthetic-{topo['name']}.json")
        spec = {"topology": topo, "workers": workers, "result_path": self.result_path}
        self.proc = _spawn("benchmarks.races.synthetic", spec, self.result_path + ".spec")
        line = _readline(self.proc, time.monotonic() + 60)
        if line != "ready":
            _kill(self.proc)
            raise RuntimeError(f"synthetic load did not start: {line!r}")
        time.sleep(1.0)  # let it reach its rate before anything is measured

    def stop(self) -> dict:
        try:
            self.proc.stdin.write("stop\n")
            self.proc.stdin.flush()
        except OSError:
            pass
        _readline(self.proc, time.monotonic() + 20)
        _kill(self.proc)
        try:
            with open(self.result_path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {"error": "no result from the synthetic load process"}


def run_one(
    lab: Lab, topo: dict, strategy: str, workload: Workload, cfg: Config, tag: str, tmp: str
) -> dict:
    """One strategy on one workload: spawn, go, collect, check, measure."""
    rows = [f"{tag}-{i:03d}" for i in range(workload.rows)]
    reset_rows(topo, rows)
    workers = [(r * workload.per_row + k, rows[r]) for r in range(workload.rows)
               for k in range(workload.per_row)]  # fmt: skip
    # Rivals for one row go to different processes (different "hosts").
    nprocs = max(1, min(cfg.procs, len(workers)))
    groups: list[list] = [[] for _ in range(nprocs)]
    for n, w in enumerate(sorted(workers, key=lambda w: (w[0] % workload.per_row, w[0]))):
        groups[n % nprocs].append(w)
    urls = lab.lock_urls()
    backend = STRATEGIES[strategy].lock_backend
    procs = []
    load_start = os.getloadavg()
    try:
        for p, group in enumerate(groups):
            spec = {
                "proc": p,
                "topology": topo,
                "strategy": strategy,
                "workers": group,
                "changes": workload.changes,
                "hold": cfg.hold,
                "check_timeout": cfg.check_timeout,
                "acquire_timeout": cfg.acquire_timeout,
                "release_timeout": cfg.release_timeout,
                "run_timeout": cfg.run_timeout,
                "check_pool": cfg.check_pool,
                "lock_url": urls[backend][p % len(urls[backend])] if backend else None,
                "result_path": os.path.join(tmp, f"{tag}-p{p}.json"),
            }
            procs.append(
                (spec, _spawn("benchmarks.races.worker", spec, spec["result_path"] + ".spec"))
            )
        setup_deadline = time.monotonic() + 120
        setup_errors = []
        for spec, proc in procs:
            line = _readline(proc, setup_deadline)
            if line != "ready":
                setup_errors.append(f"process {spec['proc']}: {line or 'no answer'}")
        for _spec, proc in procs:
            with contextlib.suppress(OSError):
                proc.stdin.write("go\n" if not setup_errors else "abort\n")
                proc.stdin.flush()
        deadline = time.monotonic() + cfg.run_timeout + 30
        for _spec, proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
    finally:
        for _spec, proc in procs:
            _kill(proc)
    records, summaries, t_go, t_end = [], [], [], []
    for spec, proc in procs:
        try:
            with open(spec["result_path"]) as f:
                res = json.load(f)
        except (OSError, ValueError):
            lost = f"process {spec['proc']} left no result (exit {proc.returncode})"
            summaries += [{"worker": w, "row": r, "done": 0, "error": lost}
                          for w, r in spec["workers"]]  # fmt: skip
            continue
        records += res["records"]
        summaries += res["workers"]
        t_go.append(res["t_go"])
        t_end.append(res["t_end"])
    for line in setup_errors:
        summaries.append({"worker": -1, "row": "*", "done": 0, "error": line})
    histories, finals = read_outcome(topo, rows)
    verdict = checker.check(records, summaries, histories, finals, rows)
    total = (max(t_end) - min(t_go)) if t_go else float("nan")
    out = {
        "topology": topo["name"],
        "workload": workload.name,
        "seed_workload": workload.seed,
        "strategy": strategy,
        **report.stats(records, total),
        "violations": len(verdict["violations"]),
        "violation_types": verdict["counts"],
        "violation_examples": verdict["violations"][:8],
        "failures": verdict["failures"][:8],
        "failed_workers": len(verdict["failures"]),
        "loadavg_start": load_start[0],
        "loadavg_end": os.getloadavg()[0],
        "acquire_samples": [round(r["acquire_ms"], 2) for r in records if "acquire_ms" in r],
    }
    ok = [r for r in records if "t_released" in r]
    out["acquire_p90"] = report.percentile([r["acquire_ms"] for r in ok], 90)
    return out


def run(
    lab: Lab,
    topologies: list[str],
    strategies: list[str],
    workloads: list[Workload],
    loads: list[str],
    cfg: Config,
    control: Workload | None = CONTROL_WORKLOAD,
    repeat: int = 1,
    on_result=None,
) -> dict:
    """The whole matrix; strategies interleaved (shuffled) within every workload."""
    rng = random.Random(cfg.seed)
    results: list[dict] = []
    synthetic: dict[str, dict] = {}
    tmp = tempfile.mkdtemp(prefix="races-run-", dir=lab.root)
    n = 0
    for topo_name in topologies:
        topo = lab.topology(topo_name)
        create_schema(topo)
        for load in loads:
            syn = Synthetic(topo, cfg.synthetic_workers, tmp) if load == "on" else None
            try:
                for rnd in range(repeat):
                    plan = [(w, s) for w in workloads for s in _shuffled(rng, strategies)]
                    if control is not None:
                        plan.append((control, CONTROL))
                    for workload, strategy in plan:
                        n += 1
                        try:
                            res = run_one(lab, topo, strategy, workload, cfg, f"r{n}", tmp)
                        except Exception as exc:
                            # One broken run is reported and the rest go on.
                            res = _broken(topo_name, workload, strategy, exc)
                        res["load"] = load
                        res["round"] = rnd if repeat > 1 else 0
                        results.append(res)
                        if on_result:
                            on_result(res)
            finally:
                if syn is not None:
                    synthetic[f"{topo_name}"] = syn.stop()
        for r in results:
            if r["topology"] == topo_name and r["load"] == "on" and topo_name in synthetic:
                r["synthetic_ops_per_s"] = round(synthetic[topo_name].get("ops_per_s", 0.0), 1)
    return {"results": results, "synthetic": synthetic}


def _broken(topo: str, workload: Workload, strategy: str, exc: Exception) -> dict:
    error = f"run failed: {type(exc).__name__}: {exc}"
    out = {
        "topology": topo, "workload": workload.name, "seed_workload": workload.seed,
        "strategy": strategy, **report.stats([], float("nan")), "violations": 0,
        "violation_types": {}, "violation_examples": [], "failed_workers": workload.workers,
        "failures": [{"worker": -1, "row": "*", "error": error}],
        "loadavg_start": os.getloadavg()[0], "loadavg_end": os.getloadavg()[0],
        "acquire_samples": [], "acquire_p90": float("nan"),
    }  # fmt: skip
    return out


def _shuffled(rng: random.Random, items: list[str]) -> list[str]:
    items = list(items)
    rng.shuffle(items)
    return items


def quick(cfg: Config | None = None, load: str = "off") -> dict:
    """The small mode the functional test runs: every strategy once on the cluster."""
    cfg = cfg or Config(
        check_timeout=2.0, acquire_timeout=30.0, release_timeout=20.0, run_timeout=60.0,
        procs=3, synthetic_workers=10,
    )  # fmt: skip
    with Lab(["galera"]) as lab:
        out = run(lab, ["galera"], CORRECT, QUICK_WORKLOADS, [load], cfg)
        out["lab_timings"] = dict(lab.timings)
    return out
