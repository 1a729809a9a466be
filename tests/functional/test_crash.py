"""SIGKILL a driver process between the steps of an operation; the next one recovers.

Each case builds a volume with two snapshots and known data (region 0 holds
0x11 in s1, 0x22 in s2, 0x33 in the active image), runs one operation in a
separate process that kills itself at a chosen step (before or after a given
privileged call), then runs the next operation on that volume from this
process. That operation must finish or roll back the interrupted one (the
intent recorded in the .info file says which), and afterwards the chain
verifies (qemu-img check, .info matches the files, no orphan) and every
snapshot and the active image read back the right bytes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys

import pytest

from remotefs_aa import exception, service
from remotefs_aa.objects import Snapshot, Volume
from tests import REPO
from tests.functional import volumes as v

pytestmark = pytest.mark.functional


@pytest.fixture
def env(tmp_path):
    config = v.write_config(str(tmp_path))
    driver = v.start_driver(config)
    yield config, driver
    service.stop()


def _prepared(driver):
    vol = Volume(size=1)
    vol.provider_location = driver.create_volume(vol)["provider_location"]
    s1, s2 = Snapshot(vol), Snapshot(vol)
    v.write_region(*v.active_image(driver, vol), 0, 0x11)
    driver.create_snapshot(s1)
    v.write_region(*v.active_image(driver, vol), 0, 0x22)
    driver.create_snapshot(s2)
    v.write_region(*v.active_image(driver, vol), 0, 0x33)
    return vol, s1, s2


def _crash(config, job):
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.functional.crashworker", config, json.dumps(job)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr)


def _intent(driver, vol):
    return driver.chain(vol).load().intent


CASES = [
    # op, snapshot, crash point, expected snapshots afterwards, expected active pattern
    ("create_snapshot", "new", ("create", 1, "after"), "s1 s2", 0x33),
    ("delete_snapshot", "s1", ("commit", 1, "after"), "s2", 0x33),
    ("delete_snapshot", "s1", ("rebase_unsafe", 1, "after"), "s2", 0x33),
    ("delete_snapshot", "s1", ("unlink", 1, "after"), "s2", 0x33),
    ("delete_snapshot", "s2", ("commit", 1, "after"), "s1", 0x33),
    ("delete_snapshot", "s2", ("unlink", 1, "after"), "s1", 0x33),
    ("revert", "s2", ("create", 1, "after"), "s1 s2", 0x22),
    ("revert", "s2", ("rename", 1, "after"), "s1 s2", 0x22),
]


@pytest.mark.parametrize(
    "op,target,crash,left,active", CASES, ids=[f"{c[0]}-{c[1]}-{c[2][0]}-{c[2][2]}" for c in CASES]
)
def test_crash_then_next_operation_recovers(env, op, target, crash, left, active):
    config, driver = env
    vol, s1, s2 = _prepared(driver)
    snaps = {"s1": s1, "s2": s2}
    snap_id = snaps[target].id if target in snaps else "crashed-new"
    job = {
        "op": op,
        "volume": dataclasses.asdict(vol),
        "snapshot_id": snap_id,
        "crash": dict(zip(("method", "nth", "when"), crash, strict=True)),
    }
    _crash(config, job)
    # The crash left a trace (an intent, or for a snapshot create an orphan
    # overlay); otherwise this case tests nothing.
    problems = driver.verify_volume(vol)["problems"]
    expected = "orphan file" if op == "create_snapshot" else "intent pending"
    assert any(expected in p for p in problems), problems

    # The next operation on the volume recovers first, then does its own work.
    s3 = Snapshot(vol)
    driver.create_snapshot(s3)
    assert _intent(driver, vol) is None
    if op == "create_snapshot":
        # An orphan overlay is found only by a listing, which operations do not
        # make: the periodic share sweep (Cinder's stats refresh) removes it.
        assert any("orphan file" in p for p in driver.verify_volume(vol)["problems"])
        assert driver.get_volume_stats(refresh=True)["pools"][0]["leftover_files"] == 0
    assert driver.verify_volume(vol)["problems"] == []
    state = driver.chain(vol).load()
    expected = {snaps[name].id for name in left.split()} | {s3.id}
    assert set(state.snapshots) == expected
    patterns = {"s1": 0x11, "s2": 0x22}
    for name in left.split():
        assert v.region_is(*v.snapshot_image(driver, snaps[name]), 0, patterns[name])
    assert v.region_is(*v.snapshot_image(driver, s3), 0, active)
    assert v.region_is(*v.active_image(driver, vol), 0, active)


@pytest.mark.parametrize("next_op", ["delete_snapshot", "revert"])
def test_orphan_of_a_crashed_snapshot_create_is_swept_by_the_share_sweep(env, next_op):
    """Other operations leave it (they read only the names the chain gives); the sweep goes."""
    config, driver = env
    vol, s1, s2 = _prepared(driver)
    job = {
        "op": "create_snapshot",
        "volume": dataclasses.asdict(vol),
        "snapshot_id": "crashed-new",
        "crash": {"method": "create", "nth": 1, "when": "after"},
    }
    _crash(config, job)
    assert any("orphan file" in p for p in driver.verify_volume(vol)["problems"])
    if next_op == "delete_snapshot":
        driver.delete_snapshot(s1)
        left, active = {s2.id}, 0x33
    else:
        driver.revert_to_snapshot(None, vol, s2)
        left, active = {s1.id, s2.id}, 0x22
    generation = driver.chain(vol).load().generation
    assert driver.get_volume_stats(refresh=True)["pools"][0]["leftover_files"] == 0
    assert driver.chain(vol).load().generation == generation + 1  # claimed, then removed
    assert driver.verify_volume(vol)["problems"] == []
    assert set(driver.chain(vol).load().snapshots) == left
    assert v.region_is(*v.snapshot_image(driver, s2), 0, 0x22)
    assert v.region_is(*v.active_image(driver, vol), 0, active)


def test_the_share_sweep_removes_an_orphan_and_a_dead_temp_file_of_one_volume(env):
    """Both kinds at once, through the privileged daemon (its lists come back as tuples)."""
    config, driver = env
    vol, _s1, s2 = _prepared(driver)
    job = {
        "op": "create_snapshot",
        "volume": dataclasses.asdict(vol),
        "snapshot_id": "crashed-new",
        "crash": {"method": "create", "nth": 1, "when": "after"},
    }
    _crash(config, job)
    tmp = os.path.join(driver.share_path(vol.provider_location), f".volume-{vol.id}.tmp")
    with open(tmp, "wb") as f:
        f.truncate(1 << 20)  # a create that died
    assert driver.get_volume_stats(refresh=True)["pools"][0]["leftover_files"] == 0
    assert not os.path.exists(tmp)
    assert driver.verify_volume(vol)["problems"] == []
    assert v.region_is(*v.snapshot_image(driver, s2), 0, 0x22)
    assert v.region_is(*v.active_image(driver, vol), 0, 0x33)


def test_crash_during_delete_volume_is_finished_by_the_next_delete(env):
    config, driver = env
    vol, _s1, _s2 = _prepared(driver)
    job = {
        "op": "delete_volume",
        "volume": dataclasses.asdict(vol),
        # After the .info file became the deletion marker, before any unlink.
        "crash": {"method": "unlink_many", "nth": 1, "when": "before"},
    }
    _crash(config, job)
    left = v.volume_files(driver, vol)
    assert f".volume-{vol.id}.deleting" in left and f"volume-{vol.id}.info" not in left
    with pytest.raises(exception.VolumeNotFound, match="deletion is now finished"):
        driver.create_snapshot(Snapshot(vol))
    assert v.volume_files(driver, vol) == []
    driver.delete_volume(vol)


def test_crash_during_clone_leaves_source_intact_and_no_volume(env):
    config, driver = env
    vol, s1, s2 = _prepared(driver)
    new = Volume(size=1, provider_location=vol.provider_location)
    job = {
        "op": "clone",
        "volume": dataclasses.asdict(vol),
        "new_volume": dataclasses.asdict(Volume(id=new.id, size=1)),
        "crash": {"method": "convert", "nth": 1, "when": "after"},
    }
    _crash(config, job)
    assert driver.verify_volume(vol)["problems"] == []
    left = v.volume_files(driver, new)
    assert f".volume-{new.id}.tmp" in left and f"volume-{new.id}" not in left
    # Retrying the clone replaces the leftover; deleting would remove it too.
    driver.create_cloned_volume(new, vol)
    assert v.region_is(*v.active_image(driver, new), 0, 0x33)
    assert driver.verify_volume(new)["problems"] == []
    assert v.region_is(*v.snapshot_image(driver, s1), 0, 0x11)
    assert v.region_is(*v.snapshot_image(driver, s2), 0, 0x22)
