"""A holder that lost its lock does no harm: pause, kill, backend restart, racing writers.

Real GlusterFS (one volume, a mount per "host"), real Redis (lock_timeout=3),
etcd and ZooKeeper, real services as separate processes
(``tests/functional/faultworker.py``: each its own driver, privileged
daemons, lock connection and mount), and the driver's public, locked methods.

A fault is placed by a step counter, not by sleeps: the worker's
``fence.on_step`` hook counts the privileged calls of the operation under test
and acts at the k-th call's "before" or "after":

* **pause**: service A is stopped at the step (the service alone: it SIGSTOPs
  itself from the hook; the daemon alone: the test SIGSTOPs the file daemon
  and lets A go on into it; or both), held past the lock's expiry while
  service B (the other mount, the same backend) takes the volume over (its
  next operation finishes or rolls back A's intent, then deletes another
  snapshot and creates one), then resumed;
* **kill**: SIGKILL of the service, or of its daemon with the call in flight;
* "during": the same while a long qemu-img commit or convert runs.

Then every chain verifies (``verify_volume``), every surviving snapshot and
volume reads back its bytes (``privsep.qemu.pattern_matches``), nothing is
left behind after B's next operation and ``sweep_leftovers`` (generation
claims are bookkeeping), and A's operation ended with a fenced error
(LeaseExpired / StaleInfoGeneration) unless it had already made its last call
when it was stopped. Each test prints its rows of the fault table; the whole
table is printed once more at the end of the module.

Left out to stay inside about six minutes on two cores (see the module's
``MATRIX`` notes): "both" and "daemon" pauses only before the destructive
steps (at the other boundaries no call is in flight, so they equal the
service pause), daemon kills only with a destructive call in flight, service
kills only at the destructive boundaries, etcd and ZooKeeper one scenario each.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import itertools
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from typing import Any

import pytest

from tests.functional import faults, gluster, servers
from tests.functional import volumes as v

pytestmark = pytest.mark.functional

R = faults.REGION
#: Redis lock_timeout of servers.RedisServer: a stopped holder's lock expires after it.
LEASE = servers.RedisServer.lock_expiry
FENCED = ("LeaseExpired", "StaleInfoGeneration")
#: Errors worth a retry by B (a still running qemu-img of a fenced daemon holds
#: the image's lock; the backend was just restarted).
RETRY = ("PrivilegedCommandFailed", "LockTimeout", "LockBackendUnavailable", "LockBusy")
#: Calls that change or destroy data (the claims before them are publish_info).
DESTRUCTIVE = {
    "qemu_img_commit",
    "qemu_img_rebase",
    "qemu_img_resize",
    "qemu_img_convert",
    "qemu_img_create",
    "unlink",
    "unlink_many",
    "rename",
}
#: Scenarios at once, each on its own pair of mounts (see Lane).
LANES = int(os.environ.get("RFSAA_FAULTS_LANES", "8"))

# What each image reads back, region -> byte. Each layer writes one range from
# region 0 (one qemu-io call), so region 0 names the image and the deeper
# regions show every layer below it: the base [0, 4) 0x11, then [0, 3) 0x22,
# [0, 2) 0x33 and [0, 1) 0x44, a snapshot between each. B later writes region 4.
S1 = {0: 0x11, 1: 0x11, 2: 0x11, 3: 0x11}
S2 = {**S1, 0: 0x22, 1: 0x22, 2: 0x22}
S3 = {**S2, 0: 0x33, 1: 0x33}
ACTIVE = {**S3, 0: 0x44}
PLAIN = {0: 0x11, 1: 0x11, 5: 0}
IMAGE = {0: 0x61, 1: 0, 5: 0x62}
OPS = (
    "delete_top",
    "delete_middle",
    "clone",
    "from_snapshot",
    "revert",
    "extend",
    "delete_volume",
    "copy_image",
)


# -- the fault table -------------------------------------------------------------------


class Table:
    """fault x operation x step -> runs, problems, what A's operation ended with."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str, str], dict] = {}
        self.lock = threading.Lock()

    def add(self, fault: str, op: str, step: str, problems: list[str], ended: str) -> None:
        with self.lock:
            row = self.rows.setdefault(
                (fault, op, step), {"runs": 0, "problems": 0, "ended": collections.Counter()}
            )
            row["runs"] += 1
            row["problems"] += len(problems)
            row["ended"][ended] += 1

    def render(self, faults_shown: set[str] | None = None) -> str:
        lines = [
            f"{'fault':<16} {'operation':<14} {'step':<28} {'runs':>4} {'problems':>8}"
            "  A ended with",
        ]
        for (fault, op, step), row in sorted(self.rows.items(), key=_row_order):
            if faults_shown is not None and fault not in faults_shown:
                continue
            ended = ", ".join(f"{k} x{n}" if n > 1 else k for k, n in row["ended"].items())
            lines.append(
                f"{fault:<16} {op:<14} {step:<28} {row['runs']:>4} {row['problems']:>8}  {ended}"
            )
        return "\n".join(lines)


