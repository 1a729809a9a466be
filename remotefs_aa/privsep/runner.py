"""Run one command inside the privileged daemon, cheaply and bounded.

No ``preexec_fn``: with it Python must fork the whole (large) daemon; without
it subprocess uses vfork, which costs a fraction. Resource limits are applied
by ``prlimit(1)`` in front of the command instead. Every command has a timeout
and a minimal environment.
"""

from __future__ import annotations

import shlex
import subprocess

from remotefs_aa import exception

_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


def run(
    argv: list[str],
    timeout: float,
    max_memory_mib: int | None = None,
    max_cpu_seconds: int | None = None,
    ok_codes: tuple[int, ...] = (0,),
) -> tuple[int, str, str]:
    """Run ``argv``; return (exit code, stdout, stderr) or raise PrivilegedCommandFailed."""
    limits = []
    if max_memory_mib:
        limits.append(f"--as={max_memory_mib * 1024 * 1024}")
    if max_cpu_seconds:
        limits.append(f"--cpu={max_cpu_seconds}")
    full = ["prlimit", *limits, "--", *argv] if limits else list(argv)
    shown = shlex.join(argv)
    try:
        proc = subprocess.run(
            full,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_ENV,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        raise exception.PrivilegedCommandFailed(
            f"{shown} (after {timeout} s)", -1, stderr or ""
        ) from exc
    except OSError as exc:
        raise exception.PrivilegedCommandFailed(shown, 127, str(exc)) from exc
    if proc.returncode not in ok_codes:
        raise exception.PrivilegedCommandFailed(shown, proc.returncode, proc.stderr)
    return proc.returncode, proc.stdout, proc.stderr
