"""The orchestrator's side of the fault tests: services as processes, their steps, their faults.

A :class:`Service` is one ``tests.functional.faultworker`` process: a real
volume service (its own driver, privileged daemons, lock connection and
mount), started inside the GlusterFS volume's network namespace. The test
sends it operations, optionally with a fault at the k-th privileged call
(see the worker's docstring), and reads back events and results. Every
process it starts is stopped by its PID in :meth:`Service.close` (SIGCONT
first, in case a test left it stopped), also when a test fails.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from tests import REPO
from tests.functional import gluster
from tests.functional.conftest import worker_env

REGION = 64 * 1024


class ServiceError(AssertionError):
    """A service did not answer as the test expected."""


class Service:
    """One faultworker process, talked to over its stdin/stdout."""

    def __init__(self, name: str, config: str, netns_path: str, log_dir: str) -> None:
        self.name = name
        self.config = config
        self.log_path = os.path.join(log_dir, f"{name}.log")
        self._ids = itertools.count(1)
        self._events: queue.Queue[dict] = queue.Queue()
        self._results: dict[int, dict] = {}
        self._steps: dict[int, dict] = {}
        self._cond = threading.Condition()
        self.children: list[int] = []  # every daemon pid seen, to check none survives
        log = open(self.log_path, "a")
        with gluster.entered(netns_path):
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.functional.faultworker", config],
                cwd=REPO,
                env=worker_env(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                bufsize=1,
            )
        log.close()
        self.pid = self.proc.pid
        self._reader = threading.Thread(target=self._read, name=f"read-{name}", daemon=True)
        self._reader.start()
        ready = self.event("ready", timeout=120)
        self.daemon = int(ready["daemon"])
        self.children.append(self.daemon)

    # -- protocol ------------------------------------------------------------------

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                data = json.loads(line)
            except ValueError:
                continue
            with self._cond:
                if "id" in data and data.get("id") is not None and "event" not in data:
                    self._results[int(data["id"])] = data
                elif data.get("event") == "step":
                    self._steps[int(data["op"])] = data
                self._cond.notify_all()
            if "event" in data:
                self._events.put(data)
        with self._cond:
            self._cond.notify_all()

    def send(self, **command: Any) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(command) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError as exc:
            raise ServiceError(f"{self.name} is gone: {self.tail()}") from exc

    def event(self, kind: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ServiceError(f"{self.name}: no {kind!r} event in {timeout} s: {self.tail()}")
            try:
                data = self._events.get(timeout=min(left, 0.5))
            except queue.Empty:
                if self.proc.poll() is not None and self._events.empty():
                    raise ServiceError(
                        f"{self.name} exited {self.proc.returncode} before {kind!r}: {self.tail()}"
                    ) from None
                continue
            if data.get("event") == kind:
                return data

    def start(self, op: str, fault: dict | None = None, **args: Any) -> int:
        """Send an operation; its id (see :meth:`result`)."""
        op_id = next(self._ids)
        self.send(id=op_id, cmd="op", op=op, args=args, fault=fault)
        return op_id

    def step(self, op_id: int, timeout: float = 60) -> dict | None:
        """The fault's step event of ``op_id``; None if the op ended without reaching it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while op_id not in self._steps:
                if op_id in self._results:
                    return None
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise ServiceError(f"{self.name}: op {op_id} reached no step: {self.tail()}")
                self._cond.wait(min(left, 0.5))
            return self._steps[op_id]

    def result(self, op_id: int, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        with self._cond:
            while op_id not in self._results:
                left = deadline - time.monotonic()
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise ServiceError(
                        f"{self.name} exited {self.proc.returncode} during op {op_id}"
                    )
                if left <= 0:
                    raise ServiceError(f"{self.name}: op {op_id} not done in {timeout} s")
                self._cond.wait(min(left, 0.5))
            return self._results[op_id]

    def call(self, op: str, timeout: float = 120, **args: Any) -> Any:
        """Run an operation to its end; its result, or ServiceError with the error."""
        done = self.result(self.start(op, **args), timeout)
        if not done["ok"]:
            raise ServiceError(
                f"{self.name} {op}: {done['error']}: {done['message']} {done.get('trace')}"
            )
        return done["result"]

    def attempt(self, op: str, timeout: float = 120, **args: Any) -> dict:
        """Run an operation to its end; the whole answer, ok or not."""
        return self.result(self.start(op, **args), timeout)

    def go(self, op_id: int) -> None:
        self.send(cmd="go", op=op_id)

    def daemon_pid(self) -> int:
        op_id = next(self._ids)
        self.send(id=op_id, cmd="daemon")
        pid = int(self.result(op_id, 30)["result"])
        if pid not in self.children:
            self.children.append(pid)
        self.daemon = pid
        return pid

    def enforce(self, value: bool) -> None:
        op_id = next(self._ids)
        self.send(id=op_id, cmd="enforce", value=value)
        self.result(op_id, 30)

    # -- signals -----------------------------------------------------------------

    def signal(self, sig: int, daemon: bool = False) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.daemon if daemon else self.pid, sig)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 3000) -> str:
        try:
            with open(self.log_path) as f:
                return f.read()[-n:]
        except OSError:
            return "<no log>"

    def close(self, timeout: float = 30) -> None:
        """Exit cleanly if it can (its records leave the share), else kill it by PID."""
        for pid in (self.pid, *self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        if self.alive():
            with contextlib.suppress(ServiceError, OSError, ValueError):
                self.send(cmd="exit")
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        with contextlib.suppress(OSError, ValueError):
            if self.proc.stdin:
                self.proc.stdin.close()
        for pid in self.children:
            end_process(pid)


def end_process(pid: int, timeout: float = 10) -> None:
    """SIGKILL ``pid`` if it still runs (and is not a zombie) and wait until it is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while running(pid) and time.monotonic() < deadline:
        time.sleep(0.02)


def running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def children_of(pid: int) -> list[int]:
    """Live child processes of ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return found


def command_of(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def qemu_children(daemon: int) -> list[int]:
    """qemu-img / qemu-io processes started by ``daemon`` (directly or through prlimit/env)."""
    found = []
    for child in children_of(daemon):
        argv = command_of(child)
        if any(os.path.basename(a).startswith("qemu-") for a in argv):
            found.append(child)
    return found


def wait_for(predicate: Any, timeout: float, interval: float = 0.01) -> float | None:
    """Poll ``predicate`` until true; the seconds it took, or None on timeout."""
    start = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            return None
        time.sleep(interval)


@contextlib.contextmanager
def services(*made: Service) -> Iterator[tuple[Service, ...]]:
    try:
        yield made
    finally:
        for svc in made:
            svc.close()
