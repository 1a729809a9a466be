"""The API-races study's quick mode on a real three-node Galera cluster behind HAProxy.

``benchmarks/races`` starts the cluster (three ``mariadbd`` with the Galera
provider, rsync SST), HAProxy round-robin per request, Redis and the
GlusterFS volume for the tooz file locks, runs every correct strategy on a
small contended workload and the negative control (read, then an
unconditional write) on another, and stops everything by PID. The checker
reads the database's own audit trail and what every node showed; here it
must find no violation and no failed worker for any correct strategy, and
at least one violation for the control.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

from benchmarks.races import runner
from benchmarks.races.strategies import CONTROL, CORRECT
from benchmarks.races.topology import GALERA_PROVIDER
from tests.functional import gluster

pytestmark = pytest.mark.functional


def _missing() -> list[str]:
    missing = [b for b in ("mariadbd", "mariadb-install-db", "haproxy", "rsync", "redis-server")
               if shutil.which(b) is None]  # fmt: skip
    if not os.path.exists(GALERA_PROVIDER):
        missing.append("galera-4")
    if not gluster.available():
        missing.append("glusterfs")
    return missing


def test_quick_mode_on_galera():
    if os.geteuid() != 0:
        pytest.skip("starts glusterd in a network namespace and Galera nodes as mysql: needs root")
    missing = _missing()
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: run tools/bootstrap.sh --test")
    t0 = time.monotonic()
    out = runner.quick()
    elapsed = time.monotonic() - t0
    results = {r["strategy"]: r for r in out["results"]}
    assert set(results) == {*CORRECT, CONTROL}
    summary = {
        name: (r["changes_ok"], r["failed_workers"], r["violation_types"])
        for name, r in results.items()
    }
    for name in CORRECT:
        r = results[name]
        workload = runner.QUICK_WORKLOADS[0]
        assert r["failed_workers"] == 0, (name, r["failures"], summary)
        assert r["violations"] == 0, (name, r["violation_examples"], summary)
        assert r["changes_ok"] == workload.workers * workload.changes, (name, summary)
    control = results[CONTROL]
    assert control["violations"] > 0, ("the negative control was not caught", summary)
    print(f"races quick mode: {elapsed:.0f} s, lab start-up {out['lab_timings']}; {summary}")
