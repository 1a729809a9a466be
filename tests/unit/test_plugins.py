"""Plugin loading by entry-point name and dotted path, and third-party plugins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from remotefs_aa import coordination, drivers, exception, plugins
from remotefs_aa.coordination.local import LocalLockProvider
from remotefs_aa.coordination.tooz_provider import ToozLockProvider
from remotefs_aa.drivers.base import VolumeDriver
from tests import REPO, run_cli
from tests.unit.fakes import make_conf


def test_lock_providers_load_by_entry_point_name():
    assert plugins.installed_names(plugins.LOCK_PROVIDERS_NAMESPACE) >= ["local", "tooz"]
    assert (
        plugins.load_class(
            plugins.LOCK_PROVIDERS_NAMESPACE, "tooz", "lock provider", coordination.LockProvider
        )
        is ToozLockProvider
    )


def test_lock_provider_loads_by_dotted_path():
    conf = make_conf(lock_provider="remotefs_aa.coordination.local.LocalLockProvider")
    assert isinstance(coordination.load_provider(conf), LocalLockProvider)


def test_unknown_provider_lists_installed_names():
    conf = make_conf(lock_provider="zookeeper")
    with pytest.raises(exception.PluginNotFound) as err:
        coordination.load_provider(conf)
    assert "unknown lock provider 'zookeeper'" in str(err.value)
    assert "installed: local, tooz" in str(err.value)


def test_unknown_driver_lists_installed_names():
    with pytest.raises(exception.PluginNotFound, match="unknown volume driver 'nfz'"):
        drivers.load_driver_class("nfz")


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("remotefs_aa.drivers.nope.NfsDriver", "cannot import module remotefs_aa.drivers.nope"),
        ("remotefs_aa.drivers.base.NoSuchDriver", "has no NoSuchDriver"),
    ],
)
def test_bad_dotted_driver_path_says_why(path, why):
    with pytest.raises(exception.PluginNotFound, match=why):
        drivers.load_driver_class(path)


def test_dotted_path_to_wrong_type_is_refused():
    with pytest.raises(exception.PluginLoadFailed, match="not a subclass of .*VolumeDriver"):
        drivers.load_driver_class("remotefs_aa.coordination.local.LocalLockProvider")


def test_empty_name_is_refused():
    with pytest.raises(exception.PluginNotFound, match="empty name"):
        drivers.load_driver_class("")


def test_cluster_refuses_host_local_provider(tmp_path):
    conf = make_conf(lock_provider="local", lock_path=str(tmp_path))
    conf.set_override("cluster", "aa-1")
    with pytest.raises(exception.HostLocalLockProvider, match="only locks within one host"):
        coordination.start(conf)


def test_cluster_refuses_tooz_file_backend(tmp_path):
    conf = make_conf(backend_url=f"file://{tmp_path}")
    conf.set_override("cluster", "aa-1")
    with pytest.raises(exception.HostLocalLockProvider, match="zookeeper://"):
        coordination.start(conf)


THIRD_PARTY = textwrap.dedent(
    '''
    """A throwaway third-party package: entry points are all it registers."""
    from remotefs_aa.coordination.local import LocalLockProvider
    from remotefs_aa.drivers.base import VolumeDriver


    class AcmeLockProvider(LocalLockProvider):
        provider_name = "acme"

        def describe(self):
            return "acme locks in " + self.lock_path


    class AcmeDriver(VolumeDriver):
        driver_name = "acme"


    for _name in VolumeDriver.__abstractmethods__:
        setattr(AcmeDriver, _name, lambda self, *a, **k: None)
    AcmeDriver.__abstractmethods__ = frozenset()
    '''
)


def _make_distribution(root) -> None:
    pkg = root / "acme_rfsaa"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(THIRD_PARTY)
    info = root / "acme_rfsaa-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-rfsaa\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[remotefs_aa.volume_drivers]\nacme = acme_rfsaa:AcmeDriver\n\n"
        "[remotefs_aa.lock_providers]\nacme = acme_rfsaa:AcmeLockProvider\n"
    )
    (info / "RECORD").write_text("")


def test_third_party_package_adds_driver_and_provider_by_entry_points(tmp_path):
    """A distribution on sys.path with entry points, and nothing else, plugs in."""
    _make_distribution(tmp_path)
    conf_file = tmp_path / "acme.conf"
    conf_file.write_text(
        f"[DEFAULT]\nstate_path = {tmp_path}/state\nvolume_driver = acme\n"
        "[coordination]\nlock_provider = acme\n"
    )
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}")
    probe = textwrap.dedent(
        f"""
        import json
        from oslo_config import cfg
        from remotefs_aa import drivers, opts, plugins
        conf = cfg.ConfigOpts(); opts.register_opts(conf)
        conf(["--config-file", "{conf_file}"], default_config_files=[])
        driver = drivers.load_driver(conf)
        print(json.dumps({{
            "drivers": plugins.installed_names(plugins.VOLUME_DRIVERS_NAMESPACE),
            "providers": plugins.installed_names(plugins.LOCK_PROVIDERS_NAMESPACE),
            "driver": type(driver).__module__ + "." + type(driver).__name__,
        }}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert "acme" in found["drivers"] and "acme" in found["providers"]
    assert found["driver"] == "acme_rfsaa.AcmeDriver"

    check = run_cli(
        "--config-file", str(conf_file), "lock", "check", "--format", "json", "--rounds", "3",
        env=env,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr
    report = json.loads(check.stdout)
    assert report["lock_provider"] == "acme"
    assert report["backend"].startswith("acme locks in ")
    # Without the distribution on the path the same name is unknown.
    check = run_cli(
        "--config-file", str(conf_file), "lock", "check", env=dict(os.environ, PYTHONPATH=REPO)
    )
    assert check.returncode == 78
    assert "unknown lock provider 'acme'" in check.stderr


def test_volume_driver_base_keeps_cinder_method_names():
    expected = {
        "do_setup",
        "check_for_setup_error",
        "create_volume",
        "delete_volume",
        "create_snapshot",
        "delete_snapshot",
        "create_volume_from_snapshot",
        "create_cloned_volume",
        "extend_volume",
        "revert_to_snapshot",
        "copy_image_to_volume",
        "copy_volume_to_image",
        "initialize_connection",
        "get_volume_stats",
    }
    assert expected <= set(VolumeDriver.__abstractmethods__)
