"""The driver classes as Cinder constructs them: keywords, options, errors, no I/O.

Each check runs in a fresh interpreter (Cinder's imports register hundreds of
options on the global ``cfg.CONF`` and may monkey-patch), building the driver
exactly as Cinder 29's VolumeManager does::

    import_object(path, configuration=Configuration(volume_backend_opts, backend),
                  host=..., cluster_name=..., is_vol_db_empty=..., active_backend_id=...)
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests import REPO
from tests.functional import cinder_env as ce
from tests.functional.conftest import worker_env

pytestmark = pytest.mark.functional

PRELUDE = """
import json, os, sys, threading, warnings
warnings.simplefilter("ignore")
from oslo_config import cfg
CONF = cfg.CONF

def cinder_conf(text):
    # Cinder's modules imported (their options registered), then the text parsed.
    from cinder import objects
    objects.register_all()
    from cinder.common import config  # noqa
    from cinder.volume import manager  # noqa
    path = os.path.join(os.environ["WORK"], "cinder.conf")
    with open(path, "w") as f:
        f.write(text)
    CONF(["--config-file", path], project="cinder")

def build(backend="b1", cluster=None, **extra):
    from cinder.volume import configuration, manager
    from oslo_utils import importutils
    conf = configuration.Configuration(manager.volume_backend_opts, config_group=backend)
    return importutils.import_object(
        conf.volume_driver, configuration=conf, host="h1@" + backend,
        cluster_name=cluster, is_vol_db_empty=True, active_backend_id=None, **extra)
