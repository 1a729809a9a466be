"""The parts of the Cinder form that need no Cinder: option routing, naming, mount flags."""

from __future__ import annotations

import subprocess
import sys

import pytest
from oslo_config import cfg

from remotefs_aa import exception
from remotefs_aa.drivers import cinder_caller
from remotefs_aa.drivers.glusterfs import GlusterfsDriver
from remotefs_aa.drivers.remotefs import RemoteFSDriver
from remotefs_aa.objects import Volume
from tests.unit.fakes import make_conf


class BackendConfiguration:
    """What Cinder's per-backend Configuration answers: its section, then [backend_defaults]."""

    config_group = "rfsaa-1"

    def __init__(self, **values):
        self.values = values

    def __getattr__(self, name):
        if name in self.values:
            return self.values[name]
        raise cfg.NoSuchOptError(name, self.config_group)


def test_backend_options_come_from_the_backend_the_rest_from_the_service():
    service = make_conf()
    service.set_override("reserved_percentage", 50)  # [DEFAULT]: never a backend's
    backend = BackendConfiguration(reserved_percentage=7, glusterfs_mount_attempts=2)
    conf = cinder_caller.CinderConf(backend, service, host="h@rfsaa-1", cluster="aa@rfsaa-1")
    assert conf.reserved_percentage == 7 and conf["glusterfs_mount_attempts"] == 2
    assert conf.state_path == service.state_path
    assert conf.coordination.heartbeat == service.coordination.heartbeat
    assert conf.privileged.allowed_paths == service.privileged.allowed_paths
    assert (conf.host, conf.cluster, conf.config_group) == ("h@rfsaa-1", "aa@rfsaa-1", "rfsaa-1")
    with pytest.raises(cfg.NoSuchOptError):
        conf.nfs_mount_options  # noqa: B018 - a backend option the backend lacks


def test_importing_the_caller_module_does_not_import_cinder():
    # In a process of its own: this one may have imported Cinder for another test.
    script = (
        "import sys, remotefs_aa.drivers.cinder_caller\n"
        "print([m for m in sys.modules if m.split('.')[0] == 'cinder'])"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


class Migrated:
    """A Cinder volume after a migration: its files keep the other volume's id."""

    id = "aaaaaaaa-0000-0000-0000-000000000001"
    name_id = "bbbbbbbb-0000-0000-0000-000000000002"
    name = f"volume-{name_id}"
    size = 1
    provider_location = "/share"


def test_files_are_named_by_volume_name_not_by_id():
    assert RemoteFSDriver.chain_id(Migrated()) == Migrated.name_id
    assert RemoteFSDriver.chain_id(Volume(id="v1")) == "v1"

    class OtherTemplate(Migrated):
        name = "vol_" + Migrated.name_id

    with pytest.raises(exception.InvalidVolume, match="volume_name_template 'volume-%s'"):
        RemoteFSDriver.chain_id(OtherTemplate())


def test_connection_options_are_mount_flags_and_the_mount_base_is_given(tmp_path):
    conf = make_conf()
    conf.set_override("state_path", str(tmp_path))
    driver = GlusterfsDriver(conf, host="h")
    driver._share_info = {}
    flags = driver.share_options("gh:/gv0")
    assert flags.startswith("-o entry-timeout=0,attribute-timeout=0,")
    info = driver._connection("gh:/gv0", "volume-x.s1", "qcow2")
    assert info["data"]["options"] == flags and info["mount_point_base"] == str(tmp_path / "mnt")
    conf.set_override("glusterfs_mount_options", "")
    assert driver.share_options("gh:/gv0") is None


def test_a_cluster_name_is_checked_against_the_providers_reach():
    from remotefs_aa import coordination
    from remotefs_aa.coordination.local import LocalLockProvider

    service = make_conf(lock_provider="local")
    conf = cinder_caller.CinderConf(BackendConfiguration(), service, "h@b", "aa@b")
    with pytest.raises(exception.HostLocalLockProvider, match="'aa@b'"):
        coordination.check_cluster_safety(conf, LocalLockProvider(conf))


class ShareIO:
    """A share's files for the 'auto' decision: read, list, create-if-absent."""

    def __init__(self, files: dict[str, str]) -> None:
        self.files = files

    def read_text(self, path):
        return self.files.get(path.rsplit("/", 1)[1])

    def list_directory(self, path):
        return {name: len(text) for name, text in self.files.items()}

    def replace_text_if(self, path, data, expected, **kwargs):
        assert expected is None and path.rsplit("/", 1)[1] not in self.files
        self.files[path.rsplit("/", 1)[1]] = data


@pytest.mark.parametrize(
    ("files", "secure"),
    [
        ({}, True),  # a new share
        ({"volume-1": ""}, False),  # a share with volumes, never decided
        ({"volume-1": "", ".cinderSecureEnvIndicator": ""}, True),  # Cinder made it secure
        ({"volume-1": "", ".remotefs_aaSecureEnvIndicator": "true\n"}, True),
    ],
)
def test_secure_auto_is_decided_by_the_share_and_keeps_cinders_decision(tmp_path, files, secure):
    from remotefs_aa.drivers.nfs import NfsDriver

    conf = make_conf()
    conf.set_override("state_path", str(tmp_path))
    io = ShareIO(dict(files))
    driver = NfsDriver(conf, host="h", io=io)
    driver._decide_secure("server:/export")
    assert driver.secure("server:/export") == (secure, secure)
    # Decided once: remembered in the share (unless Cinder's file already says it).
    ours = io.files.get(".remotefs_aaSecureEnvIndicator")
    assert (
        ours is None
        if ".cinderSecureEnvIndicator" in files
        else ours.strip() == str(secure).lower()
    )


@pytest.mark.parametrize(
    ("value", "secure"),
    [("True", True), (" TRUE ", True), ("false", False), ("False", False), ("AUTO", True)],
)
def test_nas_secure_options_take_any_case_as_in_cinder(tmp_path, value, secure):
    """Cinder's own option (no choices) wins inside Cinder: its values come in any case."""
    from remotefs_aa.drivers.nfs import NfsDriver

    conf = make_conf()
    conf.set_override("state_path", str(tmp_path))
    conf.set_override("nas_secure_file_operations", value)
    conf.set_override("nas_secure_file_permissions", value)
    driver = NfsDriver(conf, host="h", io=ShareIO({}))  # a new share: 'auto' decides secure
    driver._decide_secure("server:/export")
    assert driver.secure("server:/export") == (secure, secure)
    assert cinder_caller.CinderDriver.secure_file_operations_enabled(driver) is (
        value.strip().lower() == "true"
    )
