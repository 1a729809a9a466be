"""Cinder 29's own VolumeManager driving a remotefs_aa driver, in a process of its own.

Started by the Cinder tests as::

    python -m tests.functional.cinder_worker SCENARIO --config-file CINDER_CONF \\
        --backend NAME [scenario options]

The first import is ``cinder.cmd.volume``, as in the real ``cinder-volume``:
it monkey-patches the process with eventlet unless
``OS_CINDER_DISABLE_EVENTLET_PATCHING=1`` and registers ``[DEFAULT] cluster``.
Then the process does what cinder-volume's service does before it serves
(config, logging, the privsep root helper, the fake:// RPC transport,
Cinder's coordinator, a ``services`` row), builds ``VolumeManager`` (which
builds the driver named in the backend section) and runs ``init_host``.

Operations are issued as Cinder's API issues them: the same
``conditional_update`` claims (or, where the API has none, the same status
check) before the manager call. The image service is a Glance stand-in over a
directory (``glance.get_remote_image_service`` is pointed at it).

Any failed check raises: the process exits non-zero with a traceback. The
last line of stdout is ``result <json>``.
"""

# isort: off
import cinder.cmd.volume  # noqa: F401  first, as in cinder-volume: eventlet patching

# isort: on

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import threading
import time
import uuid
import warnings

warnings.simplefilter("ignore")

from cinder import context, coordination, monkey_patch, objects, rpc, service  # noqa: E402

objects.register_all()  # before the manager's modules are imported

from cinder import exception, quota, version  # noqa: E402
from cinder.common import config  # noqa: E402, F401  Cinder's global options
from cinder.db import api as db  # noqa: E402
from cinder.db import utils as db_utils  # noqa: E402
from cinder.image import glance  # noqa: E402
from cinder.objects import base as objects_base  # noqa: E402
from cinder.objects import fields  # noqa: E402
from cinder.volume import manager as vol_manager  # noqa: E402
from cinder.volume import volume_types  # noqa: E402
from oslo_config import cfg  # noqa: E402
from oslo_log import log as logging  # noqa: E402
from oslo_privsep import priv_context  # noqa: E402

from remotefs_aa.image.chain import GiB  # noqa: E402
from remotefs_aa.image.store import DirectoryImageService  # noqa: E402
from tests.functional import volumes as v  # noqa: E402

CONF = cfg.CONF
PROJECT = "project-rfsaa"
USER = "user-rfsaa"


class Refused(Exception):
    """The API would have refused the request (a claim lost or a status check failed)."""


def boot(config_file: str) -> None:
    """What cinder-volume does before its service starts serving."""
    CONF(["--config-file", config_file], project="cinder", version=version.version_string())
    logging.setup(CONF, "cinder")
    # cinder-volume: priv_context.init(root_helper=[sudo, cinder-rootwrap, ...]) for
    # Cinder's own privsep contexts (its image format inspector). As root, no sudo
    # is needed, but privsep-helper lives in the venv, off sudo's secure_path.
    bindir = os.path.dirname(sys.executable)
    priv_context.init(root_helper=["env", f"PATH={bindir}:{os.environ.get('PATH', '')}"])
    rpc.init(CONF)  # fake:// transport: casts to the scheduler go nowhere
    coordination.COORDINATOR.start()