"""


def run(tmp_path, body: str) -> dict:
    script = PRELUDE + textwrap.dedent(body)
    env = worker_env()
    env["WORK"] = str(tmp_path)
    env["OS_CINDER_DISABLE_EVENTLET_PATCHING"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(autouse=True)
def cinder():
    ce.cinder_installed()


def test_importing_the_package_registers_nothing_and_imports_no_cinder(tmp_path):
    out = run(
        tmp_path,
        """
        import importlib, pkgutil
        groups = set(CONF._groups); names = set(CONF._opts)
        import remotefs_aa
        for mod in pkgutil.walk_packages(remotefs_aa.__path__, "remotefs_aa."):
            importlib.import_module(mod.name)
        new = sorted(set(CONF._groups) - groups)
        print(json.dumps({
            "groups": new,
            "default": sorted(set(CONF._opts) - names),
            "cinder": sorted(m for m in sys.modules if m.split(".")[0] == "cinder"),
        }))
        """,
    )
    # The privsep contexts' own sections (oslo.privsep registers them, names
    # unique to us) and oslo.concurrency's, which Cinder registers identically.
    assert out["groups"] == [
        "oslo_concurrency",
        "remotefs_aa_privsep_files",
        "remotefs_aa_privsep_mount",
    ]
    assert out["default"] == [] and out["cinder"] == []


def test_constructed_as_cinder_does_with_no_thread_daemon_or_connection(tmp_path):
    shares = tmp_path / "shares"
    shares.write_text("nfs-server:/exports/a -o noatime\n")
    out = run(
        tmp_path,
        f"""
        cinder_conf('''
        [DEFAULT]
        state_path = {tmp_path}/state
        reserved_percentage = 33
        [coordination]
        backend_url = redis://127.0.0.1:1
        [backend_defaults]
        max_over_subscription_ratio = auto
        [b1]
        volume_driver = remotefs_aa.drivers.nfs.NfsDriver
        nfs_shares_config = {shares}
        glusterfs_mount_attempts = 7
        ''')
        threads = threading.active_count()
        drv = build(something_new_in_cinder_30="tolerated")
        from cinder.volume import driver as cinder_driver
        from remotefs_aa import coordination, exception, privsep
        from remotefs_aa.drivers.nfs import NfsDriver
        try:
            coordination.get_provider()
            provider_running = True
        except exception.LockProviderNotStarted:
            provider_running = False
        opt = CONF.backend_defaults._group._opts
        print(json.dumps({{
            "class": type(drv).__module__ + "." + type(drv).__name__,
            "ours": isinstance(drv, NfsDriver),
            "basevd": isinstance(drv, cinder_driver.BaseVD),
            "aa": drv.SUPPORTS_ACTIVE_ACTIVE,
            "temp_snap": drv.snapshot_revert_use_temp_snapshot(),
            "threads": threading.active_count() - threads,
            "channels": [c.channel is not None for c in privsep.CONTEXTS.values()],
            "provider_running": provider_running,
            "locks": drv._provider.describe(),
            "host": drv.host,
            "reserved": drv.conf.reserved_percentage,
            "ratio": drv.conf.max_over_subscription_ratio,
            "snapshot_support": drv.conf.nfs_snapshot_support,
            "snapshot_help": opt["nfs_snapshot_support"]["opt"].help,
            "secure_choices": opt["nas_secure_file_operations"]["opt"].type.choices,
            "gluster_attempts": drv.conf.glusterfs_mount_attempts,
            "backend_url_default": CONF.coordination._group._opts["backend_url"]["opt"].default,
            "heartbeat": CONF.coordination.heartbeat,
            "nas_host": drv.conf.nas_host,
        }}))
        """,
    )
    assert out["class"] == "remotefs_aa.drivers.nfs.NfsDriver"
    assert out["ours"] and out["basevd"] and out["aa"] is True and out["temp_snap"] is False
    # Nothing started before Cinder forks: no thread, no privsep daemon, no lock backend.
    assert out["threads"] == 0 and out["channels"] == [False, False]
    assert out["provider_running"] is False
    assert out["locks"] == "redis://127.0.0.1:1" and out["host"] == "h1@b1"
    # Cinder's rules: [DEFAULT] is not a backend's default; [backend_defaults] is.
    assert out["reserved"] == 0 and out["ratio"] == "auto"
    # Cinder's definitions won where Cinder has one; ours were added where not.
    assert out["snapshot_support"] is False and "libvirt" in out["snapshot_help"]
    assert out["secure_choices"] is None
    assert out["gluster_attempts"] == 7
    assert out["backend_url_default"] == "file://$state_path"
    assert out["heartbeat"] == 1.0 and out["nas_host"] == ""


def test_a_later_cinder_nfs_backend_in_the_same_service_still_loads(tmp_path):
    out = run(
        tmp_path,
        f"""
        cinder_conf('''
        [DEFAULT]
        state_path = {tmp_path}/state
        [ours]
        volume_driver = remotefs_aa.drivers.glusterfs.GlusterfsDriver
        [theirs]
        volume_driver = cinder.volume.drivers.nfs.NfsDriver
        ''')
        ours = build("ours")
        theirs = build("theirs")
        print(json.dumps({{"ours": type(ours).__module__, "theirs": type(theirs).__module__}}))
        """,
    )
    assert out == {"ours": "remotefs_aa.drivers.glusterfs", "theirs": "cinder.volume.drivers.nfs"}


@pytest.mark.parametrize(
    "coordination",
    ["lock_provider = local", "backend_url = file:///var/tmp/rfsaa-host-local"],
)
def test_a_cluster_with_host_local_locks_is_refused_at_construction(tmp_path, coordination):
    out = run(
        tmp_path,
        f"""
        cinder_conf('''
        [DEFAULT]
        state_path = {tmp_path}/state
        cluster = aa-1
        [coordination]
        {coordination}
        [b1]
        volume_driver = remotefs_aa.drivers.nfs.NfsDriver
        ''')
        try:
            build(cluster="aa-1@b1")
            print(json.dumps({{"refused": None}}))
        except Exception as exc:
            print(json.dumps({{"refused": type(exc).__name__, "message": str(exc)}}))
        """,
    )
    assert out["refused"] == "HostLocalLockProvider", out
    assert "aa-1@b1" in out["message"] and "only locks within one host" in out["message"]


def test_a_volume_name_template_of_another_grammar_is_refused(tmp_path):
    out = run(
        tmp_path,
        f"""
        cinder_conf('''
        [DEFAULT]
        state_path = {tmp_path}/state
        volume_name_template = vol_%s
        [b1]
        volume_driver = remotefs_aa.drivers.local.LocalDriver
        ''')
        try:
            build()
            print(json.dumps({{"refused": None}}))
        except Exception as exc:
            print(json.dumps({{"refused": type(exc).__name__, "message": str(exc)}}))
        """,
    )
    assert out["refused"] == "InvalidConfig"
    assert "volume_name_template" in out["message"] and "'volume-%s'" in out["message"]


def test_our_errors_become_the_cinder_exceptions_the_manager_acts_on(tmp_path):
    out = run(
        tmp_path,
        """
        from cinder import exception as cx
        from remotefs_aa import exception as ours
        from remotefs_aa.drivers import cinder_caller as cc

        class Obj:
            name = "volume-x"

        cases = {
            "busy delete": (ours.VolumeBusy("has dependents"), "delete_volume"),
            "lock timeout snapshot delete": (ours.LockTimeout("remotefs_aa-v", "timed out"),
                                             "delete_snapshot"),
            "backend down delete": (ours.LockBackendUnavailable("remotefs_aa-v", "down"),
                                    "delete_volume"),
            "backend down create": (ours.LockBackendUnavailable("remotefs_aa-v", "down"),
                                    "create_volume"),
            "image": (ours.ImageRefused("img", "it is encrypted"), "copy_image_to_volume"),
            "smaller": (ours.InvalidVolume("smaller than its source"), "create_cloned_volume"),
            "not latest": (ours.InvalidSnapshot("only the latest"), "revert_to_snapshot"),
            "stale": (ours.StaleInfoGeneration("/x.info", 3, 4), "create_snapshot"),
            "config": (ours.InvalidConfig("nfs_shares_config", "/x", "missing"), "do_setup"),
        }
        result = {}
        for what, (exc, method) in cases.items():
            mapped = cc.to_cinder(exc, method, (Obj(),))
            result[what] = [type(mapped).__name__, str(mapped) == str(exc)]
        print(json.dumps(result))
        """,
    )
    assert out == {
        "busy delete": ["VolumeIsBusy", True],
        "lock timeout snapshot delete": ["SnapshotIsBusy", True],
        "backend down delete": ["VolumeIsBusy", True],
        "backend down create": ["VolumeBackendAPIException", True],
        "image": ["ImageUnacceptable", True],
        "smaller": ["InvalidVolume", True],
        "not latest": ["InvalidSnapshot", True],
        "stale": ["VolumeBackendAPIException", True],
        "config": ["InvalidConfigurationValue", True],
    }


def test_a_privileged_daemon_confined_elsewhere_fails_the_setup_clearly(tmp_path):
    """Cinder's state_path default is not the daemon's: the daemon reads cinder.conf alone."""
    shares = tmp_path / "shares"
    shares.write_text("nfs-server:/exports/a\n")
    out = run(
        tmp_path,
        f"""
        cinder_conf('''
        [DEFAULT]
        # state_path unset: /var/lib/cinder for Cinder, /var/lib/remotefs_aa for the helper
        [coordination]
        backend_url = file://{tmp_path}/locks
        [privileged]
        root_helper =
        [b1]
        volume_driver = remotefs_aa.drivers.nfs.NfsDriver
        nfs_shares_config = {shares}
        ''')
        drv = build()
        try:
            drv.do_setup(None)
            print(json.dumps({{"refused": None}}))
        except Exception as exc:
            print(json.dumps({{"refused": type(exc).__name__, "message": str(exc)}}))
        """,
    )
    assert out["refused"] == "InvalidConfigurationValue", out
    message = out["message"]
    assert "/var/lib/cinder/mnt" in message and "'/var/lib/cinder'" in message
    assert "'/var/lib/remotefs_aa'] in the privileged daemon" in message
    assert "set state_path or [privileged] allowed_paths there explicitly" in message
