"""Options: registration, validation errors, and the generated sample."""

from __future__ import annotations

import os

import pytest
from oslo_config import cfg, generator

from remotefs_aa import exception, opts
from tests import REPO

SAMPLE = os.path.join(REPO, "etc", "remotefs_aa", "remotefs_aa.conf.sample")


def conf_from(tmp_path, text: str) -> cfg.ConfigOpts:
    path = tmp_path / "test.conf"
    path.write_text(text)
    conf = cfg.ConfigOpts()
    opts.register_opts(conf)
    conf(["--config-file", str(path)], project="remotefs_aa", default_config_files=[])
    return conf


def test_defaults_are_the_embedded_default(tmp_path):
    conf = conf_from(tmp_path, "[DEFAULT]\nstate_path = /srv/state\n")
    opts.validate(conf)
    assert conf.volume_driver == "local"
    assert conf.coordination.lock_provider == "tooz"
    assert conf.coordination.backend_url == "file:///srv/state/coordination"
    assert conf.coordination.lock_path == "/srv/state/locks"
    assert conf.coordination.heartbeat == 1.0
    assert conf.coordination.initial_reconnect_backoff == 0.1
    assert conf.coordination.max_reconnect_backoff == 60.0
    assert conf.cluster is None
    assert conf.host


def test_backend_url_is_secret():
    opt = next(o for o in opts.coordination_opts if o.dest == "backend_url")
    assert opt.secret


@pytest.mark.parametrize(
    ("text", "option", "value"),
    [
        ("[coordination]\nheartbeat = often\n", "[coordination] heartbeat", "often"),
        ("[coordination]\nheartbeat = 0\n", "[coordination] heartbeat", "0"),
        (
            "[coordination]\nlock_acquire_timeout = -1\n",
            "[coordination] lock_acquire_timeout",
            "-1",
        ),
        (
            "[coordination]\nbackend_url = zooekeeper://h:2181\n",
            "[coordination] backend_url",
            "zooekeeper://h:2181",
        ),
        ("[coordination]\nbackend_url = not a url\n", "[coordination] backend_url", "not a url"),
        (
            "[coordination]\ninitial_reconnect_backoff = 5\nmax_reconnect_backoff = 1\n",
            "[coordination] max_reconnect_backoff",
            "1.0",
        ),
        ("[DEFAULT]\nmax_over_subscription_ratio = fast\n", "max_over_subscription_ratio", "fast"),
        ("[DEFAULT]\nmax_over_subscription_ratio = 0.5\n", "max_over_subscription_ratio", "0.5"),
        ("[DEFAULT]\nnas_secure_file_operations = maybe\n", "nas_secure_file_operations", "maybe"),
    ],
)
def test_bad_values_name_option_and_value(tmp_path, text, option, value):
    conf = conf_from(tmp_path, text)
    with pytest.raises(exception.InvalidConfig) as err:
        opts.validate(conf)
    message = str(err.value)
    assert option in message
    assert repr(value) in message or value in message


def test_unknown_scheme_lists_installed_tooz_backends(tmp_path):
    conf = conf_from(tmp_path, "[coordination]\nbackend_url = zoo://h\n")
    with pytest.raises(exception.InvalidConfig, match="installed: .*redis.*zookeeper"):
        opts.validate(conf)


def test_password_is_hidden_in_errors(tmp_path):
    conf = conf_from(tmp_path, "[coordination]\nbackend_url = bogus://u:hunter2@h/\n")
    with pytest.raises(exception.InvalidConfig) as err:
        opts.validate(conf)
    assert "hunter2" not in str(err.value)
    assert "***" in str(err.value)


def test_list_opts_covers_every_group():
    groups = dict(opts.list_opts())
    assert {o.dest for o in groups["DEFAULT"]} >= {"volume_driver", "state_path", "host", "cluster"}
    assert {o.dest for o in groups["coordination"]} >= {
        "lock_provider",
        "backend_url",
        "heartbeat",
        "initial_reconnect_backoff",
        "max_reconnect_backoff",
        "lock_acquire_timeout",
    }


def test_every_option_has_help():
    for _group, group_opts in opts.list_opts():
        for opt in group_opts:
            assert opt.help and len(opt.help) > 20, opt.dest


def test_committed_sample_config_is_current(tmp_path):
    """Regenerate with: tox -e genconfig (or oslo-config-generator, see tox.ini)."""
    out = tmp_path / "sample.conf"
    generator.main(["--namespace", "remotefs_aa", "--wrap-width", "79", "--output-file", str(out)])
    with open(SAMPLE) as f:
        committed = f.read()
    assert out.read_text() == committed, (
        "etc/remotefs_aa/remotefs_aa.conf.sample is stale: run tox -e genconfig"
    )


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("20.0", 20.0), ("1", 1.0), ("0.9", None), ("auto", "auto"), ("AUTO", "auto")],
)
def test_over_subscription_ratio_reads_as_cinders_does(text, parsed):
    if parsed is None:
        with pytest.raises(ValueError):
            opts.parse_over_subscription_ratio(text)
    else:
        assert opts.parse_over_subscription_ratio(text) == parsed


def test_auto_over_subscription_ratio_follows_the_share_like_cinders_scheduler():
    gib = 1024**3
    # Nothing provisioned yet: Cinder's initial 20.
    assert opts.effective_over_subscription_ratio("auto", 100 * gib, 100 * gib, 0) == 20.0
    # 1 + provisioned / (used + 1 GiB): 1 + 90 / (9 + 1).
    ratio = opts.effective_over_subscription_ratio("auto", 100 * gib, 91 * gib, 90 * gib)
    assert ratio == pytest.approx(10.0)
    assert opts.effective_over_subscription_ratio("3.5", 1, 1, 1) == 3.5


def test_nas_secure_options_take_any_case_as_in_cinder(tmp_path):
    conf = conf_from(tmp_path, "[DEFAULT]\nnas_secure_file_operations = True\n")
    opts.validate(conf)
    assert conf.nfs_snapshot_support is False  # Cinder's default


def test_backend_options_are_what_a_cinder_backend_section_holds():
    names = {o.dest for o in opts.backend_opts()}
    assert {"reserved_percentage", "nfs_shares_config", "glusterfs_mount_options"} <= names
    assert {"local_shares", "provisioned_capacity_refresh_interval"} <= names
    # Service-wide under Cinder: never per backend.
    assert not names & {"state_path", "host", "cluster", "image_conversion_dir"}
