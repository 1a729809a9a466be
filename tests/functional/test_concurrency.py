"""Several processes hammer the same volumes; afterwards every chain and byte verifies.

Four worker processes, each with its own driver, privsep daemon and lock
provider connection, run random snapshot create / delete / revert, clone and
create-from-snapshot operations on the same three volumes for a fixed time
(``remotefs-aa demo-worker``, the main job's worker). Then this process checks
every chain (qemu-img check on every overlay, .info against the files, no
orphans) and reads every snapshot's and volume's byte pattern back.

Locks come from the tooz file backend and from a real Redis server. The same
workload with a provider that locks nothing must be caught by the same checks,
which proves they have teeth.
"""

from __future__ import annotations

import os

import pytest

from remotefs_aa import service, workload
from tests.functional import servers
from tests.functional import volumes as v

pytestmark = pytest.mark.functional

WORKERS = 4
DURATION = 8.0


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    server = servers.SERVERS["redis"](workdir=str(tmp_path_factory.mktemp("redis")))
    try:
        server.start()
        yield server.url
    finally:
        server.cleanup()


def _run(tmp_path, backend_url=None, provider=None):
    config = v.write_config(str(tmp_path), backend_url=backend_url)
    if provider:
        with open(config, "a") as f:
            f.write(f"lock_provider = {provider}\n")
    driver = v.start_driver(config)
    try:
        conf = driver.conf
        registries = workload.prepare(driver, conf, 3)
        derived = os.path.join(workload.registry_dir(conf), "derived")
        os.makedirs(derived)
        results = v.run_demo_workers([config] * WORKERS, registries, derived, DURATION, 1000)
        report = workload.verify(driver, registries, derived)
        return results, report
    finally:
        service.stop()


@pytest.mark.parametrize("backend", ["file", "redis"])
def test_workload_keeps_every_chain_intact(tmp_path, backend, request):
    url = request.getfixturevalue("redis_url") if backend == "redis" else None
    results, report = _run(tmp_path, backend_url=url)
    errors = [e for r in results for e in r["errors"]]
    total = sum(r["operations"] for r in results)
    assert errors == []
    assert report["problems"] == []
    assert total >= 4 * WORKERS, f"only {total} operations: the test proved little"
    assert all(r["operations"] > 0 for r in results), "a worker was starved"
    checked = report["checked"]
    assert checked["volumes"] == 3 and checked["snapshots"] + checked["derived"] > 0


def test_without_locks_the_checks_catch_the_damage(tmp_path):
    results, report = _run(tmp_path, provider="tests.functional.nolock.NoLockProvider")
    errors = [e for r in results for e in r["errors"]]
    assert errors or report["problems"], "no locks and nothing caught: the checks have no teeth"
