"""The command runner of the privileged daemon, with real child processes (no root needed)."""

from __future__ import annotations

import pytest

from remotefs_aa import exception
from remotefs_aa.privsep import runner


def test_limited_command_gets_its_limits_and_a_bounded_allocator():
    # What qemu-img info/check get: without the arena bound, a loaded host's
    # qemu-img reserved more address space per thread than the limit allows.
    _rc, out, _err = runner.run(
        ["sh", "-c", 'echo "$MALLOC_ARENA_MAX $(ulimit -v) $(ulimit -t)"'],
        timeout=10,
        max_memory_mib=512,
        max_cpu_seconds=7,
    )
    assert out.split() == ["2", str(512 * 1024), "7"]


def test_unlimited_command_runs_as_given():
    _rc, out, _err = runner.run(["sh", "-c", 'echo "[$MALLOC_ARENA_MAX] $(ulimit -v)"'], 10)
    assert out.split() == ["[]", "unlimited"]


def test_failure_names_the_command_not_the_wrapper():
    with pytest.raises(exception.PrivilegedCommandFailed) as err:
        runner.run(["sh", "-c", "echo broken >&2; exit 3"], timeout=10, max_memory_mib=256)
    assert str(err.value).startswith("sh -c ")
    assert "exit code 3" in str(err.value) and "broken" in str(err.value)
