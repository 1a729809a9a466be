"""One of two writers racing on ``.info`` files: ``python -m tests.functional.racer``.

Usage: ``python -m tests.functional.racer CONFIG NAME OTHER DIRECTORY LANES TRIALS FDS``.

``CONFIG`` runs the privileged entrypoints in this process (``[privileged]
mode = direct``, root). Each of ``LANES`` threads owns one volume name
(``volume-race<lane>``) in ``DIRECTORY/lane<lane>`` (on this writer's mount of
the share; a directory per lane, see lane_run) and runs ``TRIALS`` trials on
it: wait at a barrier with the other writer's thread of the same lane (a byte
each way through two pipes, ``FDS`` = ``read,write`` descriptor pairs per
lane), then call ``remotefs_aa.privsep.files.publish_info`` with the text
both read (the last trial's winner's) and the next generation. The text each
writer publishes is a function of (writer, lane, trial), so each side knows
what the other would have written: the loser must get exactly the winner's
text back.

Prints one JSON line: ``{"lanes": {lane: "WLLW..."}, "seconds": s}`` where
W = won, L = lost and got the other's text, E = lost at the exclusive temp
file before the winner published and got the text both had read, X = lost
and got anything else.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

from remotefs_aa import privsep, service
from remotefs_aa.privsep import files


def text(writer: str, lane: int, trial: int) -> str:
    body = {"active": f"volume-race{lane}", "generation": trial + 1, "format": "raw"}
    body["writer"] = f"{writer}-{lane}-{trial}"
    return json.dumps(body, indent=1) + "\n"


def lane_run(
    name: str, other: str, directory: str, lane: int, trials: int, rfd: int, wfd: int, out: dict
) -> None:
    base = f"volume-race{lane}"
    # One directory per lane: GlusterFS serialises namespace changes (create,
    # link, rename) within one directory, so lanes sharing one would not add up.
    directory = os.path.join(directory, f"lane{lane}")
    expected: str | None = None
    marks = []
    info = os.path.join(directory, base + ".info")
    for trial in range(trials):
        os.write(wfd, b"x")
        if os.read(rfd, 1) != b"x":
            raise RuntimeError("barrier broken")
        mine = text(name, lane, trial)
        got = files.publish_info(directory, base, mine, trial + 1, expected, 0o640)
        theirs = text(other, lane, trial)
        if got is None:
            marks.append("W")
        else:
            # A loser at the link was handed the winner's text; a loser at
            # the exclusive temp file may have read before the winner
            # published, and was handed the text both had read.
            marks.append("L" if got == theirs else "E" if got == (expected or "") else "X")
        # Both are done with this trial: the next starts from what was published
        # (the winner's text, or the old one if both lost).
        os.write(wfd, b"y")
        if os.read(rfd, 1) != b"y":
            raise RuntimeError("barrier broken")
        try:
            with open(info) as f:
                expected = f.read()
        except FileNotFoundError:
            expected = None  # both lost the first trial
    out[lane] = "".join(marks)


def main() -> int:
    config, name, other, directory = sys.argv[1:5]
    lanes, trials = int(sys.argv[5]), int(sys.argv[6])
    fds = [int(x) for x in sys.argv[7].split(",")]
    conf = service.make_config(["--config-file", config])
    privsep.init(conf)
    out: dict[int, str] = {}
    threads = [
        threading.Thread(
            target=lane_run,
            args=(name, other, directory, lane, trials, fds[2 * lane], fds[2 * lane + 1], out),
        )
        for lane in range(lanes)
    ]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps({"lanes": out, "seconds": time.monotonic() - started}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
