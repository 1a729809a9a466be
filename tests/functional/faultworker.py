"""A volume service for the fault tests to drive, stop and kill (test_fencing.py).

Usage: ``python -m tests.functional.faultworker CONFIG``. The process starts a
service the way a real one does (``remotefs_aa.service.start``: its own
driver, privileged daemons, lock connection and mount), then reads one JSON
command per line on stdin and answers with JSON lines on stdout:

* ``{"id": n, "cmd": "op", "op": NAME, "args": {...}, "fault": {...}}`` runs a
  driver method (its public, decorated one: the driver takes its own locks) in
  a thread of its own and answers ``{"id": n, "ok": true, "result": ...}`` or
  ``{"id": n, "ok": false, "error": CLASS, "message": TEXT}``. Reads (verify,
  patterns, files) are ops too, so the same process checks what it sees.
* ``fault``: ``{"k": K, "when": "before"|"after", "action": ACTION}`` arms
  ``fence.on_step`` for that op's thread only. The hook counts the op's
  privileged calls (each call's "before"); at the K-th call's ``when`` it
  prints ``{"event": "step", "op": n, "k": K, "when": ..., "step": NAME}`` and
  then, by ``action``: ``stop`` SIGSTOPs this process (the service alone is
  paused; the orchestrator may also stop the daemon: both; the signal is sent
  to the calling thread, so the stop is in force before the hook returns; on
  resume it prints ``{"event": "resumed", ...}`` with the fence's deadline),
  ``kill`` SIGKILLs it (also thread-directed), ``wait`` waits for
  ``{"cmd": "go", "op": n}`` (meanwhile the orchestrator stops or kills the
  daemon), ``report`` just goes on. With ``"io": METHOD`` the calls of that
  ImageIO method are counted instead (secure file operations never reach an
  entrypoint, so ``fence.on_step`` is not called there). ``k = 0`` never
  fires (the steps are only counted, and returned as ``"steps"`` with the
  result: how the tests learn each operation's steps).
* ``{"id": n, "cmd": "daemon"}``: the file daemon's pid (it changes when a
  killed daemon is restarted by the next call).
* ``{"cmd": "enforce", "value": false}``: ``fence.ENFORCE`` (test-only switch:
  no deadlines sent, so none enforced).
* ``{"cmd": "exit"}``: stop the service (its records leave the share) and exit.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import traceback
from typing import Any

from remotefs_aa import exception, service
from remotefs_aa.image.chain import Chain
from remotefs_aa.objects import Snapshot, Volume
from remotefs_aa.privsep import fence

_out = threading.Lock()
_local = threading.local()
_go: dict[int, threading.Event] = {}
_go_lock = threading.Lock()


def emit(**data: Any) -> None:
    data.setdefault("t", fence.now())
    line = json.dumps(data, default=str)
    with _out:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def _gate(op: int) -> threading.Event:
    with _go_lock:
        return _go.setdefault(op, threading.Event())


class Fault:
    """What to do at the k-th privileged call of one operation."""

    def __init__(self, op: int, spec: dict | None) -> None:
        spec = spec or {}
        self.op = op
        self.k = int(spec.get("k", 0))
        self.when = spec.get("when", "before")
        self.action = spec.get("action", "report")
        self.count = 0
        self.steps: list[str] = []
        #: ``io``: count calls of this ImageIO method instead (see :func:`_wrap_io`).
        self.io = spec.get("io")

    def __call__(self, when: str, step: str, io: bool = False) -> None:
        if io != bool(self.io) or (io and step != self.io):
            if not io and when == "before":
                self.steps.append(step)
            return
        if when == "before":
            self.count += 1
            self.steps.append(step)
        if self.count != self.k or when != self.when:
            return
        emit(event="step", op=self.op, k=self.k, when=when, step=step, pid=os.getpid())
        # Signals aimed at this thread: a process-wide kill() is taken by another
        # thread (the kernel picks the main one), and under load this thread then
        # runs on into its next step before the stop reaches it.
        if self.action == "stop":
            signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
            current = fence.current()
            emit(
                event="resumed",
                op=self.op,
                deadline=current.deadline if current else None,
                lost=current.lost if current else None,
            )
        elif self.action == "kill":
            signal.pthread_kill(threading.get_ident(), signal.SIGKILL)
        elif self.action == "wait":
            _gate(self.op).wait()


def _hook(when: str, step: str) -> None:
    fault = getattr(_local, "fault", None)
    if fault is not None:
        fault(when, step)


def _wrap_io(io: Any, method: str) -> None:
    """Route ``io.<method>`` through the op's fault too (once per object and method).

    For file operations that never reach a privileged entrypoint (secure file
    operations run them in the service: ``fence.on_step`` is not called there).
    """
    wrapped = getattr(io, "_fault_wrapped", set())
    if method in wrapped:
        return
    original = getattr(io, method)

    def call(*args: Any, **kwargs: Any) -> Any:
        fault = getattr(_local, "fault", None)
        if fault is not None:
            fault("before", method, io=True)
        try:
            return original(*args, **kwargs)
        finally:
            if fault is not None:
                fault("after", method, io=True)

    setattr(io, method, call)
    io._fault_wrapped = wrapped | {method}


def _vol(data: dict) -> Volume:
    return Volume(
        id=data["id"],
        size=int(data.get("size", 1)),
        provider_location=data.get("provider_location"),
    )


def _snap(args: dict) -> Snapshot:
    return Snapshot(_vol(args["volume"]), id=args["snapshot"])


class Worker:
    def __init__(self, driver: Any) -> None:
        self.driver = driver

    # -- chain changes, through the driver's public (locked) methods ------------

    def create_volume(self, args: dict) -> Any:
        return self.driver.create_volume(_vol(args["volume"]))

    def delete_volume(self, args: dict) -> Any:
        return self.driver.delete_volume(_vol(args["volume"]))

    def create_snapshot(self, args: dict) -> Any:
        return self.driver.create_snapshot(_snap(args))

    def delete_snapshot(self, args: dict) -> Any:
        return self.driver.delete_snapshot(_snap(args))

    def revert(self, args: dict) -> Any:
        snap = _snap(args)
        return self.driver.revert_to_snapshot(None, snap.volume, snap)

    def extend(self, args: dict) -> Any:
        return self.driver.extend_volume(_vol(args["volume"]), int(args["size"]))

    def clone(self, args: dict) -> Any:
        return self.driver.create_cloned_volume(_vol(args["new"]), _vol(args["volume"]))

    def from_snapshot(self, args: dict) -> Any:
        return self.driver.create_volume_from_snapshot(_vol(args["new"]), _snap(args))

    def copy_image(self, args: dict) -> Any:
        from remotefs_aa.image.store import DirectoryImageService

        images = DirectoryImageService(args["images"])
        vol = _vol(args["volume"])
        return self.driver.copy_image_to_volume(None, vol, images, args["image"])

    # -- what a guest does, and what the checks read -------------------------------

    def _image(self, args: dict) -> tuple[str, str]:
        """(path, format) of a volume's active image or of a snapshot's data."""
        vol = _vol(args["volume"])
        chain = self.driver.chain(vol)
        state = chain.load()
        if args.get("snapshot"):
            link = chain.snapshot_image(state, args["snapshot"])
        else:
            link = chain.trusted_chain(state)[0]
        return chain.path(link.name), link.format

    def write(self, args: dict) -> Any:
        from remotefs_aa.privsep import qemu

        path, fmt = self._image(args)
        for region, pattern in args["regions"]:
            qemu.write_pattern(
                path, fmt, region * args["region_size"], args["region_size"], pattern
            )
        return os.path.basename(path)

    def fill(self, args: dict) -> Any:
        """Write ``pattern`` over [offset, offset + length) of the active image, in one call."""
        from remotefs_aa.privsep import qemu

        path, fmt = self._image(args)
        qemu.write_pattern(path, fmt, args["offset"], args["length"], args["pattern"])
        return os.path.basename(path)

    def patterns(self, args: dict) -> Any:
        """Which of the expected (region, pattern) pairs read back wrong: [] when all match."""
        from remotefs_aa.privsep import qemu

        try:
            path, fmt = self._image(args)
        except exception.RemoteFSAAError as exc:
            return [f"cannot open: {exc}"]
        wrong = []
        size = args["region_size"]
        for region, pattern in args["regions"]:
            try:
                if not qemu.pattern_matches(path, fmt, region * size, size, pattern):
                    wrong.append(f"region {region} is not {pattern:#04x}")
            except exception.RemoteFSAAError as exc:
                wrong.append(f"region {region}: {exc}")
        return wrong

    def verify(self, args: dict) -> Any:
        report = self.driver.verify_volume(_vol(args["volume"]))
        return {
            "problems": report["problems"],
            "snapshots": sorted(report.get("snapshots", {})),
            "chain": report.get("chain"),
        }

    def state(self, args: dict) -> Any:
        vol = _vol(args["volume"])
        chain = self.driver.chain(vol)
        state = chain.load()
        top = chain.trusted_chain(state)[0] if os.path.exists(chain.path(state.active)) else None
        return {
            "snapshots": sorted(state.snapshots),
            "active": state.active,
            "generation": state.generation,
            "intent": state.intent,
            "virtual_size": top.virtual_size if top else None,
        }

    def exists(self, args: dict) -> Any:
        vol = _vol(args["volume"])
        chain = Chain(self.driver.io, self.driver.share_path(vol.provider_location), vol.id, 0)
        names = self.driver.io.list_directory(chain.directory)
        return chain.base in names

    def sweep(self, args: dict) -> Any:
        return self.driver.sweep_leftovers(args["share"])

    def share_path(self, args: dict) -> Any:
        return self.driver.share_path(args["share"])


def _run(worker: Worker, op_id: int, name: str, args: dict, spec: dict | None) -> None:
    fault = Fault(op_id, spec)
    if fault.io:
        _wrap_io(worker.driver.io_for(args["volume"]["provider_location"]), fault.io)
    _local.fault = fault
    started = fence.now()
    try:
        result = getattr(worker, name)(args)
    except BaseException as exc:  # reported to the orchestrator, whatever it is
        emit(
            id=op_id,
            ok=False,
            error=type(exc).__name__,
            message=str(exc),
            steps=fault.steps,
            elapsed=fence.now() - started,
            trace=traceback.format_exc()[-3000:],
        )
    else:
        emit(id=op_id, ok=True, result=result, steps=fault.steps, elapsed=fence.now() - started)
    finally:
        _local.fault = None


def main() -> int:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s.%(msecs)03d %(process)d %(threadName)s %(levelname)s %(name)s: "
        "%(message)s",
        datefmt="%H:%M:%S",
    )
    # Every .info generation in the log ("volume %s: published generation %d (%s)",
    # by thread op-<n>): who wrote which generation, when a fenced writer is in doubt.
    logging.getLogger("remotefs_aa.image.chain").setLevel(logging.DEBUG)
    conf = service.make_config(["--config-file", sys.argv[1]])
    from remotefs_aa import privsep
    from remotefs_aa.privsep import files, mount

    # Both daemons up before the first lock: a step's deadline is taken before
    # its call starts the daemon, so a slow start under a short test lease
    # would fence the service's own set-up (reported: test_fencing.py).
    privsep.init(conf)
    mount.daemon_info()
    files.daemon_info()
    driver = service.start(conf)
    driver.get_volume_stats()  # the first scan of the share, outside any operation
    fence.on_step = _hook
    worker = Worker(driver)
    emit(event="ready", pid=os.getpid(), daemon=files.daemon_info()["pid"])
    threads = []
    for line in sys.stdin:
        command = json.loads(line)
        kind = command["cmd"]
        if kind == "op":
            thread = threading.Thread(
                target=_run,
                args=(
                    worker,
                    command["id"],
                    command["op"],
                    command.get("args", {}),
                    command.get("fault"),
                ),
                name=f"op-{command['id']}",
                daemon=True,
            )
            thread.start()
            threads.append(thread)
        elif kind == "go":
            _gate(command["op"]).set()
        elif kind == "daemon":
            emit(id=command["id"], ok=True, result=files.daemon_info()["pid"])
        elif kind == "enforce":
            fence.ENFORCE = bool(command["value"])
            emit(id=command.get("id"), ok=True, result=fence.ENFORCE)
        elif kind == "exit":
            break
    for thread in threads:
        thread.join(timeout=5)
    fence.on_step = None
    service.stop()
    emit(event="exited")
    return 0


if __name__ == "__main__":
    sys.exit(main())