def _row_order(item: tuple) -> tuple:
    (fault, op, step), _row = item
    when, _, rest = step.partition(" #")
    number = rest.split(" ", 1)[0]
    k = int(number) if number.isdigit() else 0
    return (fault, OPS.index(op) if op in OPS else 99, op, k, when != "before", step)


_TABLE = Table()


def _show(request: pytest.FixtureRequest, text: str) -> None:
    """Print past pytest's capture, so the table is in every CI log."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n" + text, flush=True)


@pytest.fixture(scope="module")
def table(request: pytest.FixtureRequest):
    started = time.monotonic()
    yield _TABLE
    if _TABLE.rows:
        _show(
            request,
            "fault table (all tests of test_fencing.py, "
            f"{time.monotonic() - started:.0f} s):\n{_TABLE.render()}",
        )


# -- the share, the backends, the services ----------------------------------------------


@pytest.fixture(scope="module")
def work():
    path = tempfile.mkdtemp(prefix="rfsaa-faults-", dir="/var/tmp")
    yield path
    if not os.environ.get("RFSAA_FAULTS_KEEP"):  # keep the services' logs to debug
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def gl(work):
    if not gluster.available():
        pytest.fail("GlusterFS is not installed: run tools/bootstrap.sh --test")
    # A name of our own: GlusterVolume.cleanup unmounts every mount of its share
    # (host:/name), so two checkouts using the default name would unmount each
    # other's mounts.
    volume = gluster.GlusterVolume(os.path.join(work, "gluster"), name=f"faults{os.getpid()}")
    os.makedirs(volume.workdir)
    try:
        volume.start()
        yield volume
    finally:
        volume.cleanup()


def _server(kind: str, gl, work: str) -> servers.Server:
    server = servers.SERVERS[kind](workdir=os.path.join(work, f"{kind}-{uuid.uuid4().hex[:6]}"))
    os.makedirs(server.workdir, exist_ok=True)
    with gluster.entered(gl.netns_path):  # the services run in the volume's namespace
        server.start()
    return server


@pytest.fixture(scope="module")
def redis(gl, work):
    server = _server("redis", gl, work)
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="module")
def images(work):
    """An image directory with one 512 MiB qcow2 image: 0x61 in region 0, 0x62 in region 5."""
    from remotefs_aa.image.store import DirectoryImageService

    store = DirectoryImageService(os.path.join(work, "images"))
    os.makedirs(store.directory)
    v.make_image(store, "img", "qcow2", "512M", disk_format="qcow2")
    return store.directory


def host_config(work: str, gl, host: str, url: str, secure: bool = False) -> str:
    """A glusterfs service config for "host" ``host`` (its own state_path, so its own mount)."""
    directory = os.path.join(work, f"{host}-{uuid.uuid4().hex[:6]}")
    os.makedirs(directory)
    shares = os.path.join(directory, "glusterfs_shares")
    with open(shares, "w") as f:
        f.write(gl.share + "\n")
    config = v.write_config(
        directory,
        backend_url=url,
        volume_driver="glusterfs",
        glusterfs_shares_config=shares,
        host=host,
        cluster="aa-faults",
        # Through the privileged daemon, where every step carries its deadline.
        # (With secure file operations the steps run in the service itself:
        # see test_secure_file_operations_are_fenced_too.)
        nas_secure_file_operations="true" if secure else "false",
    )
    with open(config, "a") as f:  # [coordination] is the file's last section
        f.write("heartbeat = 0.5\nlock_acquire_timeout = 40\n")
    with open(config, "a") as f:  # stable step numbers: no rescan of the share mid-operation
        f.write("[DEFAULT]\nprovisioned_capacity_refresh_interval = 3600\n")
    return config


class Lane:
    """Two "hosts" for one scenario at a time: service A on one mount, B on another.

    One scenario per lane, because GlusterFS 10.3's FUSE client deadlocks when
    two processes take qemu's image locks through one mount at once (both
    epoll threads stuck in fuse_interrupt_finish_fop, the mount then fails
    with ENOTCONN: see test_concurrent_qemu_on_one_glusterfs_mount).
    """

    def __init__(self, work: str, gl, url: str, n: int, secure_a: bool = False) -> None:
        self.work, self.gl = work, gl
        self.share = gl.share
        self.config_a = host_config(work, gl, f"host-a{n}", url, secure=secure_a)
        self.config_b = host_config(work, gl, f"host-b{n}", url)
        self.a: faults.Service | None = None
        self.b: faults.Service | None = None
        self.dead: list[faults.Service] = []

    def new(self, kind: str) -> faults.Service:
        config = self.config_a if kind == "a" else self.config_b
        return faults.Service(
            f"{kind}-{uuid.uuid4().hex[:6]}", config, self.gl.netns_path, self.work
        )

    def start(self) -> None:
        self.a, self.b = self.new("a"), self.new("b")
        self.mount_b = self.b.call("share_path", share=self.share)

    def restart_a(self) -> None:
        if self.a is not None and not self.a.alive():
            self.dead.append(self.a)
            self.a = self.new("a")

    def close(self) -> None:
        for svc in [self.a, self.b, *self.dead]:
            if svc is not None:
                svc.close()


@contextlib.contextmanager
def lanes(work, gl, url, n: int, secure_a: bool = False):
    made = [Lane(work, gl, url, i, secure_a) for i in range(n)]
    try:
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            list(pool.map(Lane.start, made))
        yield made
    finally:
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            list(pool.map(Lane.close, made))


# -- the volumes under test --------------------------------------------------------------


def _new_vol(size: int = 1) -> dict:
    return {"id": str(uuid.uuid4()), "size": size}


@dataclasses.dataclass
class Model:
    """A volume under test, its snapshots and what each image must read back."""

    vol: dict
    snaps: dict[str, str] = dataclasses.field(default_factory=dict)
    data: dict[str, dict[int, int]] = dataclasses.field(default_factory=dict)
    new: dict | None = None
    new_data: dict[int, int] | None = None
    gone: bool = False
    notes: list[str] = dataclasses.field(default_factory=list)


def prepare(b: faults.Service, op: str, share: str) -> Model:
    """A volume with three snapshots (or none, for an image copy) and known data, made by B."""
    vol = _new_vol()
    vol["provider_location"] = b.call("create_volume", volume=vol)["provider_location"]
    model = Model(vol)
    if op == "copy_image":
        b.call("fill", volume=vol, offset=0, length=2 * R, pattern=0x11)
        model.data["active"] = dict(PLAIN)
        return model
    b.call("fill", volume=vol, offset=0, length=4 * R, pattern=0x11)
    for name, regions, pattern, data in (
        ("S1", 3, 0x22, S1),
        ("S2", 2, 0x33, S2),
        ("S3", 1, 0x44, S3),
    ):
        model.snaps[name] = str(uuid.uuid4())
        b.call("create_snapshot", volume=vol, snapshot=model.snaps[name])
        model.data[name] = dict(data)
        b.call("fill", volume=vol, offset=0, length=regions * R, pattern=pattern)
    model.data["active"] = dict(ACTIVE)
    if op in ("clone", "from_snapshot"):
        model.new = {**_new_vol(2 if op == "from_snapshot" else 1), "provider_location": share}
        model.new_data = dict(ACTIVE if op == "clone" else S2)
    return model


def a_operation(op: str, model: Model, images: str | None) -> tuple[str, dict]:
    """The worker operation and arguments of ``op`` (the operation A runs)."""
    vol, snaps = model.vol, model.snaps
    return {
        "delete_top": ("delete_snapshot", {"volume": vol, "snapshot": snaps.get("S3")}),
        "delete_middle": ("delete_snapshot", {"volume": vol, "snapshot": snaps.get("S2")}),
        "clone": ("clone", {"volume": vol, "new": model.new}),
        "from_snapshot": (
            "from_snapshot",
            {"volume": vol, "snapshot": snaps.get("S2"), "new": model.new},
        ),
        "revert": ("revert", {"volume": vol, "snapshot": snaps.get("S3")}),
        "extend": ("extend", {"volume": vol, "size": 2}),
        "delete_volume": ("delete_volume", {"volume": vol}),
        "copy_image": ("copy_image", {"volume": vol, "images": images, "image": "img"}),
    }[op]


def retried(b: faults.Service, op: str, model: Model, within: float = 60, **args: Any) -> dict:
    """Run ``op`` on B, retrying the errors a fenced peer may still cause; notes say so."""
    deadline = time.monotonic() + within
    while True:
        done = b.attempt(op, timeout=within + 30, **args)
        if done["ok"] or done["error"] not in RETRY or time.monotonic() > deadline:
            return done
        model.notes.append(f"B {op} retried after {done['error']}")
        time.sleep(0.2)


def reads(b: faults.Service, vol: dict, snapshot: str, region: int, pattern: int) -> bool:
    """Does ``snapshot``'s data hold ``pattern`` in ``region``?"""
    args = {"volume": vol, "snapshot": snapshot, "regions": [[region, pattern]], "region_size": R}
    return b.call("patterns", **args) == []


