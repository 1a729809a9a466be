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
    assert shown["snapshot_order"] == [snap["id"]] and shown["latest_snapshot"] == snap["id"]
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
    deleted = _json(config, "snapshot", "delete", vol["id"], snap["id"])
    assert deleted["deleted"] is True and "reason" not in deleted
    # Deleting it again still succeeds (Cinder's rule) but says it was not there.
    again = _json(config, "snapshot", "delete", vol["id"], snap["id"])
    assert again["deleted"] is False and again["reason"] == "not found"
    proc = run_cli("--config-file", config, "snapshot", "delete", vol["id"], "NOSUCH")
    assert proc.returncode == 0
    assert "deleted    false" in proc.stdout and "reason     not found" in proc.stdout
    stats = _json(config, "stats")
    assert stats["provisioned_capacity_gb"] == pytest.approx(6, abs=0.01)
    locks = tmp_path / "coordination"  # the tooz file backend's directory
    assert (locks / f"remotefs_aa-{vol['id']}").exists()
    for volume in (vol, clone, copy):
        _json(config, "volume", "delete", volume["id"])
    assert _json(config, "volume", "list") == []
    # Deleted volumes leave no lock files, and no start left its probe file.
    assert sorted(p.name for p in locks.glob("remotefs_aa-*")) == []


def test_local_provider_cleans_a_deleted_volumes_lock_file(tmp_path):
    config = v.write_config(str(tmp_path))
    with open(config, "a") as f:
        f.write(f"lock_provider = local\nlock_path = {tmp_path}/locks\n")
    vol = _json(config, "volume", "create", "--size", "1")
    assert (tmp_path / "locks" / f"remotefs_aa-{vol['id']}").exists()
    _json(config, "volume", "delete", vol["id"])
    assert list((tmp_path / "locks").iterdir()) == []


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
    proc = run_cli(
        "--config-file", config, "snapshot", "create", "no-such-volume", "--format", "json"
    )
    error = json.loads(proc.stderr)  # the whole of stderr: one JSON object
    assert proc.returncode == error["exit_code"] == 1 and proc.stdout == ""
    assert "volume no-such-volume is on none of the shares" in error["error"]


def test_demo_runs_and_verifies(tmp_path):
    config = v.write_config(str(tmp_path))
    out = _json(config, "demo", "--workers", "2", "--volumes", "2", "--operations", "6")
    assert out["operations_total"] == 12
    assert out["errors"] == [] and out["problems"] == []
    assert out["verified"]["volumes"] == 2


def test_one_truncated_info_file_does_not_hide_the_share(tmp_path):
    config = v.write_config(str(tmp_path))
    good = _json(config, "volume", "create", "--size", "1")
    bad = _json(config, "volume", "create", "--size", "2")
    _json(config, "snapshot", "create", bad["id"])
    info = f"{bad['share']}/volume-{bad['id']}.info"
    with open(info, "r+") as f:
        f.truncate(12)
    proc = run_cli("--config-file", config, "volume", "list", "--format", "json")
    assert proc.returncode == 1  # every volume listed, but one needs repair
    listed = {item["id"]: item for item in json.loads(proc.stdout)}
    assert listed[good["id"]]["status"] == "available" and listed[good["id"]]["error"] is None
    assert listed[bad["id"]]["status"] == "error" and listed[bad["id"]]["size_gib"] == 2
    assert "is unusable: not JSON" in listed[bad["id"]]["error"]
    proc = run_cli("--config-file", config, "volume", "list")
    assert good["id"] in proc.stdout and f"volume {bad['id']}: snapshot info file" in proc.stdout


def test_show_lists_snapshots_as_taken_and_revert_names_the_latest(tmp_path):
    config = v.write_config(str(tmp_path))
    vol = _json(config, "volume", "create", "--size", "1")
    for sid in ("s-b", "s-a"):  # taken in this order, not alphabetical
        _json(config, "snapshot", "create", vol["id"], "--id", sid)
    shown = _json(config, "volume", "show", vol["id"])
    assert shown["snapshot_order"] == ["s-b", "s-a"] and shown["latest_snapshot"] == "s-a"
    proc = run_cli("--config-file", config, "volume", "show", vol["id"])
    assert "snapshots (oldest first)  s-b, s-a (latest)" in proc.stdout
    proc = run_cli("--config-file", config, "snapshot", "revert", vol["id"], "s-b")
    assert proc.returncode == 1
    assert "latest snapshot (as in Cinder), s-a; s-b is older" in proc.stderr


def test_demo_text_output_is_honest(tmp_path):
    """The bar's rate and the summary's come from one clock; waits keep their decimal."""
    import re

    config = v.write_config(str(tmp_path))
    proc = run_cli(
        "--config-file", config, "demo", "--workers", "2", "--volumes", "1",
        "--operations", "5", timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    bar_rate = re.findall(r"10/10 operations, ([\d.]+)/s", proc.stderr)[-1]
    summary_rate = re.search(r"in [\d.]+ s \(([\d.]+)/s, as on the bar\)", proc.stdout).group(1)
    assert bar_rate == summary_rate
    waits = re.findall(r"^\s*\d+\s+\d+\s+([\d.]+)$", proc.stdout, re.M)
    assert len(waits) == 2 and all(re.fullmatch(r"\d+\.\d", w) for w in waits)


def test_volume_repair_rebuilds_a_truncated_info_file_after_showing_it(tmp_path):
    config = v.write_config(str(tmp_path))
    vol = _json(config, "volume", "create", "--size", "1")
    for sid in ("s-2", "s-1"):
        _json(config, "snapshot", "create", vol["id"], "--id", sid)
    info = f"{vol['share']}/volume-{vol['id']}.info"
    with open(info) as f:
        good = json.load(f)
    with open(info, "r+") as f:
        f.truncate(12)
    shown = run_cli("--config-file", config, "volume", "repair", vol["id"])
    assert shown.returncode == 0, shown.stderr
    assert f'+ "active": "volume-{vol["id"]}.s-1",' in shown.stdout
    assert "not written: run again with --yes" in shown.stdout
    with open(info) as f:
        assert len(f.read()) == 12  # showing wrote nothing
    done = _json(config, "volume", "repair", vol["id"], "--yes")
    assert done["written"] and done["snapshot_order"] == ["s-2", "s-1"]
    shown = _json(config, "volume", "show", vol["id"], "--deep")
    assert shown["problems"] == [] and shown["snapshots"] == {
        k: val for k, val in good.items() if k.startswith("s-")
    }
    assert _json(config, "volume", "repair", vol["id"])["needed"] is False
    _json(config, "snapshot", "revert", vol["id"], "s-1")  # the chain works again
