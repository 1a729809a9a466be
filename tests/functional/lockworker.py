"""A worker process for the lock tests: ``python -m tests.functional.lockworker``.

Each action starts the configured provider the way a service does
(``coordination.start(conf)``), does its part, and prints one JSON line.
Running these as separate processes is the point: locks must exclude other
processes (and, with a network backend, other hosts), not just threads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from oslo_config import cfg

from remotefs_aa import coordination, exception, opts


def _conf(path: str) -> cfg.ConfigOpts:
    conf = cfg.ConfigOpts()
    opts.register_opts(conf)
    conf(["--config-file", path], project="remotefs_aa", default_config_files=[])
    opts.validate(conf)
    return conf


def increment(path: str, pause: float) -> None:
    """Read, pause, write: loses updates unless callers are serialised."""
    with open(path) as f:
        value = int(f.read() or "0")
    if pause:
        time.sleep(pause)
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(str(value + 1))
    os.replace(tmp, path)


def _emit(**data: object) -> None:
    print(json.dumps(data), flush=True)


def do_count(args: argparse.Namespace) -> int:
    """Increment the counter under one lock (count) or two, in the given order (pair)."""
    coordination.start(_conf(args.config))

    @coordination.synchronized("{first}", "{second}")
    def locked_increment(first: str, second: str) -> None:
        increment(args.counter, args.pause)

    first = args.first or f"counter-{os.path.basename(args.counter)}"
    second = args.second or first  # one name twice is one lock
    try:
        for _ in range(args.iterations):
            locked_increment(first, second)
    finally:
        coordination.stop()
    _emit(done=args.iterations)
    return 0


def do_hold(args: argparse.Namespace) -> int:
    coordination.start(_conf(args.config))
    with coordination.locked(args.name):
        with open(args.ready, "w") as f:
            f.write(str(os.getpid()))
        time.sleep(3600)
    return 0


def do_acquire(args: argparse.Namespace) -> int:
    coordination.start(_conf(args.config))
    start = time.monotonic()
    try:
        with coordination.locked(args.name, timeout=args.timeout):
            waited = time.monotonic() - start
    finally:
        coordination.stop()
    _emit(waited=waited)
    return 0


def do_outage(args: argparse.Namespace) -> int:
    """Hold or wait for a lock across a backend outage, report what happened.

    Protocol on stdin/stdout: prints ``ready``; then (holder) waits for a
    line on stdin before trying a second lock during the outage; then retries
    every 0.2 s until a lock works again (the provider reconnected).
    """
    conf = _conf(args.config)
    provider = coordination.start(conf)
    ran = []

    @coordination.synchronized("{name}")
    def body(name: str) -> None:
        ran.append(name)

    result: dict[str, object] = {"role": args.role}
    if args.role == "holder":
        lock = provider.get_lock(coordination.LOCK_PREFIX + args.name)
        assert lock.acquire()
        _emit(state="holding")
        sys.stdin.readline()  # the test stops the backend, then says go
        try:
            body(args.name + "-other")
            result["during_outage"] = "ran"
        except exception.LockError as exc:
            result["during_outage"] = type(exc).__name__
            result["message"] = str(exc)
        result["still_owner"] = lock.is_still_owner()
        try:
            lock.release()
            result["release"] = "ok"
        except exception.LockError as exc:
            result["release"] = str(exc)
        _emit(state="outage-seen")
        sys.stdin.readline()  # the test restarts the backend, then says go
    else:
        _emit(state="waiting")
        t = time.monotonic()
        try:
            body(args.name)
            result["during_outage"] = "ran"
        except exception.LockError as exc:
            result["during_outage"] = type(exc).__name__
            result["message"] = str(exc)
        result["failed_after"] = time.monotonic() - t
        _emit(state="outage-seen")
        sys.stdin.readline()
    result["body_ran_during_outage"] = list(ran)
    ran.clear()
    t = time.monotonic()
    deadline = t + args.recover_within
    while True:
        try:
            body(args.name + "-after")
            break
        except exception.LockError as exc:
            if time.monotonic() > deadline:
                result["recovered"] = False
                result["last_error"] = str(exc)
                break
            time.sleep(0.2)
    result.setdefault("recovered", True)
    result["recovered_after"] = time.monotonic() - t
    result["reconnects"] = getattr(provider, "reconnects", None)
    coordination.stop()
    _emit(**result)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lockworker")
    parser.add_argument("action", choices=("count", "pair", "hold", "acquire", "outage"))
    parser.add_argument("--config", required=True)
    parser.add_argument("--counter")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--pause", type=float, default=0.0)
    parser.add_argument("--first")
    parser.add_argument("--second")
    parser.add_argument("--name", default="test")
    parser.add_argument("--ready")
    parser.add_argument("--timeout", type=float)
    parser.add_argument("--role", choices=("holder", "waiter"))
    parser.add_argument("--recover-within", type=float, default=60.0)
    args = parser.parse_args(argv)
    handler = {
        "count": do_count,
        "pair": do_count,
        "hold": do_hold,
        "acquire": do_acquire,
        "outage": do_outage,
    }[args.action]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