def b_takes_over(b: faults.Service, op: str, model: Model) -> tuple[list[str], bool | None]:
    """B's next operation on the volume (finishing or rolling back A's), then more work.

    Returns (problems, whether A's change took effect).
    """
    problems: list[str] = []
    vol = model.vol
    if op == "extend":
        # B's next operation is the extend again: it finishes A's (or does it).
        vol["size"] = 2
        done = retried(b, "extend", model, volume=vol, size=2)
        if not done["ok"]:
            return [f"B extend failed: {done['error']}: {done['message']}"], None
    sb1 = str(uuid.uuid4())
    done = retried(b, "create_snapshot", model, volume=vol, snapshot=sb1)
    if not done["ok"]:
        if op == "delete_volume" and done["error"] == "VolumeNotFound":
            model.gone = True
            return problems, True
        return [f"B's next operation failed: {done['error']}: {done['message']}"], None
    state = b.call("state", volume=vol)
    current = dict(model.data["active"])
    happened: bool | None = False
    if op in ("delete_top", "delete_middle"):
        target = "S3" if op == "delete_top" else "S2"
        happened = model.snaps[target] not in state["snapshots"]
        if happened:
            del model.snaps[target], model.data[target]
    elif op == "revert":
        happened = reads(b, vol, sb1, 0, 0x33)
        if happened:
            current = dict(S3)
    elif op == "copy_image":
        happened = reads(b, vol, sb1, 0, 0x61)
        if happened:
            current = dict(IMAGE)
    elif op in ("clone", "from_snapshot"):
        happened = bool(b.call("exists", volume=model.new))
    elif op == "extend":
        happened = None  # B's own extend made it so either way
    if state.get("intent"):
        problems.append(f"intent left after B's next operation: {state['intent']}")
    model.snaps["Sb1"], model.data["Sb1"] = sb1, {**current, 4: 0}
    b.call("fill", volume=vol, offset=4 * R, length=R, pattern=0x66)
    if "S1" in model.snaps:
        done = retried(b, "delete_snapshot", model, volume=vol, snapshot=model.snaps["S1"])
        if not done["ok"]:
            problems.append(f"B delete_snapshot S1 failed: {done['error']}: {done['message']}")
        else:
            del model.snaps["S1"], model.data["S1"]
    sb2 = str(uuid.uuid4())
    done = retried(b, "create_snapshot", model, volume=vol, snapshot=sb2)
    if not done["ok"]:
        problems.append(f"B create_snapshot failed: {done['error']}: {done['message']}")
    else:
        model.snaps["Sb2"] = sb2
        model.data["Sb2"] = {**current, 4: 0x66}
    model.data["active"] = {**current, 4: 0x66}
    return problems, happened


