"""The operator's commands, end to end in fresh processes: volume, snapshot, stats, demo."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests import REPO, run_cli
from tests.functional import volumes as v

pytestmark = pytest.mark.functional


def _json(config, *args):
    proc = run_cli("--config-file", config, *args, "--format", "json", timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_volume_and_snapshot_commands(tmp_path):
    config = v.write_config(str(tmp_path))
    vol = _json(config, "volume", "create", "--size", "1")
    snap = _json(config, "snapshot", "create", vol["id"])
    shown = _json(config, "volume", "show", vol["id"])
    assert shown["snapshots"] and snap["id"] in shown["snapshots"]
    assert shown["chain"] == [f"volume-{vol['id']}.{snap['id']}", f"volume-{vol['id']}"]
    assert shown["problems"] == []
    clone = _json(config, "volume", "create", "--size", "2", "--clone", vol["id"])
    copy = _json(
        config, "volume", "create", "--size", "1", "--from-snapshot", f"{vol['id']}:{snap['id']}"
    )
    listed = {item["id"]: item for item in _json(config, "volume", "list")}
    assert set(listed) == {vol["id"], clone["id"], copy["id"]}
    assert listed[clone["id"]]["size_gib"] == 2
    _json(config, "snapshot", "revert", vol["id"], snap["id"])
    _json(config, "volume", "extend", vol["id"], "3")
    assert _json(config, "volume", "show", vol["id"])["size_gib"] == 3
    _json(config, "snapshot", "delete", vol["id"], snap["id"])
    stats = _json(config, "stats")
    assert stats["provisioned_capacity_gb"] == pytest.approx(6, abs=0.01)
    for volume in (vol, clone, copy):
        _json(config, "volume", "delete", volume["id"])
    assert _json(config, "volume", "list") == []


def test_a_clone_or_copy_smaller_than_its_source_is_refused(tmp_path):
    """A 2 GiB clone of a 3 GiB volume was reported as 2 GiB and made 3 GiB."""
    config = v.write_config(str(tmp_path))
    src = _json(config, "volume", "create", "--size", "3")
    snap = _json(config, "snapshot", "create", src["id"])
    for how in (["--clone", src["id"]], ["--from-snapshot", f"{src['id']}:{snap['id']}"]):
        proc = run_cli("--config-file", config, "volume", "create", "--size", "2", *how)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "cannot be created" in proc.stderr and "at least that large" in proc.stderr
    # Nothing was made; a larger one is grown to its own size.
    assert [x["id"] for x in _json(config, "volume", "list")] == [src["id"]]
    bigger = _json(config, "volume", "create", "--size", "4", "--clone", src["id"])
    assert _json(config, "volume", "show", bigger["id"])["size_gib"] == 4


def test_volume_from_an_image_file_and_export(tmp_path):
    config = v.write_config(str(tmp_path))
    image = tmp_path / "guest.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "256M"], check=True)
    v.write_region(str(image), "qcow2", 3, 0x5A)
    vol = _json(config, "volume", "create", "--size", "1", "--image", str(image))
    assert vol["created"] == f"from image {image}"
    out = tmp_path / "exported.raw"
    exported = _json(config, "volume", "export", vol["id"], str(out))
    assert exported["bytes"] == 1024**3 and exported["disk_format"] == "raw"
    assert v.region_is(str(out), "raw", 3, 0x5A) and v.region_is(str(out), "raw", 0, 0)
    assert sorted(p.name for p in tmp_path.glob("exported*")) == ["exported.raw"]  # no sidecar

    # A refused image leaves no volume behind, and says why.
    proc = run_cli(
        "--config-file", config, "volume", "create", "--size", "1",
        "--image", str(image), "--image-format", "raw",
    )  # fmt: skip
    assert proc.returncode == 1
    assert "says disk_format 'raw' but the file is 'qcow2'" in proc.stderr
    assert [item["id"] for item in _json(config, "volume", "list")] == [vol["id"]]
    _json(config, "volume", "delete", vol["id"])


def test_busy_volume_is_a_clear_error_and_nothing_changes(tmp_path):
    """Another service holds the volume's lock: the operation waits its timeout, then says so."""
    config = v.write_config(str(tmp_path))
    with open(config, "a") as f:
        f.write("lock_acquire_timeout = 0.5\n")  # appended to [coordination]
    vol = _json(config, "volume", "create", "--size", "1")
    ready = tmp_path / "holding"
    holder = subprocess.Popen(
        [sys.executable, "-m", "remotefs_aa.cmd.main", "--config-file", config, "lock", "run",
         vol["id"], "--", "sh", "-c", f"touch {ready}; sleep 30"],
        cwd=REPO,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), "the holder never took the lock"
        proc = run_cli("--config-file", config, "snapshot", "create", vol["id"], timeout=60)
        assert proc.returncode == 75, proc.stderr
        assert f"remotefs_aa-{vol['id']}" in proc.stderr and "timed out" in proc.stderr
        assert "lock_acquire_timeout" in proc.stderr  # what to do about it
    finally:
        holder.kill()
        holder.wait()
    shown = _json(config, "volume", "show", vol["id"])
    assert shown["snapshots"] == {} and shown["problems"] == []
    _json(config, "volume", "delete", vol["id"])


def test_unknown_volume_is_a_clear_error(tmp_path):
    config = v.write_config(str(tmp_path))
    proc = run_cli("--config-file", config, "snapshot", "create", "no-such-volume")
    assert proc.returncode == 1
    assert "volume no-such-volume is on none of the shares" in proc.stderr


def test_demo_runs_and_verifies(tmp_path):
    config = v.write_config(str(tmp_path))
    out = _json(config, "demo", "--workers", "2", "--volumes", "2", "--operations", "6")
    assert out["operations_total"] == 12
    assert out["errors"] == [] and out["problems"] == []
    assert out["verified"]["volumes"] == 2
