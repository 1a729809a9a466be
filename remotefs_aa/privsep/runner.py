"""Run one command inside the privileged daemon, cheaply and bounded.

No ``preexec_fn``: with it Python must fork the whole (large) daemon; without
it subprocess uses vfork, which costs a fraction. Resource limits are applied
by ``prlimit(1)`` in front of the command instead. Every command has a timeout
and a minimal environment.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import threading

from remotefs_aa import exception
from remotefs_aa.privsep import fence

_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}

#: Put between ``prlimit`` and a memory-limited command. RLIMIT_AS counts
#: reserved address space, and glibc reserves 64 MiB per malloc arena, one
#: arena per thread up to 8 per CPU. qemu-img's I/O thread pool grows under
#: load (a request that finds no idle worker starts a new one), so a loaded
#: host saw ``qemu-img check`` of an ordinary chain abort at the 1 GiB limit
#: ("failed to allocate memory for stack"), while the same check needs under
#: 200 MiB on a quiet one. Two arenas keep the limit a limit on memory that is
#: used, not on threads that happened to start. As an argument (not in the
#: environment) so the rootwrap modes, whose sudo and daemon reset the
#: environment, run exactly the same command.
BOUNDED_MALLOC = ["env", "MALLOC_ARENA_MAX=2"]


class Executor:
    """Starts a child process as root; subclasses choose how."""

    #: True when file operations must be commands (no root in this process).
    via_commands = False

    def execute(
        self,
        argv: list[str],
        stdin: str | None,
        timeout: float,
        pass_fds: tuple[int, ...] = (),
    ) -> tuple[int, str, str]:
        """Run ``argv``; return (exit code, stdout, stderr).

        ``pass_fds``: descriptors the child keeps (the images it is given as
        ``/proc/self/fd/N``); every other descriptor is closed in the child.
        Inside a fenced step the child is ended when the lease's deadline
        passes (see ``fence.py``).
        """
        if fence.running_deadline() is not None:
            return _fenced(argv, stdin, timeout, pass_fds)
        proc = subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_ENV,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            check=False,
            pass_fds=pass_fds,
            process_group=_child_group(),
        )
        return proc.returncode, proc.stdout, proc.stderr


#: Set in the file daemon (``privsep.daemon``): its children join the process
#: group of a watchdog that kills the whole group when the daemon dies (SIGKILL
#: included), so no qemu-img outlives the daemon that started it. (A
#: parent-death signal would need ``preexec_fn``: +2.7 ms a command here, as
#: Python then forks instead of vforking; ``setpriv --pdeathsig`` +0.85 ms.)
use_watchdog = False
_watchdog: subprocess.Popen | None = None
_watchdog_lock = threading.Lock()

_WATCHDOG = """
import os, select, signal, sys
daemon = os.pidfd_open(int(sys.argv[1]))
select.select([daemon], [], [])
os.killpg(0, signal.SIGKILL)
"""


def _child_group() -> int | None:
    """The process group children join: the watchdog's (started once), or None."""
    global _watchdog
    if not use_watchdog:
        return None
    with _watchdog_lock:
        if _watchdog is None or _watchdog.poll() is not None:
            _watchdog = subprocess.Popen(
                [sys.executable, "-I", "-c", _WATCHDOG, str(os.getpid())],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=_ENV,
                process_group=0,
            )
        return _watchdog.pid


#: How often a fenced child's deadline is looked at: the enforcement delay is at
#: most this (plus the kill), well inside the lease margin (``coordination``).
FENCE_POLL = 0.1


def _timeouts() -> tuple[type[BaseException], ...]:
    """Every class a child's timeout may raise as: eventlet brings a second one.

    Under eventlet's monkey-patching (cinder-volume's default) the
    ``subprocess`` module this module sees is eventlet's, whose
    ``TimeoutExpired`` is its own class, while ``Popen.communicate`` still
    raises the standard library's: ``except subprocess.TimeoutExpired`` alone
    lets every poll of a running child escape as a crash.
    """
    found: list[type[BaseException]] = [subprocess.TimeoutExpired]
    for name in ("__original_module_subprocess", "eventlet.green.subprocess", "subprocess"):
        cls = getattr(sys.modules.get(name), "TimeoutExpired", None)
        if isinstance(cls, type) and issubclass(cls, BaseException) and cls not in found:
            found.append(cls)
    return tuple(found)


def _fenced(
    argv: list[str], stdin: str | None, timeout: float, pass_fds: tuple[int, ...]
) -> tuple[int, str, str]:
    """Run a child under the running step's deadline; LeaseExpired when it passes."""
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_ENV,
        pass_fds=pass_fds,
        process_group=_child_group(),
    )
    give_up = fence.now() + timeout
    pending: str | None = stdin
    while True:
        token, deadline = fence.running_deadline() or ("", float("inf"))
        left = deadline - fence.now()
        if left <= 0:
            proc.kill()
            proc.communicate()
            raise exception.LeaseExpired(
                token, argv[0], "its lease ran out while it ran; the command was ended"
            )
        if fence.now() >= give_up:
            proc.kill()
            proc.communicate()
            raise subprocess.TimeoutExpired(argv, timeout)
        try:
            out, err = proc.communicate(pending, timeout=max(0.001, min(left, FENCE_POLL)))
            return proc.returncode, out, err
        except _timeouts():
            pending = None  # handed over by the first communicate


