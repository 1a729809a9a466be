"""Argument checks of the privileged entrypoints (pure functions, no root)."""

from __future__ import annotations

import os

import pytest

from remotefs_aa import exception
from remotefs_aa.privsep import confine

Refused = exception.PrivilegedArgumentRefused


def test_path_inside_base_is_resolved(tmp_path):
    (tmp_path / "vol").mkdir()
    assert confine.resolve(str(tmp_path / "vol" / "x"), [str(tmp_path)]) == os.path.realpath(
        tmp_path / "vol" / "x"
    )


@pytest.mark.parametrize("bad", ["../etc/passwd", "/etc/shadow", "relative/path", "", "a\x00b"])
def test_paths_outside_or_malformed_are_refused(tmp_path, bad):
    path = str(tmp_path / bad) if bad.startswith("..") else bad
    with pytest.raises(Refused):
        confine.resolve(path, [str(tmp_path / "base")])


def test_dotdot_escape_is_refused(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    with pytest.raises(Refused, match="outside the allowed directories"):
        confine.resolve(f"{base}/../../etc/passwd", [str(base)])


def test_symlink_out_of_base_is_refused(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "evil").symlink_to("/etc")
    with pytest.raises(Refused, match="resolves to '/etc/shadow'"):
        confine.resolve(str(base / "evil" / "shadow"), [str(base)])


def test_prefix_sibling_is_not_inside(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base2").mkdir()
    with pytest.raises(Refused):
        confine.resolve(str(tmp_path / "base2" / "f"), [str(tmp_path / "base")])


def test_base_itself_is_refused_where_a_child_is_needed(tmp_path):
    with pytest.raises(Refused, match="base directory itself"):
        confine.resolve_inside(str(tmp_path), [str(tmp_path)])


@pytest.mark.parametrize("good", ["host:/export", "10.0.0.5:/srv/nfs", "gluster1:vol0", "/srv/x"])
def test_good_shares(good):
    assert confine.share(good) == good


@pytest.mark.parametrize(
    "bad", ["-o exec host:/x", "host:/x -o y", "host:/a/../b", "", "host:/x;rm", "--bind"]
)
def test_bad_shares(bad):
    with pytest.raises(Refused):
        confine.share(bad)


def test_mount_options_are_checked_one_by_one():
    assert confine.mount_options("vers=4.2,rw, noatime") == ["vers=4.2", "rw", "noatime"]
    assert confine.mount_options(["size=1m"]) == ["size=1m"]
    for bad in ["-oexec", "rw -o exec", "helper=/tmp/x", "a b", "x\ny"]:
        with pytest.raises(Refused):
            confine.mount_options([bad])


def test_formats_backing_names_sizes_modes():
    assert confine.image_format("qcow2") == "qcow2"
    for bad in ["vmdk", "", "raw "]:
        with pytest.raises(Refused):
            confine.image_format(bad)
    assert confine.backing_name("volume-1.snap") == "volume-1.snap"
    for bad in ["../volume-2", "/etc/shadow", "-x", ".hidden", "a b", ""]:
        with pytest.raises(Refused):
            confine.backing_name(bad)
    for bad in [0, -1, True, "10", 1.5]:
        with pytest.raises(Refused):
            confine.positive_int(bad, "size")
    for bad in [0o4755, -1, True, "644"]:
        with pytest.raises(Refused):
            confine.mode_bits(bad)


def test_fstypes():
    assert confine.fstype("glusterfs") == "glusterfs"
    with pytest.raises(Refused):
        confine.fstype("ext4")


def test_config_only_root_can_change_is_accepted(tmp_path):
    me = os.geteuid()
    conf = tmp_path / "etc" / "rfsaa.conf"
    conf.parent.mkdir()
    conf.write_text("[DEFAULT]\n")
    conf.chmod(0o644)
    confine.root_controlled(str(conf), owner=me)
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    (sticky / "c.conf").write_text("")
    (sticky / "c.conf").chmod(0o600)
    confine.root_controlled(str(sticky / "c.conf"), owner=me)  # like /tmp


@pytest.mark.parametrize("where", ["file", "directory", "symlink target"])
def test_config_others_could_change_is_refused(tmp_path, where):
    me = os.geteuid()
    d = tmp_path / "etc"
    d.mkdir()
    conf = d / "rfsaa.conf"
    conf.write_text("[privileged]\nallowed_paths = /\n")
    conf.chmod(0o644)
    path = conf
    if where == "file":
        conf.chmod(0o664)
    elif where == "directory":
        d.chmod(0o777)  # not sticky: anyone may replace the file
    else:
        d.chmod(0o777)
        path = tmp_path / "link.conf"
        path.symlink_to(conf)
    with pytest.raises(Refused, match="group/world-writable.*chown root:root"):
        confine.root_controlled(str(path), owner=me)


def test_config_owned_by_someone_else_is_refused(tmp_path):
    conf = tmp_path / "rfsaa.conf"
    conf.write_text("")
    if os.geteuid() == 0:
        os.chown(conf, 12345, 12345)
        with pytest.raises(Refused, match="owned by uid 12345"):
            confine.root_controlled(str(conf))
    else:  # a non-root test run owns the file itself, and root is the default owner
        with pytest.raises(Refused, match=f"owned by uid {os.geteuid()}"):
            confine.root_controlled(str(conf))
