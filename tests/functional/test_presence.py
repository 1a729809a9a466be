"""Two services on one share whose locks do not exclude each other: the second refuses to start."""

from __future__ import annotations

import os

import pytest

from remotefs_aa import service
from tests import run_cli
from tests.functional import volumes as v

pytestmark = pytest.mark.functional


def _config(tmp_path, name: str, share: str, coordination: str) -> str:
    directory = tmp_path / name
    directory.mkdir()
    config = v.write_config(
        str(directory), backend_url=f"file://{coordination}", local_shares=share, host=name
    )
    with open(config, "a") as f:  # both may act on the one share
        f.write(f"[privileged]\nallowed_paths = $state_path,{share}\n")
    return config


def _records(share: str) -> list[str]:
    return sorted(os.listdir(os.path.join(share, ".remotefs_aa", "services")))


def test_a_second_service_with_other_locks_is_refused_naming_the_first(tmp_path):
    share = str(tmp_path / "share")
    first = _config(tmp_path, "host-a", share, str(tmp_path / "locks-a"))
    second = _config(tmp_path, "host-b", share, str(tmp_path / "locks-b"))
    driver = service.start(service.make_config(["--config-file", first]))
    try:
        assert _records(share) == [f"host-a-{os.getpid()}.json"]
        refused = run_cli("--config-file", second, "volume", "list")
        assert refused.returncode == 78, refused.stderr
        assert "host host-a" in refused.stderr and "locks-a" in refused.stderr
        assert "locks-b" in refused.stderr and "same shared lock backend" in refused.stderr
        assert _records(share) == [f"host-a-{os.getpid()}.json"]  # the refused one left none
        assert driver.list_volumes() == []  # the first service is unharmed
    finally:
        service.stop()
    assert _records(share) == []  # the first left cleanly


def test_services_sharing_one_lock_backend_start_side_by_side(tmp_path):
    share = str(tmp_path / "share")
    locks = str(tmp_path / "locks")
    first = _config(tmp_path, "host-a", share, locks)
    second = _config(tmp_path, "host-b", share, locks)
    service.start(service.make_config(["--config-file", first]))
    try:
        listed = run_cli("--config-file", second, "volume", "list")
        assert listed.returncode == 0, listed.stderr
    finally:
        service.stop()