class _RootwrapExecutor(Executor):
    """Commands gain root through oslo.rootwrap and its filters."""

    via_commands = True

    def execute(
        self,
        argv: list[str],
        stdin: str | None,
        timeout: float,
        pass_fds: tuple[int, ...] = (),
    ) -> tuple[int, str, str]:
        if pass_fds:
            raise exception.PrivilegedArgumentRefused(
                "the rootwrap modes cannot hand a command open files; this operation "
                "needs [privileged] mode = privsep"
            )
        # Rootwrap has no per-command timeout, so timeout(1) goes in front;
        # the generated filters allow exactly this prefix.
        wrapped = ["timeout", "--kill-after=5", str(int(timeout)), *argv]
        rc, out, err = self._execute(wrapped, stdin, timeout + 10)
        return (-1 if rc == 124 else rc), out, err

    def _execute(self, argv: list[str], stdin: str | None, timeout: float) -> tuple[int, str, str]:
        raise NotImplementedError


class SudoRootwrapExecutor(_RootwrapExecutor):
    """One ``sudo oslo-rootwrap CONF argv`` per call: the legacy, slow way.

    Kept so the benchmark can show what the daemons save. The command goes
    through sudo even when the caller is root (unlike oslo.concurrency's
    execute, which drops its root_helper for root callers).
    """

    def __init__(self, root_helper: list[str], rootwrap: str, config: str) -> None:
        self.prefix = [*root_helper, rootwrap, config]

    def _execute(self, argv: list[str], stdin: str | None, timeout: float) -> tuple[int, str, str]:
        return Executor.execute(self, [*self.prefix, *argv], stdin, timeout)


class RootwrapDaemonExecutor(_RootwrapExecutor):
    """Commands sent to one long-lived ``oslo-rootwrap-daemon``."""

    def __init__(self, root_helper: list[str], daemon: str, config: str) -> None:
        from oslo_rootwrap import client

        self.client = client.Client([*root_helper, daemon, config])

    def _execute(self, argv: list[str], stdin: str | None, timeout: float) -> tuple[int, str, str]:
        from multiprocessing.managers import RemoteError

        try:
            return self.client.execute(argv, stdin)
        except RemoteError as exc:
            # oslo.rootwrap 7.x answers a command no filter allows with an
            # exception it cannot serialise, not with its "unauthorized" code.
            last = str(exc).strip().splitlines()[-2:] or [""]
            return 99, "", f"refused by the rootwrap daemon (no filter allows it?): {last[0]}"
        except (OSError, EOFError) as exc:
            raise exception.PrivilegedHelperUnavailable(
                f"the rootwrap daemon could not run {argv[3]}: {exc}; check "
                f"[privileged] root_helper, rootwrap_config and the sudo rule"
            ) from exc


_executor: Executor = Executor()


def set_executor(executor: Executor) -> None:
    """Choose how commands gain root (see ``remotefs_aa.privsep.init``)."""
    global _executor
    _executor = executor


def via_commands() -> bool:
    """True when this process is not root and file ops must be commands."""
    return _executor.via_commands


#: Capabilities the children of this process may hold (their ambient set);
#: set inside the mount daemon only (see ``caps.ambient_for_children``).
child_capabilities: list[int] | None = None


def run(
    argv: list[str],
    timeout: float,
    max_memory_mib: int | None = None,
    max_cpu_seconds: int | None = None,
    ok_codes: tuple[int, ...] = (0,),
    stdin: str | None = None,
    pass_fds: tuple[int, ...] = (),
    shown: str | None = None,
) -> tuple[int, str, str]:
    """Run ``argv``; return (exit code, stdout, stderr) or raise PrivilegedCommandFailed.

    ``shown``: how errors name the command (instead of an argv full of
    ``json:`` specs and descriptor numbers).
    """
    if child_capabilities is not None:
        from remotefs_aa.privsep import caps

        caps.ambient_for_children(child_capabilities)
    limits = []
    if max_memory_mib:
        limits.append(f"--as={max_memory_mib * 1024 * 1024}")
    if max_cpu_seconds:
        limits.append(f"--cpu={max_cpu_seconds}")
    full = ["prlimit", *limits, "--", *BOUNDED_MALLOC, *argv] if limits else list(argv)
    shown = shown or shlex.join(argv)
    try:
        rc, out, err = _executor.execute(full, stdin, timeout, pass_fds)
    except _timeouts() as exc:
        raw = getattr(exc, "stderr", None)
        stderr = raw.decode(errors="replace") if isinstance(raw, bytes) else ""
        raise exception.PrivilegedCommandFailed(
            f"{shown} (after {timeout} s)", -1, stderr or ""
        ) from exc
    except OSError as exc:
        raise exception.PrivilegedCommandFailed(shown, 127, str(exc)) from exc
    if rc not in ok_codes:
        raise exception.PrivilegedCommandFailed(shown, rc, err)
    return rc, out, err