class GlanceStandIn:
    """The image-service calls Cinder's flows and our driver make, over a directory."""

    def __init__(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.store = DirectoryImageService(directory)
        self.temp_images = None  # Cinder's TemporaryImages hangs itself here
        self.downloads: dict[str, int] = {}

    def add(self, image_id: str, fmt: str, size: str) -> str:
        v.make_image(self.store, image_id, fmt, size, disk_format=fmt, container_format="bare")
        return image_id

    def path(self, image_id: str) -> str:
        return os.path.join(self.store.directory, image_id)

    def show(self, context, image_id):
        meta = self.store.show(context, image_id)
        return {
            "container_format": "bare",
            "min_disk": 0,
            "min_ram": 0,
            "properties": {},
            **meta,
            "status": "active",
        }

    def get_location(self, context, image_id):
        return ("file://" + self.path(image_id), [])

    def download(self, context, image_id, data=None, **kwargs):
        self.downloads[image_id] = self.downloads.get(image_id, 0) + 1
        self.store.download(context, image_id, data)

    def update(self, context, image_id, image_meta, data=None, purge_props=True, **kwargs):
        return self.store.update(context, image_id, image_meta, data)

    def delete(self, context, image_id):
        return True


class Host:
    """One cinder-volume backend: its services row, manager, driver and API-side calls."""

    def __init__(self, backend: str) -> None:
        self.ctxt = context.get_admin_context()
        self.backend = backend
        self.host = f"{CONF.host}@{backend}"
        self.cluster = f"{CONF.cluster}@{backend}" if CONF.cluster else None
        if self.cluster:
            try:
                objects.Cluster.get_by_id(self.ctxt, None, name=self.cluster, binary=BINARY)
            except Exception:
                cluster = objects.Cluster(
                    context=self.ctxt, name=self.cluster, binary=BINARY, disabled=False
                )
                try:
                    cluster.create()
                except Exception:  # the other host made it at the same moment
                    pass
        try:  # a restarted host keeps its services row, as cinder-volume does
            self.service = objects.Service.get_by_args(self.ctxt, self.host, BINARY)
        except exception.ServiceNotFound:
            self.service = objects.Service(
                context=self.ctxt,
                host=self.host,
                binary=BINARY,
                topic="cinder-volume",
                report_count=0,
                availability_zone="nova",
                cluster_name=self.cluster,
                # As Service does: these pin the RPC and object versions the API uses.
                rpc_current_version=vol_manager.VolumeManager.RPC_API_VERSION,
                object_current_version=objects_base.OBJ_VERSIONS.get_current(),
            )
            self.service.create()
        # What set_workers writes into the workers table (Service.start sets it).
        service.Service.service_id = self.service.id
        self.mgr = vol_manager.VolumeManager(
            host=self.host, cluster=self.cluster, service_name=backend
        )
        self.driver = self.mgr.driver
        self.mgr.init_host(added_to_cluster=None, service_id=self.service.id)
        if not self.driver.initialized:
            raise AssertionError(f"driver {type(self.driver).__name__} was not initialised")
        self.vtype = volume_types.get_default_volume_type(self.ctxt)

    # -- what the API does before it casts to the volume service --------------------

    def new_row(self, size: int, **fields_) -> objects.Volume:
        pool = self.driver.shares[0]
        vol = objects.Volume(
            context=self.ctxt,
            size=size,
            host=f"{self.host}#{pool}",
            cluster_name=self.cluster,
            status="creating",
            attach_status=fields.VolumeAttachStatus.DETACHED,
            project_id=PROJECT,
            user_id=USER,
            availability_zone="nova",
            volume_type_id=self.vtype["id"],
            **fields_,
        )
        vol.create()
        return vol

    def create(self, size: int, snapshot=None, source=None, image=None, **fields_):
        spec = {}
        if snapshot is not None:
            fields_["snapshot_id"] = spec["snapshot_id"] = snapshot.id
        if source is not None:
            fields_["source_volid"] = spec["source_volid"] = source.id
        if image is not None:
            spec["image_id"] = image
        vol = self.new_row(size, **fields_)
        vol.create_worker()  # the scheduler's rpcapi does, when it casts
        try:
            self.mgr.create_volume(self.ctxt, vol, request_spec=objects.RequestSpec(**spec))
        finally:
            vol.refresh()
        return vol

    def snapshot_row(self, vol):
        """The snapshot row the API creates (status creating) before it casts."""
        snap = objects.Snapshot(
            context=self.ctxt,
            volume_id=vol.id,
            status=fields.SnapshotStatus.CREATING,
            volume_size=vol.size,
            project_id=PROJECT,
            user_id=USER,
            volume_type_id=vol.volume_type_id,
        )
        snap.create()
        return snap

    def snapshot(self, vol):
        vol.refresh()
        if vol.status != "available":  # the API's check (it has no claim here)
            raise Refused(f"volume {vol.id} is {vol.status}")
        snap = self.snapshot_row(vol)
        snap.create_worker()  # the volume rpcapi does, when it casts
        self.mgr.create_snapshot(self.ctxt, snap)
        snap.refresh()
        return snap

    def delete_snapshot(self, snap):
        claimed = snap.conditional_update(
            {"status": fields.SnapshotStatus.DELETING},
            {"status": (fields.SnapshotStatus.AVAILABLE, fields.SnapshotStatus.ERROR)},
        )
        if not claimed:
            raise Refused(f"snapshot {snap.id} is not available")
        self.mgr.delete_snapshot(self.ctxt, snap)

    def extend(self, vol, new_size: int):
        if not vol.conditional_update({"status": "extending"}, {"status": "available"}):
            raise Refused(f"volume {vol.id} is not available")
        vol.refresh()
        reservations = quota.QUOTAS.reserve(
            self.ctxt, project_id=vol.project_id, gigabytes=new_size - vol.size
        )
        self.mgr.extend_volume(self.ctxt, vol, new_size, reservations)
        vol.refresh()

    def revert(self, vol, snap):
        vol.refresh()
        latest = vol.get_latest_snapshot()
        if latest.id != snap.id or vol.size != snap.volume_size:
            raise Refused(f"snapshot {snap.id} is not the latest of the same size")
        if not vol.update_single_status_where("reverting", "available"):
            raise Refused(f"volume {vol.id} is not available")
        if not snap.update_single_status_where(fields.SnapshotStatus.RESTORING, "available"):
            vol.update_single_status_where("available", "reverting")
            raise Refused(f"snapshot {snap.id} is not available")
        self.mgr.revert_to_snapshot(self.ctxt, vol, snap)
        vol.refresh()
        snap.refresh()

    def delete(self, vol):
        claimed = vol.conditional_update(
            {"status": "deleting"},
            {
                "status": ("available", "error", "error_restoring", "error_extending"),
                "attach_status": db_utils.Not("attached"),
            },
            [~db.volume_has_snapshots_filter()],
        )
        if not claimed:
            raise Refused(f"volume {vol.id} cannot be deleted now")
        vol.create_worker()  # the volume rpcapi does, when it casts
        self.mgr.delete_volume(self.ctxt, vol)

    def upload(self, vol, image_id: str, disk_format: str) -> None:
        if not vol.conditional_update({"status": "uploading"}, {"status": "available"}):
            raise Refused(f"volume {vol.id} is not available")
        meta = {"id": image_id, "disk_format": disk_format, "container_format": "bare"}
        self.mgr.copy_volume_to_image(self.ctxt, vol.id, meta)
        vol.refresh()

    def connect(self, vol, connector: dict) -> dict:
        return self.mgr.initialize_connection(self.ctxt, vol, connector)

    def disconnect(self, vol, connector: dict) -> None:
        self.mgr.terminate_connection(self.ctxt, vol.id, connector, force=False)


BINARY = "cinder-volume"


# -- checks ------------------------------------------------------------------------


def intact(driver, vol) -> None:
    report = driver.verify_volume(vol)
    if report["problems"]:
        raise AssertionError(f"chain of volume {vol.id}: {report}")


def expect(condition: bool, what: str) -> None:
    if not condition:
        raise AssertionError(what)


def virtual_size(path: str) -> int:
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", path],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)["virtual-size"]


def files_of(driver, name: str) -> list[str]:
    found = []
    for share in driver.shares:
        found += [n for n in os.listdir(driver.share_path(share)) if name in n]
    return sorted(found)


class Steps:
    def __init__(self) -> None:
        self.timings: list[tuple[str, float]] = []

    def __call__(self, name: str):
        steps = self

        class _Step:
            def __enter__(self):
                self.started = time.monotonic()

            def __exit__(self, *exc):
                if exc[0] is None:
                    steps.timings.append((name, round((time.monotonic() - self.started) * 1000)))

        return _Step()


# -- one host: every operation, the chain checked after each --------------------------------


def scenario_single(args) -> dict:
    host = Host(args.backend)
    drv = host.driver
    step = Steps()
    from cinder.volume import driver as cinder_driver

    from remotefs_aa.drivers.base import VolumeDriver

    expect(isinstance(drv, VolumeDriver) and isinstance(drv, cinder_driver.BaseVD), "bases")
    expect(type(drv).__module__ + "." + type(drv).__name__ == args.driver_class, "driver class")
    expect(drv.SUPPORTS_ACTIVE_ACTIVE is True, "SUPPORTS_ACTIVE_ACTIVE")
    expect(drv.snapshot_revert_use_temp_snapshot() is False, "no temp snapshot for revert")
    caps = drv.capabilities
    expect(caps.get("pools") and caps["volume_backend_name"] == args.backend, f"caps {caps}")
    fmt_base = "qcow2" if args.qcow2 else "raw"
    images = GlanceStandIn(os.path.join(CONF.state_path, "images"))
    glance.get_remote_image_service = lambda ctxt, href: (images, href)

    with step("create"):
        vol = host.create(1)
    expect(vol.status == "available", f"create: {vol.status}")
    expect(vol.provider_location in drv.shares, "provider_location is a share")
    expect(os.path.basename(drv.local_path(vol)) == vol.name, "file named by volume.name")
    intact(drv, vol)
    v.write(drv, vol, 0, 0x11)
    v.write(drv, vol, 1, 0x11)

    with step("snapshot"):
        s1 = host.snapshot(vol)
    expect(s1.status == "available", f"snapshot: {s1.status}")
    intact(drv, vol)
    conn = drv.initialize_connection(vol, {})
    expect(conn["data"]["name"] == f"{vol.name}.{s1.id}", f"active after snapshot: {conn}")
    expect(conn["data"]["format"] == "qcow2", "active format after snapshot")
    v.write(drv, vol, 0, 0x22)
    s2 = host.snapshot(vol)
    intact(drv, vol)
    v.write(drv, vol, 0, 0x33)
    v.write(drv, vol, 2, 0x33)

    with step("volume from snapshot (larger)"):
        from_s1 = host.create(2, snapshot=s1)
    expect(from_s1.status == "available", f"from snapshot: {from_s1.status}")
    intact(drv, from_s1)
    expect(v.active_is(drv, from_s1, 0, 0x11) and v.active_is(drv, from_s1, 2, 0), "data")
    expect(virtual_size(v.active_image(drv, from_s1)[0]) == 2 * GiB, "extended to 2 GiB")

    with step("clone"):
        clone = host.create(1, source=vol)
    intact(drv, clone)
    for region, pattern in ((0, 0x33), (1, 0x11), (2, 0x33)):
        expect(v.active_is(drv, clone, region, pattern), f"clone region {region}")
    bigger = host.create(3, source=vol)
    expect(virtual_size(v.active_image(drv, bigger)[0]) == 3 * GiB, "larger clone extended")
    intact(drv, bigger)

    with step("smaller clone refused"):
        refused = None
        try:
            host.create(1, source=from_s1)  # the source is 2 GiB
        except Exception as exc:
            refused = exc
    expect(refused is not None, "a clone smaller than its source was accepted")
    expect("at least that large" in str(refused), f"refused for another reason: {refused!r}")
    small = objects.VolumeList.get_all(
        host.ctxt, filters={"source_volid": from_s1.id, "status": "error"}
    )
    expect(len(small) == 1, f"the smaller clone is in error: {list(small)}")
    expect(files_of(drv, small[0].name) == [], "the refused clone left no file")
    host.delete(small[0])

    with step("revert"):
        host.revert(vol, s2)
    expect(vol.status == "available", f"revert: {vol.status}")
    intact(drv, vol)
    expect(v.active_is(drv, vol, 0, 0x22) and v.active_is(drv, vol, 2, 0), "reverted data")
    expect(objects.SnapshotList.get_all_for_volume(host.ctxt, vol.id).objects, "snapshots kept")
    n_snaps = len(objects.SnapshotList.get_all_for_volume(host.ctxt, vol.id))
    expect(n_snaps == 2, f"revert made no temporary snapshot ({n_snaps})")

    with step("extend"):
        host.extend(vol, 2)
    expect(vol.status == "available" and vol.size == 2, f"extend: {vol.status} {vol.size}")
    intact(drv, vol)
    expect(virtual_size(v.active_image(drv, vol)[0]) == 2 * GiB, "extended")
    expect(v.active_is(drv, vol, 0, 0x22) and v.active_is(drv, vol, v.GROWN, 0), "data")

    with step("initialize+terminate connection"):
        connector = {"host": "compute-1", "ip": "127.0.0.1", "initiator": None}
        info = host.connect(vol, connector)
        host.disconnect(vol, connector)
    data = info["data"]
    expect(info["driver_volume_type"] == args.volume_type, f"connection {info}")
    expect(data["name"] == f"{vol.name}.{s2.id}" and data["format"] == "qcow2", f"{data}")
    if args.volume_type != "local":
        expect(info["mount_point_base"] == os.path.realpath(drv.mount_base), "mount base")
        options = data.get("options")
        expect(options is None or options.startswith("-o "), f"options as flags: {options}")
    else:
        expect(
            data["device_path"] == os.path.join(drv.share_path(data["export"]), data["name"]), ""
        )

    with step("stats"):
        stats = drv.get_volume_stats(refresh=True)
    pool = stats["pools"][0]
    for key in ("total_capacity_gb", "free_capacity_gb", "provisioned_capacity_gb"):
        expect(isinstance(pool[key], float | int) and pool[key] >= 0, f"stats {key}: {pool}")
    expect(pool["provisioned_capacity_gb"] >= 7, f"provisioned counts the volumes: {pool}")

    with step("image to volume"):
        images.add("img-qcow2", "qcow2", "512M")
        from_image = host.create(1, image="img-qcow2")
    expect(from_image.status == "available", f"from image: {from_image.status}")
    intact(drv, from_image)
    expect(v.active_is(drv, from_image, 0, 0x61) and v.active_is(drv, from_image, 5, 0x62), "")
    expect(images.downloads["img-qcow2"] == 1, f"downloaded once: {images.downloads}")
    expect(v.active_image(drv, from_image)[1] == fmt_base, "base format kept")

    with step("volume to image"):
        for disk_format in ("raw", "qcow2"):
            out = f"out-{disk_format}"
            host.upload(vol, out, disk_format)
            expect(vol.status == "available", f"upload: {vol.status}")
            path = images.path(out)
            expect(v.region_is(path, disk_format, 0, 0x22), f"{out} region 0")
            expect(v.region_is(path, disk_format, 1, 0x11), f"{out} region 1")
            expect(virtual_size(path) == 2 * GiB, f"{out} size")
    intact(drv, vol)

    with step("snapshot delete"):
        host.delete_snapshot(s1)
    intact(drv, vol)
    expect(v.snap_is(drv, s2, 0, 0x22) and v.snap_is(drv, s2, 1, 0x11), "s2 keeps its data")
    host.delete_snapshot(s2)
    intact(drv, vol)
    expect(v.active_image(drv, vol)[0] == drv.local_path(vol), "back to the base")
    expect(v.active_is(drv, vol, 0, 0x22) and v.active_is(drv, vol, 1, 0x11), "data kept")
    left = objects.SnapshotList.get_all_for_volume(host.ctxt, vol.id)
    expect(len(left) == 0, f"snapshot rows left: {[s.id for s in left]}")

    with step("migrated volume (name_id)"):
        other = str(uuid.uuid4())
        migrated = host.create(1, _name_id=other)
        expect(migrated.name == f"volume-{other}", f"name {migrated.name}")
        expect(files_of(drv, migrated.id) == [], "no file named by the volume's id")
        expect(os.path.exists(drv.local_path(migrated)), "file named by name_id")
        ms = host.snapshot(migrated)
        expect(
            drv.initialize_connection(migrated, {})["data"]["name"] == f"{migrated.name}.{ms.id}",
            "",
        )
        intact(drv, migrated)
        host.delete_snapshot(ms)
        host.delete(migrated)
        expect(files_of(drv, other) == [], "migrated volume's files removed")

    with step("attached volume refuses snapshots"):
        guest = host.create(1)
        # What attach leaves in the database; the API allows a forced snapshot then.
        guest.update({"status": "in-use", "attach_status": "attached"})
        guest.save()
        snap = host.snapshot_row(guest)
        refused = None
        try:
            host.mgr.create_snapshot(host.ctxt, snap)
        except Exception as exc:
            refused = exc
        expect("needs it detached" in str(refused), f"refused for another reason: {refused!r}")
        snap.refresh()
        expect(snap.status == "error", f"snapshot of an attached volume: {snap.status}")
        overlays = [
            n
            for n in files_of(drv, guest.name)
            if n.startswith(guest.name + ".") and "info" not in n
        ]
        expect(overlays == [], f"no overlay under a guest: {overlays}")
        intact(drv, guest)
        guest.update({"status": "available", "attach_status": "detached"})
        guest.save()
        host.delete_snapshot(snap)
        host.delete(guest)

    with step("volume delete"):
        for each in (vol, from_s1, clone, bigger, from_image):
            each.refresh()
            host.delete(each)
            expect(files_of(drv, each.name) == [], f"files of {each.id} left")
    lock_dir = _lock_dir()
    if lock_dir:
        left = [n for n in os.listdir(lock_dir) if n.startswith("remotefs_aa-") and vol.id in n]
        expect(left == [], f"lock files left after delete: {left}")
    return {"steps": step.timings}


def _lock_dir() -> str | None:
    url = CONF.coordination.backend_url
    return url[len("file://") :] if url.startswith("file://") else None


# -- the cluster workload ------------------------------------------------------------


def scenario_serve(args) -> dict:
    """One cluster member: run phases as the test's control file says, until 'stop'.

    Phases: 'guest' (this host writes a new pattern into, or reverts, the
    volumes of its half: exclusive, serial per volume) and 'ops' (random
    snapshot create/delete, clone, create from snapshot, extend, create and
    delete on every volume of the cluster, concurrently with the other host).
    Each volume's expected data is kept in its admin metadata, in the shared
    database, so the verifier needs nothing else.
    """
    host = Host(args.backend)
    rng = random.Random(args.seed)
    control = args.control
    stats = {"ops": 0, "refused": 0, "errors": [], "by_op": {}}
    done_round = -1
    print(json.dumps({"ready": host.service.id, "pid": os.getpid()}), flush=True)
    while True:
        state = _read_control(control)
        if state["phase"] == "stop":
            break
        if state["round"] == done_round or state["phase"] == "wait":
            time.sleep(0.05)
            continue
        if state["phase"] == "guest":
            _guest_phase(host, args, rng, state["round"], stats)
        elif state["phase"] == "ops":
            _ops_phase(host, args, rng, state, stats)
        done_round = state["round"]
        with open(f"{control}.{args.index}.done", "w") as f:
            json.dump({"round": done_round, "phase": state["phase"], **stats}, f)
    return stats


def _read_control(path: str) -> dict:
    while True:
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            time.sleep(0.02)


def _ours(host, index: int, count: int) -> list:
    vols = objects.VolumeList.get_all(host.ctxt, filters={"status": "available"})
    return [x for x in vols if int(x.id.replace("-", ""), 16) % count == index]


def _pattern(rng) -> int:
    return rng.randrange(1, 255)


def _guest_phase(host, args, rng, round_: int, stats) -> None:
    """Write a new pattern into each of our volumes, or revert it to its latest snapshot."""
    stats.setdefault("backend_unavailable", [])
    for vol in _ours(host, args.index, args.hosts):
        mark = _log_size()
        try:
            _guest_step(host, vol, rng, stats)
        except Exception as exc:  # report, keep going
            if DID_NOT_RUN in str(exc) or DID_NOT_RUN in _log_since(mark):
                stats["backend_unavailable"].append(f"guest: {exc}"[:300])
                _reset_after_refusal(host)
                for snap in objects.SnapshotList.get_all_for_volume(host.ctxt, vol.id):
                    if snap.status == "restoring":  # a refused revert
                        snap.update({"status": "available"})
                        snap.save()
                vol.refresh()
                if vol.status in ("error", "reverting"):
                    vol.update({"status": "available"})
                    vol.save()
            else:
                stats["errors"].append(f"guest: {type(exc).__name__}: {exc}"[:500])


def _guest_step(host, vol, rng, stats) -> None:
    snaps = [
        s
        for s in objects.SnapshotList.get_all_for_volume(host.ctxt, vol.id)
        if s.status == "available"
    ]
    latest = vol.get_latest_snapshot() if snaps else None
    labelled = latest is not None and "pattern" in latest.metadata
    if labelled and latest.volume_size == vol.size and rng.random() < 0.3:
        try:
            host.revert(vol, latest)
        except Refused:
            stats["refused"] += 1
            return
        expect(vol.status == "available", f"revert of {vol.id}: {vol.status}")
        pattern = int(latest.metadata["pattern"])
        _count(stats, "revert")
    else:
        if not vol.conditional_update({"status": "maintenance"}, {"status": "available"}):
            stats["refused"] += 1
            return
        pattern = _pattern(rng)
        v.write(host.driver, vol, 0, pattern)
        vol.conditional_update({"status": "available"}, {"status": "maintenance"})
        _count(stats, "guest write")
    vol.refresh()
    vol.admin_metadata_update({"pattern": str(pattern)}, delete=False)


def _count(stats, op: str) -> None:
    stats["ops"] += 1
    stats["by_op"][op] = stats["by_op"].get(op, 0) + 1


class Raced(Exception):
    """The operation lost a race Cinder's API leaves open (it checks, then casts)."""


OPS = ["snapshot", "snapshot", "delete_snapshot", "delete_snapshot", "clone", "clone",
       "from_snapshot", "extend", "create", "delete"]  # fmt: skip


#: What our lock provider says when its backend failed: the operation did not run.
DID_NOT_RUN = "the operation did not run under this lock"


def _ops_phase(host, args, rng, state, stats) -> None:
    deadline = time.monotonic() + state["seconds"]
    stats.setdefault("raced", [])
    stats.setdefault("backend_unavailable", [])
    while time.monotonic() < deadline:
        op = rng.choice(OPS)
        mark = _log_size()
        try:
            _one_op(host, rng, op, args)
            _count(stats, op)
        except Refused:
            stats["refused"] += 1
        except Raced as exc:
            stats["raced"].append(f"{op}: {exc}"[:300])
        except Exception as exc:  # an operation failed: report, keep going
            if DID_NOT_RUN in str(exc) or DID_NOT_RUN in _log_since(mark):
                # The lock backend dropped this host's session (a loaded machine
                # can starve it): the driver refused to run unlocked, as it must.
                # Put back what Cinder marked failed, as an operator would; the
                # verification afterwards checks that nothing was touched.
                stats["backend_unavailable"].append(f"{op}: {exc}"[:300])
                _reset_after_refusal(host)
            else:
                stats["errors"].append(f"{op}: {type(exc).__name__}: {exc}"[:500])


def _log_size() -> int:
    try:
        return os.path.getsize(CONF.log_file)
    except (OSError, TypeError):
        return 0


def _log_since(mark: int) -> str:
    try:
        with open(CONF.log_file, errors="replace") as f:
            f.seek(mark)
            return f.read()
    except (OSError, TypeError):
        return ""


def _reset_after_refusal(host) -> None:
    """reset-state what a refused operation left failed; delete failed creations."""
    for vol in objects.VolumeList.get_all(host.ctxt):
        if vol.status in ("error_extending", "error_deleting"):
            vol.update({"status": "available"})
            vol.save()
        elif vol.status == "error":
            with contextlib.suppress(Refused):
                host.delete(vol)
        for snap in objects.SnapshotList.get_all_for_volume(host.ctxt, vol.id):
            if snap.status == "error_deleting":
                snap.update({"status": "available"})
                snap.save()
            elif snap.status == "error":
                with contextlib.suppress(Refused):
                    host.delete_snapshot(snap)


def _labelled(host) -> list:
    """Volumes in the workload: available, with their pattern recorded."""
    vols = objects.VolumeList.get_all(host.ctxt, filters={"status": "available"})
    return [x for x in vols if "pattern" in x.admin_metadata]


def _snapshots(host, vol, labelled: bool = False) -> list:
    return [
        s
        for s in objects.SnapshotList.get_all_for_volume(host.ctxt, vol.id)
        if s.status == "available" and (not labelled or "pattern" in s.metadata)
    ]


def _one_op(host, rng, op: str, args) -> None:
    vols = _labelled(host)
    if op == "create" or not vols:
        if len(vols) >= args.max_volumes:
            raise Refused("enough volumes")
        vol = host.create(1)
        expect(vol.status == "available", f"create {vol.id}: {vol.status}")
        # Not in the workload until its pattern is recorded: no one else uses it.
        pattern = _pattern(rng)
        v.write(host.driver, vol, 0, pattern)
        vol.admin_metadata_update({"pattern": str(pattern)}, delete=False)
        return
    vol = rng.choice(vols)
    pattern = vol.admin_metadata["pattern"]
    if op == "snapshot":
        try:
            snap = host.snapshot(vol)
        except Refused:
            raise
        except Exception as exc:
            # vol.size is what the API checked (Host.snapshot refreshed it): an
            # extend claimed right after that check grows the volume under the
            # snapshot, which the driver must refuse (its overlay would be smaller).
            _raced_or_fail(
                host, vol, f"snapshot of {vol.id}: {type(exc).__name__}: {exc}", vol.size
            )
            raise Raced(f"volume {vol.id} was deleted or grew under its snapshot: {exc}") from None
        if snap.status != "available":
            _raced_or_fail(host, vol, f"snapshot {snap.id} of {vol.id} is {snap.status}", vol.size)
            host.delete_snapshot(snap)  # what a user does with an error snapshot
            raise Raced(f"volume {vol.id} was deleted or grew under its new snapshot")
        snap.metadata = {"pattern": pattern}
        snap.save()
    elif op == "delete_snapshot":
        # Labelled ones only: a new snapshot is its creator's until recorded.
        snaps = _snapshots(host, vol, labelled=True)
        if not snaps:
            raise Refused("no snapshot")
        host.delete_snapshot(rng.choice(snaps))
    elif op in ("clone", "from_snapshot"):
        if len(vols) >= args.max_volumes:
            raise Refused("enough volumes")
        if op == "clone":
            size, expected, source = vol.size, pattern, {"source": vol}
        else:
            snaps = _snapshots(host, vol, labelled=True)
            if not snaps:
                raise Refused("no labelled snapshot")
            snap = rng.choice(snaps)
            size, expected, source = snap.volume_size, snap.metadata["pattern"], {"snapshot": snap}
        try:
            new = host.create(size, **source)
        except Exception as exc:
            # The create flow re-raised the driver's refusal; the volume is in error.
            for row in objects.VolumeList.get_all(host.ctxt, filters={"status": "error"}):
                with contextlib.suppress(Refused):  # the other host may be at it too
                    host.delete(row)  # what a user does with an error volume
            _raced_or_fail(host, vol, f"{op} of {vol.id}: {exc}", size)
            raise Raced(f"{op} of {vol.id} refused, its source changed meanwhile: {exc}") from None
        new.admin_metadata_update({"pattern": expected}, delete=False)
    elif op == "extend":
        if vol.size >= 3:
            raise Refused("big enough")
        host.extend(vol, vol.size + 1)
        expect(vol.status == "available", f"extend of {vol.id}: {vol.status}")
    elif op == "delete":
        host.delete(vol)


def _raced_or_fail(host, vol, what: str, size: int | None = None) -> None:
    """Return if ``vol`` changed under the operation (deleted, or grew past ``size``).

    Cinder's API checks a source's status and size, then casts: a concurrent
    delete or extend on another host can still get there first. The driver
    must then refuse (never copy a bigger source into a smaller volume); any
    other failure is a real error.
    """
    try:
        now = objects.Volume.get_by_id(host.ctxt, vol.id)
    except exception.VolumeNotFound:
        return
    if now.status in ("deleting", "extending"):
        return
    if size is not None and now.size > size:
        return
    raise AssertionError(what)


def scenario_verify(args) -> dict:
    """Every chain intact, every volume and snapshot holding its recorded data."""
    host = Host(args.backend)
    drv = host.driver
    problems = []
    checked = {"volumes": 0, "snapshots": 0}
    for vol in objects.VolumeList.get_all(host.ctxt):
        if vol.status != "available":
            problems.append(f"volume {vol.id} is {vol.status}")
            continue
        report = drv.verify_volume(vol)
        problems += [f"volume {vol.id}: {p}" for p in report["problems"]]
        pattern = vol.admin_metadata.get("pattern")
        if pattern is None:
            problems.append(f"volume {vol.id} has no recorded pattern")
        elif not (v.active_is(drv, vol, 0, int(pattern)) and v.active_is(drv, vol, 1, 0)):
            problems.append(f"volume {vol.id}: does not hold pattern {pattern}")
        checked["volumes"] += 1
        for snap in objects.SnapshotList.get_all_for_volume(host.ctxt, vol.id):
            expected = snap.metadata.get("pattern")
            if snap.status != "available" or expected is None:
                problems.append(f"snapshot {snap.id} of {vol.id} is {snap.status}, {expected}")
                continue
            if not (v.snap_is(drv, snap, 0, int(expected)) and v.snap_is(drv, snap, 1, 0)):
                problems.append(f"snapshot {snap.id} of {vol.id}: not pattern {expected}")
            checked["snapshots"] += 1
    # No file on the shares that the database does not know.
    known = {x.name for x in objects.VolumeList.get_all(host.ctxt)}
    for share in drv.shares:
        for name in os.listdir(drv.share_path(share)):
            base = name.lstrip(".").split(".", 1)[0]
            if base.startswith("volume-") and base not in known:
                problems.append(f"file {name} on {share} belongs to no volume")
    return {"problems": problems, "checked": checked}


# -- a host killed mid-operation ---------------------------------------------------------


def scenario_victim(args) -> dict:
    """Clone a volume full of data, snapshot that source meanwhile; wait to be killed.

    Nothing here depends on timing. The clone stops at a known step: a
    ``fence.on_step`` hook blocks its thread right after the copy
    (``qemu_img_convert``, "after"), holding our locks on the source and the
    new volume, with the copy in the new volume's hidden temp file and no
    ``.info`` published yet; it prints ``{"paused": STEP, "files": [...]}``.
    Only then the snapshot (checked as the API checks it) starts, and when it
    reaches the blocking acquire of the source's lock inside the driver this
    prints ``{"snapshotting": ID}``: both are claimed in the workers table by
    this service, and the test kills the process (SIGKILL). A privileged
    step of the snapshot (it got the source's lock) is printed as
    ``{"snapshot step": STEP}``.
    """
    from remotefs_aa import coordination as ours
    from remotefs_aa.coordination import guard
    from remotefs_aa.privsep import fence

    host = Host(args.backend)
    source = objects.Volume.get_by_id(host.ctxt, args.volume)
    print(json.dumps({"ready": host.service.id, "pid": os.getpid()}), flush=True)
    clone_row = host.new_row(source.size, source_volid=source.id)
    clone_row.create_worker()
    role = threading.local()  # green-thread local under eventlet
    paused, waiting = threading.Event(), threading.Event()
    (source_lock,) = guard.lock_names([source.name_id])

    def hook(when: str, step: str) -> None:
        who = getattr(role, "name", None)
        if who == "snapshot":
            print(json.dumps({"snapshot step": f"{when} {step}"}), flush=True)
        if who != "clone" or (when, step) != ("after", "qemu_img_convert"):
            return
        # Called in a ``finally``: an exception the copy raised is in flight here.
        failed = sys.exc_info()[1]
        files = files_of(host.driver, clone_row.name)
        report = {"paused": f"{when} {step}", "files": files, "copy error": failed and repr(failed)}
        print(json.dumps(report), flush=True)
        paused.set()
        threading.Event().wait()  # until the SIGKILL

    provider = ours.get_provider()
    get_lock = provider.get_lock

    def watched_get_lock(name: str):
        lock = get_lock(name)
        if name == source_lock and getattr(role, "name", None) == "snapshot":
            acquire = lock.acquire

            def acquire_watched(blocking: bool = True, timeout: float | None = None) -> bool:
                if blocking:
                    waiting.set()
                return acquire(blocking=blocking, timeout=timeout)

            lock.acquire = acquire_watched
        return lock

    provider.get_lock = watched_get_lock
    fence.on_step = hook

    def clone() -> None:
        role.name = "clone"
        try:
            spec = objects.RequestSpec(source_volid=source.id)
            host.mgr.create_volume(host.ctxt, clone_row, request_spec=spec)
            clone_row.refresh()
            print(json.dumps({"clone finished": clone_row.id, "status": clone_row.status}))
        except BaseException as e:
            print(json.dumps({"clone finished": clone_row.id, "error": repr(e)}))
        finally:
            sys.stdout.flush()
            paused.set()

    def snapshot() -> None:
        role.name = "snapshot"
        try:
            snap = host.snapshot(source)
            print(json.dumps({"snapshot finished": snap.id, "status": snap.status}))
        except BaseException as e:
            print(json.dumps({"snapshot finished": None, "error": repr(e)}))
        finally:
            sys.stdout.flush()
            waiting.set()

    threading.Thread(target=clone, daemon=True).start()
    print(json.dumps({"cloning": clone_row.id}), flush=True)
    paused.wait()
    threading.Thread(target=snapshot, daemon=True).start()
    waiting.wait()
    claimed = [
        w
        for w in db.worker_get_all(host.ctxt, service_id=host.service.id)
        if w.resource_type == "Snapshot"
    ]
    if claimed:
        print(json.dumps({"snapshotting": claimed[0].resource_id}), flush=True)
    threading.Event().wait()  # until the SIGKILL
    return {}


def scenario_cleanup(args) -> dict:
    """do_cleanup of a dead service's work, as the scheduler asks a cluster member to.

    Then what a user does with what the cleanup left in error: delete it.
    """
    host = Host(args.backend)
    before = {
        w.resource_id: (w.resource_type, w.status)
        for w in db.worker_get_all(host.ctxt, service_id=args.dead_service)
    }
    started = time.monotonic()
    host.mgr.do_cleanup(host.ctxt, objects.CleanupRequest(service_id=args.dead_service))
    seconds = time.monotonic() - started
    left = db.worker_get_all(host.ctxt, service_id=args.dead_service)
    after, rows = {}, {}
    for resource_id, (kind, _status) in before.items():
        cls = getattr(objects, kind)
        try:
            rows[resource_id] = cls.get_by_id(host.ctxt, resource_id)
            after[resource_id] = rows[resource_id].status
        except (exception.VolumeNotFound, exception.SnapshotNotFound):
            after[resource_id] = "deleted"
    deleted = []
    for resource_id, status in after.items():
        if status != "error":
            continue
        row = rows[resource_id]
        if before[resource_id][0] == "Snapshot":
            host.delete_snapshot(row)
            deleted.append({"id": resource_id, "left": []})
        else:
            host.delete(row)
            deleted.append({"id": resource_id, "left": files_of(host.driver, row.name)})
    return {
        "workers_before": before,
        "status_after": after,
        "workers_left": len(left),
        "cleanup_seconds": round(seconds, 2),
        "deleted_errors": deleted,
    }


def scenario_fill(args) -> dict:
    """A volume of ``--size`` GiB, half of it written (data for a clone to copy).

    Its pattern is in region 0 and region 1 stays empty, as the verifier
    expects of every volume; the bulk starts at 1 MiB.
    """
    host = Host(args.backend)
    vol = host.create(args.size)
    path, fmt = v.active_image(host.driver, vol)
    pattern = 0x5A
    v.write_region(path, fmt, 0, pattern)
    bulk = f"write -P 0x77 {2**20} {args.size * GiB // 2}"
    subprocess.run(["qemu-io", "-f", fmt, "-c", bulk, path], check=True, capture_output=True)
    vol.admin_metadata_update({"pattern": str(pattern)}, delete=False)
    return {"volume": vol.id}


def scenario_connection(args) -> dict:
    """A volume with a snapshot and data, and the manager's connection info for it."""
    host = Host(args.backend)
    drv = host.driver
    vol = host.create(1)
    v.write(drv, vol, 0, 0x41)
    host.snapshot(vol)
    v.write(drv, vol, 1, 0x42)  # into the active overlay
    connector = {"host": "compute-1", "ip": "127.0.0.1", "initiator": None}
    info = host.connect(vol, connector)
    return {"connection_info": info, "patterns": {"0": 0x41, "1": 0x42}}


def scenario_heartbeat(args) -> dict:
    """Hold one of our locks for 3x the backend's expiry while the service idles.

    Under eventlet the provider's heartbeat is a green thread: it runs only
    when the hub gets control, as it does whenever this process waits on a
    green socket, pipe or sleep (a privileged call, a DB query). A second
    provider (another "host") must find the lock busy all along, and the
    holder must still own it at the end.
    """
    from remotefs_aa import coordination as ours
    from remotefs_aa.coordination.tooz_provider import ToozLockProvider

    host = Host(args.backend)
    provider = ours.get_provider()
    lock = provider.get_lock("remotefs_aa-heartbeat-probe")
    expect(lock.acquire(blocking=False), "probe lock busy at start")
    other = ToozLockProvider(host.driver.conf, member_id=f"other-{os.getpid()}")
    other.start()
    busy_checks = 0
    try:
        deadline = time.monotonic() + 3 * args.expiry
        while time.monotonic() < deadline:
            # Work the service does meanwhile: privileged calls and DB reads.
            host.driver.get_volume_stats(refresh=True)
            objects.VolumeList.get_all(host.ctxt)
            contender = other.get_lock("remotefs_aa-heartbeat-probe")
            expect(not contender.acquire(blocking=False), "another host took a held lock")
            busy_checks += 1
            time.sleep(0.5)
        expect(lock.is_still_owner(), "the holder lost its lock")
    finally:
        lock.release()
        other.stop()
    return {"busy_checks": busy_checks, "heartbeat": provider.requires_heartbeat}


SCENARIOS = {
    "heartbeat": scenario_heartbeat,
    "connection": scenario_connection,
    "single": scenario_single,
    "serve": scenario_serve,
    "verify": scenario_verify,
    "victim": scenario_victim,
    "cleanup": scenario_cleanup,
    "fill": scenario_fill,
}


def _watch_hub(threshold: float) -> None:
    """Diagnostics: print where the eventlet hub was blocked for more than ``threshold`` s.

    A green thread stamps the time every 20 ms; a native thread watches the
    stamp and, when it goes stale, prints the stack the hub's thread is in.
    """
    import traceback

    import eventlet
    from eventlet import patcher

    real_threading = patcher.original("threading")
    real_time = patcher.original("time")
    hub_thread = real_threading.get_ident()
    stamp = [real_time.monotonic()]

    def tick() -> None:
        while True:
            stamp[0] = real_time.monotonic()
            eventlet.sleep(0.02)

    def watch() -> None:
        reported = 0.0
        while True:
            real_time.sleep(threshold / 4)
            lag = real_time.monotonic() - stamp[0]
            if lag > threshold and stamp[0] != reported:
                reported = stamp[0]
                frame = sys._current_frames().get(hub_thread)
                where = "".join(traceback.format_stack(frame)[-6:]) if frame else "?"
                print(f"HUB BLOCKED {lag:.2f} s at:\n{where}", file=sys.stderr, flush=True)

    eventlet.spawn(tick)
    real_threading.Thread(target=watch, daemon=True).start()


def main() -> None:
    if os.environ.get("RFSAA_HUB_BLOCKING") and monkey_patch.is_patched():
        _watch_hub(float(os.environ["RFSAA_HUB_BLOCKING"]))
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--driver-class", default="")
    parser.add_argument("--volume-type", default="nfs")
    parser.add_argument("--qcow2", action="store_true")
    parser.add_argument("--control", default="")
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-volumes", type=int, default=8)
    parser.add_argument("--volume", default="")
    parser.add_argument("--operation", default="clone")
    parser.add_argument("--dead-service", type=int, default=0)
    parser.add_argument("--size", type=int, default=1)
    parser.add_argument("--expiry", type=float, default=3.0)
    args = parser.parse_args()
    boot(args.config_file)
    started = time.monotonic()
    result = SCENARIOS[args.scenario](args)
    result.update(
        patched=monkey_patch.is_patched(),
        seconds=round(time.monotonic() - started, 2),
        threads=threading.active_count(),
    )
    print("result " + json.dumps(result), flush=True)
    # The driver's lock provider stops at exit; its privileged daemons end
    # when this process closes their sockets.
    coordination.COORDINATOR.stop()


if __name__ == "__main__":
    main()
