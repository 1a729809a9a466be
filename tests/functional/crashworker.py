"""A driver process that SIGKILLs itself at a chosen step of an operation.

Usage: python -m tests.functional.crashworker CONFIG JOB_JSON

JOB_JSON: {"op": ..., "volume": {...}, "snapshot_id": ..., "new_volume": {...},
"crash": {"method": "commit", "nth": 1, "when": "after"}}. The driver gets an
ImageIO whose ``method`` kills the process before or after its ``nth`` call:
a crash between two steps of the operation, with the lock held, exactly as a
host losing power mid-operation would leave it (minus the page cache).
"""

from __future__ import annotations

import json
import os
import signal
import sys

from remotefs_aa import coordination, privsep, service
from remotefs_aa.drivers.local import LocalDriver
from remotefs_aa.image.chain import PrivilegedIO
from remotefs_aa.objects import Snapshot, Volume


class CrashingIO(PrivilegedIO):
    def __init__(self, method: str, nth: int, when: str) -> None:
        super().__init__()
        self.method, self.nth, self.when, self.calls = method, nth, when, 0
        original = getattr(self, method)

        def wrapped(*args, **kwargs):
            self.calls += 1
            if self.calls == self.nth and self.when == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            result = original(*args, **kwargs)
            if self.calls == self.nth and self.when == "after":
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        setattr(self, method, wrapped)


def main() -> int:
    config, job_text = sys.argv[1], sys.argv[2]
    job = json.loads(job_text)
    conf = service.make_config(["--config-file", config])
    privsep.init(conf)
    coordination.start(conf)
    crash = job["crash"]
    driver = LocalDriver(conf, io=CrashingIO(crash["method"], crash["nth"], crash["when"]))
    driver.do_setup()
    vol = Volume(**job["volume"])
    op = job["op"]
    if op == "create_snapshot":
        driver.create_snapshot(Snapshot(vol, id=job["snapshot_id"]))
    elif op == "delete_snapshot":
        driver.delete_snapshot(Snapshot(vol, id=job["snapshot_id"]))
    elif op == "revert":
        driver.revert_to_snapshot(None, vol, Snapshot(vol, id=job["snapshot_id"]))
    elif op == "delete_volume":
        driver.delete_volume(vol)
    elif op == "clone":
        driver.create_cloned_volume(Volume(**job["new_volume"]), vol)
    else:
        raise SystemExit(f"unknown op {op}")
    print("finished without crashing", flush=True)
    return 3


if __name__ == "__main__":
    sys.exit(main())