def files_of(mount: str, volume_id: str) -> list[str]:
    return sorted(n for n in os.listdir(mount) if volume_id in n)


def check_and_clean(lane: Lane, model: Model) -> list[str]:
    """Sweep, verify, read every image back, then delete the volumes: nothing may remain."""
    b, mount = lane.b, lane.mount_b
    problems: list[str] = []
    done = b.attempt("sweep", share=lane.share)
    if not done["ok"]:
        problems.append(f"sweep failed: {done['error']}: {done['message']}")
    checked = [(model.vol, model.gone, model.snaps, model.data)]
    if model.new is not None:
        exists = b.call("exists", volume=model.new)
        checked.append((model.new, not exists, {}, {"active": model.new_data or {}}))
    for vol, gone, snaps, data in checked:
        if gone:
            left = files_of(mount, vol["id"])
            if left:
                problems.append(f"volume {vol['id'][:8]} deleted but left {left}")
            continue
        report = b.call("verify", volume=vol)
        problems += [f"{vol['id'][:8]}: {p}" for p in report["problems"]]
        if sorted(snaps.values()) != report["snapshots"]:
            expected = sorted(snaps.values())
            problems.append(
                f"{vol['id'][:8]}: snapshots {report['snapshots']}, expected {expected}"
            )
        for name, expected in data.items():
            regions = [[r, p] for r, p in sorted(expected.items())]
            args = {"snapshot": snaps[name]} if name != "active" else {}
            if name != "active" and name not in snaps:
                continue
            wrong = b.call("patterns", volume=vol, regions=regions, region_size=R, **args)
            problems += [f"{vol['id'][:8]} {name}: {w}" for w in wrong]
        done = b.attempt("delete_volume", volume=vol)
        if not done["ok"]:
            problems.append(f"delete of {vol['id'][:8]} failed: {done['error']}: {done['message']}")
        left = files_of(mount, vol["id"])
        if left:
            problems.append(f"volume {vol['id'][:8]} deleted but left {left}")
    return problems


