"""Cinder's shares-file format: what is accepted, and that every bad line is named."""

from __future__ import annotations

import pytest

from remotefs_aa import exception
from remotefs_aa.drivers import nfs, shares


def _file(tmp_path, text):
    path = tmp_path / "shares"
    path.write_text(text)
    return str(path)


def test_shares_file_with_comments_options_and_ipv6(tmp_path):
    path = _file(
        tmp_path,
        "# volumes\n\n10.0.0.5:/srv/a\nnas.example:/srv/b -o vers=4.1,noatime\n"
        "[fd00::1]:/srv/c\n   # indented comment\n",
    )
    found = shares.parse_shares_file(path, "nfs")
    assert [s.address for s in found] == [
        "10.0.0.5:/srv/a",
        "nas.example:/srv/b",
        "[fd00::1]:/srv/c",
    ]
    assert found[1].options == ("vers=4.1", "noatime")


def test_glusterfs_accepts_host_colon_volume(tmp_path):
    found = shares.parse_shares_file(_file(tmp_path, "g1:vol\ng2:/vol2\n"), "glusterfs")
    assert [s.address for s in found] == ["g1:vol", "g2:/vol2"]


@pytest.mark.parametrize(
    "line,reason",
    [
        ("just-a-host", "not of the form host:/export"),
        ("host:/a extra", "unexpected 'extra'"),
        ("host:/a -o", "unexpected '-o'"),
        ("host:/a -o helper=/bin/sh", "not allowed"),
        ("host:/a -o ro,-x", "not allowed"),
        ("-o:/a", "not of the form"),
        ("host:/a 'unterminated", "cannot be parsed"),
    ],
)
def test_bad_line_is_named(tmp_path, line, reason):
    path = _file(tmp_path, f"ok:/fine\n# c\n{line}\n")
    with pytest.raises(exception.InvalidConfig, match=reason) as err:
        shares.parse_shares_file(path, "nfs")
    assert f"{path} line 3" in str(err.value)


def test_duplicate_empty_and_missing_files(tmp_path):
    with pytest.raises(exception.InvalidConfig, match="listed twice"):
        shares.parse_shares_file(_file(tmp_path, "a:/x\na:/x\n"), "nfs")
    with pytest.raises(exception.InvalidConfig, match="lists no share"):
        shares.parse_shares_file(_file(tmp_path, "# nothing\n"), "nfs")
    with pytest.raises(exception.InvalidConfig, match="cannot be read"):
        shares.parse_shares_file(str(tmp_path / "absent"), "nfs")


def test_nfs_version_fallback_unless_pinned(tmp_path):
    from tests.unit.fakes import make_conf

    conf = make_conf()
    driver = nfs.NfsDriver(conf, host="h")
    driver._share_info = {"s:/a": shares.Share("s:/a", ("noatime",))}
    assert driver.option_variants("s:/a") == [
        ["noatime", "vers=4.2"],
        ["noatime", "vers=4.1"],
        ["noatime"],
    ]
    for pinned in ("vers=3", "nfsvers=4.1", "v4"):
        driver._share_info = {"s:/a": shares.Share("s:/a", (pinned,))}
        assert driver.option_variants("s:/a") == [[pinned]]


@pytest.mark.parametrize("kind", ["nfs", "glusterfs"])
def test_the_shipped_shares_file_examples_parse(kind):
    """etc/remotefs_aa/<kind>_shares.example is what an operator copies: it must be valid."""
    import os

    from tests import REPO

    path = os.path.join(REPO, "etc", "remotefs_aa", f"{kind}_shares.example")
    found = shares.parse_shares_file(path, kind)
    assert len(found) >= 2 and any(s.options for s in found)
    from remotefs_aa.privsep import mount

    for share in found:  # and the privileged daemon would mount with those options
        assert mount.check_options(kind, list(share.options)) == list(share.options)
