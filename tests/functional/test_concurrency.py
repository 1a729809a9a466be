"""Several processes hammer the same volumes through the driver's front door; a history checks it.

Four worker processes (``remotefs-aa demo-worker``, the main job's worker), each
with its own driver, privsep daemon and lock provider connection, run random
snapshot create / delete / revert, clone, create-from-snapshot, extend, create
(and image copy) and delete operations on the same three volumes for a fixed
time, calling only the driver's public, decorated methods, with no lock of
their own; the volumes' guests write fresh regions meanwhile, without locks
too. Each process writes a history. Then this process replays it
(remotefs_aa.checker) and compares the model with every chain (qemu-img check
on every overlay, .info against the files, no orphans) and every byte of every
view.

Locks come from the tooz file backend and from a real Redis server. The same
workload with a provider that locks nothing must be caught by the same checks
(the driver's own ``synchronized`` then excludes no one), which proves they
have teeth.
"""

from __future__ import annotations

import os

import pytest

from remotefs_aa import service, workload
from remotefs_aa.objects import Volume
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
        workspace = workload.Workspace(os.path.join(driver.conf.state_path, "workload"))
        workload.prepare(driver, workspace, 3)
        results = v.run_demo_workers([config] * WORKERS, workspace.root, DURATION, 1000)
        report = workload.verify(driver, workspace)
        workload.cleanup(driver, workspace)
        return results, report
    finally:
        service.stop()


def _summary(results, report) -> str:
    ok = sum(sum(r["ok"].values()) for r in results)
    refused = report["refused"]
    return (
        f"{sum(r['operations'] for r in results)} steps, {ok} operations succeeded, "
        f"refused {refused}, checked {report['checked']}, {len(report['errors'])} errors, "
        f"{len(report['problems'])} problems"
    )


@pytest.mark.parametrize("backend", ["file", "redis"])
def test_workload_keeps_every_chain_intact(tmp_path, backend, request):
    url = request.getfixturevalue("redis_url") if backend == "redis" else None
    results, report = _run(tmp_path, backend_url=url)
    print(_summary(results, report))
    assert report["errors"] == [], "\n".join(report["errors"][:5])
    assert report["problems"] == [], "\n".join(report["problems"][:10])
    total = sum(r["operations"] for r in results)
    assert total >= 4 * WORKERS, f"only {total} operations: the test proved little"
    assert all(r["operations"] > 0 for r in results), "a worker was starved"
    checked = report["checked"]
    assert checked["volumes"] == 3 and checked["snapshots"] + checked["derived"] > 0
    # The guests wrote, and most writes are pinned to one side of every change.
    assert checked["writes"] >= total // 2 and checked["regions"] > checked["ambiguous"] // 2


def test_without_locks_the_checks_catch_the_damage(tmp_path):
    results, report = _run(tmp_path, provider="tests.functional.nolock.NoLockProvider")
    print(_summary(results, report))
    for line in report["problems"][:15]:
        print("  found:", line)
    # The post-run checks themselves must see the damage: operation errors alone
    # (often the .info fencing doing its job) would not prove they have teeth.
    assert report["problems"], (
        f"no locks and the checks found nothing ({len(report['errors'])} errors)"
    )


def test_files_left_by_a_failed_copy_are_found_and_cleaned(tmp_path):
    """A clone that failed must leave no file; one that did is found, and cleaned up."""
    driver = v.start_driver(v.write_config(str(tmp_path)))
    try:
        workspace = workload.Workspace(os.path.join(driver.conf.state_path, "workload"))
        workload.prepare(driver, workspace, 1)
        rec = workspace.recorder(None, worker=0)
        gone = Volume(id="0b5e55ed-0000-4000-8000-00000000000a", provider_location=driver.shares[0])
        lost = Volume(id="0b5e55ed-0000-4000-8000-000000000001", size=1)
        # A real failed call through the front door: its source does not exist.
        done = rec.call(
            "create_cloned_volume",
            driver.create_cloned_volume,
            lost,
            gone,
            fields={"volume": gone.id, "new_volume": lost.id, "size": 1},
        )
        rec.close()
        assert not done.ok
        assert workload.verify(driver, workspace)["problems"] == []
        # As if it had died half-way through its copy.
        share = driver.share_path(driver.shares[0])
        open(os.path.join(share, f".volume-{lost.id}.tmp"), "w").close()
        problems = workload.verify(driver, workspace)["problems"]
        assert len(problems) == 1, problems
        assert f"volume {lost.id} was never created" in problems[0]
        assert f"['.volume-{lost.id}.tmp']" in problems[0]
        workload.cleanup(driver, workspace)
        assert not [n for n in os.listdir(share) if lost.id in n]
    finally:
        service.stop()