# -- one scenario ----------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    fault: str  # pause | kill
    mode: str  # service | daemon | both
    op: str
    k: int
    when: str
    step: str
    last: int  # the operation's number of privileged calls

    @property
    def label(self) -> str:
        return f"{self.when} #{self.k} {self.step}"

    @property
    def done_before(self) -> bool:
        """Stopped after the operation's last privileged call: success is its due."""
        return self.when == "after" and self.k == self.last


def judge_a(case: Case, done: dict | None, happened: bool | None, allowed: tuple) -> list[str]:
    if done is None:
        return []
    if done["ok"]:
        if not case.done_before:
            return [f"A's operation succeeded although stopped {case.label}"]
        if happened is False:
            return ["A reported success but its change is not there"]
        return []
    if done["error"] not in allowed:
        return [f"A ended with {done['error']}: {done['message'][:300]}"]
    return []


def ended(done: dict | None) -> str:
    if done is None:
        return "(killed)"
    return "success" if done["ok"] else done["error"]


def stopped(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except OSError:
        return False


def run_case(case: Case, lane: Lane, images: str | None) -> dict:
    """One fault scenario end to end; its row: problems, what A ended with, timings."""
    lane.restart_a()
    a, b = lane.a, lane.b
    clock = [("start", time.monotonic())]
    model = prepare(b, case.op, lane.share)
    clock.append(("prepared", time.monotonic()))
    name, args = a_operation(case.op, model, images)
    action = {
        ("pause", "service"): "stop",
        ("pause", "both"): "stop",
        ("pause", "daemon"): "wait",
        ("kill", "service"): "kill",
        ("kill", "daemon"): "wait",
    }[(case.fault, case.mode)]
    op_id = a.start(name, fault={"k": case.k, "when": case.when, "action": action}, **args)
    problems: list[str] = []
    event = a.step(op_id)
    clock.append(("step", time.monotonic()))
    done: dict | None = None
    held = 0.0
    happened: bool | None = None
    if event is None:
        done = a.result(op_id)
        problems.append(f"never reached {case.label}: {ended(done)} after steps {done['steps']}")
    else:
        if event["step"] != case.step:
            problems.append(f"step {case.k} is {event['step']}, not {case.step}")
        daemon = a.daemon_pid() if case.mode == "daemon" else a.daemon
        if action == "stop":
            if faults.wait_for(lambda: stopped(a.pid), 10) is None:
                problems.append("A did not stop")
            if case.mode == "both":
                os.kill(daemon, signal.SIGSTOP)
        elif case.fault == "pause":  # the daemon alone
            os.kill(daemon, signal.SIGSTOP)
            a.go(op_id)
        elif case.mode == "daemon":  # killed with the call in flight
            os.kill(daemon, signal.SIGSTOP)
            a.go(op_id)
            time.sleep(0.3)
            os.kill(daemon, signal.SIGKILL)
        else:  # the service killed at the step
            a.proc.wait(timeout=30)
            if faults.wait_for(lambda: not faults.running(daemon), 5) is None:
                problems.append(f"A's daemon {daemon} outlived its service")
        t0 = time.monotonic()
        more, happened = b_takes_over(b, case.op, model)
        problems += more
        held = time.monotonic() - t0
        clock.append(("B done", time.monotonic()))
        if case.fault == "pause":
            a.signal(signal.SIGCONT)
            with contextlib.suppress(ProcessLookupError):
                os.kill(daemon, signal.SIGCONT)
        if a.alive():
            done = a.result(op_id, 60)
            if case.fault == "kill":
                a.daemon_pid()  # the next call started a new daemon
    clock.append(("A done", time.monotonic()))
    allowed = ("PrivilegedDaemonLost",) if case.fault == "kill" else FENCED
    problems += judge_a(case, done, happened, allowed)
    problems += check_and_clean(lane, model)
    clock.append(("checked", time.monotonic()))
    phases = {n: round(t - p, 2) for (_, p), (n, t) in itertools.pairwise(clock)}
    return {
        "problems": problems,
        "ended": ended(done),
        "held": held,
        "notes": model.notes,
        "phases": phases,
    }


def run_cases(
    cases: list[Case], lanes_: list[Lane], images: str | None, table_: Table, fault_name: Any
) -> list[tuple[Case, dict]]:
    """Run ``cases`` on the lanes, each lane one scenario at a time, all lanes at once."""
    todo = list(enumerate(cases))
    guard = threading.Lock()
    rows: dict[int, dict] = {}

    def lane_loop(lane: Lane) -> None:
        while True:
            with guard:
                if not todo:
                    return
                index, case = todo.pop(0)
            try:
                row = run_case(case, lane, images)
            except Exception as exc:  # a harness failure is a problem of that case
                row = {"problems": [f"harness: {exc!r}"], "ended": "?", "held": 0, "notes": []}
            rows[index] = row
            table_.add(fault_name(case), case.op, case.label, row["problems"], row["ended"])

    threads = [threading.Thread(target=lane_loop, args=(lane,)) for lane in lanes_]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [(case, rows[i]) for i, case in enumerate(cases)]


def discover_steps(
    lanes_: list[Lane], images: str | None, ops: tuple[str, ...]
) -> dict[str, list[str]]:
    """Each operation's privileged calls, counted by the hook (k = 0 never fires)."""
    steps: dict[str, list[str]] = {}

    def one(lane: Lane, op: str) -> None:
        model = prepare(lane.b, op, lane.share)
        name, args = a_operation(op, model, images)
        done = lane.a.attempt(name, fault={"k": 0}, **args)
        assert done["ok"], done
        steps[op] = done["steps"]
        lane.b.call("delete_volume", volume=model.vol)
        if model.new:
            lane.b.call("delete_volume", volume=model.new)

    for start in range(0, len(ops), len(lanes_)):
        group = ops[start : start + len(lanes_)]
        with concurrent.futures.ThreadPoolExecutor(len(group)) as pool:
            list(pool.map(one, lanes_, group))
    return {op: steps[op] for op in ops}


def cases_for(fault: str, steps: dict[str, list[str]], points: Any) -> list[Case]:
    """``points(op, k, step, names)`` -> the (mode, when) pairs to run at call k."""
    cases = []
    for op, names in steps.items():
        for k, step in enumerate(names, 1):
            for mode, when in points(op, k, step, names):
                cases.append(Case(fault, mode, op, k, when, step, len(names)))
    # The slow ones first, so the lanes finish together.
    return sorted(cases, key=lambda c: c.op not in ("delete_middle", "delete_top", "revert"))


def only(cases: list[Case]) -> list[Case]:
    """``RFSAA_FAULTS_ONLY=op[,op...]``: run only those operations' cases (to debug)."""
    wanted = os.environ.get("RFSAA_FAULTS_ONLY")
    return [c for c in cases if not wanted or c.op in wanted.split(",")]


def report(request, results: list[tuple[Case, dict]], title: str, faults_shown: set[str]) -> None:
    lines = [f"{title}:", _TABLE.render(faults_shown)]
    for case, row in results:
        for problem in row["problems"]:
            lines.append(f"  PROBLEM {case.fault}-{case.mode} {case.op} {case.label}: {problem}")
    notes = collections.Counter(n for _c, row in results for n in row["notes"])
    if notes:
        lines.append("  B retries: " + ", ".join(f"{n} x{c}" for n, c in notes.items()))
    for case, row in results:
        if os.environ.get("RFSAA_FAULTS_PHASES"):
            lines.append(f"  {case.fault}-{case.mode} {case.op} {case.label}: {row.get('phases')}")
    held = [row["held"] for _c, row in results if row["held"]]
    if held:
        lines.append(f"  A held for {min(held):.1f}-{max(held):.1f} s while B took over")
    _show(request, "\n".join(lines))


# -- 1. pause ----------------------------------------------------------------------------------


#: Calls that only read: a pause right before one (other than an operation's
#: first) is the same as a pause right after the call before it.
READ_ONLY = {"volume_state", "statvfs", "list_directory"}


def boundaries(names: list[str]) -> list[int]:
    """The step numbers worth a pause: the first, and every one before or after a change."""
    return [
        k
        for k, step in enumerate(names, 1)
        if k == 1 or step not in READ_ONLY or names[k - 2] not in READ_ONLY
    ]


def pause_points(op: str, k: int, step: str, names: list[str]) -> list[tuple[str, str]]:
    last = len(names)
    points = [("service", "before")] if k in boundaries(names) else []
    destructive = [i for i, n in enumerate(names, 1) if n in DESTRUCTIVE]
    if step in DESTRUCTIVE:
        # A call in flight to a stopped daemon.
        points.append(("daemon", "before"))
    if destructive and k == destructive[0]:
        points.append(("both", "before"))  # service and daemon, before the first change
    if k == last:
        points.append(("service", "after"))  # done: success is due
        if op in ("delete_middle", "copy_image"):
            points.append(("daemon", "after"))
    return points


def test_pause_at_every_step(request, work, gl, redis, images, table):
    started = time.monotonic()
    with lanes(work, gl, redis.url, LANES) as made:
        steps = discover_steps(made, images, OPS)
        _show(
            request,
            "privileged calls per operation:\n"
            + "\n".join(f"  {op}: {' '.join(names)}" for op, names in steps.items()),
        )
        cases = only(cases_for("pause", steps, pause_points))
        results = run_cases(cases, made, images, table, lambda c: f"pause-{c.mode}")
    report(
        request,
        results,
        f"pause, Redis, {len(cases)} scenarios in {time.monotonic() - started:.0f} s",
        {"pause-service", "pause-daemon", "pause-both"},
    )
    assert [(c.label, c.op, r["problems"]) for c, r in results if r["problems"]] == []
