"""The command runner of the privileged daemon, with real child processes (no root needed)."""

from __future__ import annotations

import subprocess
import sys

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


def test_a_fenced_child_is_polled_under_eventlet_monkey_patching():
    # cinder-volume runs monkey-patched: subprocess is then eventlet's module,
    # with a TimeoutExpired class of its own, while communicate() raises the
    # standard library's. Each poll of a child running longer than one
    # FENCE_POLL must still be caught (it crashed the command before).
    script = (
        "import eventlet; eventlet.monkey_patch()\n"
        "from remotefs_aa.privsep import runner\n"
        "assert runner._fenced(['sleep', '0.35'], None, 10.0, ()) == (0, '', '')\n"
        "try:\n"
        "    runner.run(['sleep', '5'], timeout=0.3)\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "PrivilegedCommandFailed"
