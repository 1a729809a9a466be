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
    # The post-run checks themselves must see the damage: worker errors alone
    # (often the .info fencing doing its job) would not prove they have teeth.
    assert report["problems"], f"no locks and the checks found nothing ({len(errors)} errors)"


def test_files_left_by_a_failed_copy_are_found_and_cleaned(tmp_path):
    """A clone or copy that failed half-way must not leave its files unnoticed."""
    driver = v.start_driver(v.write_config(str(tmp_path)))
    try:
        registries = workload.prepare(driver, driver.conf, 1)
        derived = os.path.join(workload.registry_dir(driver.conf), "derived")
        os.makedirs(derived)
        lost = "0b5e55ed-0000-4000-8000-000000000001"
        open(os.path.join(derived, f"{lost}.pending"), "w").close()
        share = driver.share_path(driver.shares[0])
        open(os.path.join(share, f".volume-{lost}.tmp"), "w").close()
        report = workload.verify(driver, registries, derived)
        assert report["problems"] == [f"a failed copy to volume {lost} left ['.volume-{lost}.tmp']"]
        workload.cleanup(driver, registries, derived)
        assert not [n for n in os.listdir(share) if lost in n]
    finally:
        service.stop()
