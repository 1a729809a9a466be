"""Argument checks and beneath-the-base opening of the privileged entrypoints (no root)."""

from __future__ import annotations

import os

import pytest

from remotefs_aa import exception
from remotefs_aa.privsep import confine, mount

Refused = exception.PrivilegedArgumentRefused


@pytest.fixture(params=["openat2", "walk"])
def opener(request, monkeypatch):
    """Every opening test runs with openat2 and with the component walk (old kernels)."""
    if request.param == "walk":
        monkeypatch.setattr(confine, "_have_openat2", False)
    else:
        monkeypatch.setattr(confine, "_have_openat2", None)
        fd = confine._open_no_symlinks("/", os.O_RDONLY | os.O_DIRECTORY, 0)
        os.close(fd)
        if confine._have_openat2 is False:
            pytest.fail("this kernel has no openat2; the daemon would use the walk everywhere")
    return request.param


def _open(path, bases, **kw):
    fd = confine.open_beneath(str(path), [str(b) for b in bases], **kw)
    try:
        return os.fstat(fd)
    finally:
        os.close(fd)


def test_path_inside_base_opens(tmp_path, opener):
    (tmp_path / "vol").mkdir()
    (tmp_path / "vol" / "x").write_text("data")
    assert _open(tmp_path / "vol" / "x", [tmp_path]).st_size == 4


@pytest.mark.parametrize("bad", ["../etc/passwd", "/etc/shadow", "relative/path", "", "a\x00b"])
def test_paths_outside_or_malformed_are_refused(tmp_path, bad, opener):
    path = f"{tmp_path}/base/{bad}" if bad.startswith("..") else bad
    with pytest.raises(Refused):
        _open(path, [tmp_path / "base"])


def test_dotdot_is_refused_before_anything_is_opened(tmp_path, opener):
    base = tmp_path / "base"
    (base / "a").mkdir(parents=True)
    with pytest.raises(Refused, match="contains '..'"):
        _open(f"{base}/a/../a", [base])


@pytest.mark.parametrize("where", ["directory", "last component", "below the base"])
def test_symlinks_are_never_followed(tmp_path, where, opener):
    base = tmp_path / "base"
    (base / "real").mkdir(parents=True)
    (base / "real" / "f").write_text("x")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f").write_text("secret")
    if where == "directory":
        (base / "link").symlink_to(outside)
        path = base / "link" / "f"
    elif where == "last component":
        (base / "real" / "g").symlink_to(outside / "f")
        path = base / "real" / "g"
    else:  # a link to a place *inside* the base is refused too
        (base / "inner").symlink_to(base / "real")
        path = base / "inner" / "f"
    with pytest.raises(Refused, match="symbolic link"):
        _open(path, [base])


def test_symlinks_in_a_configured_base_itself_are_resolved(tmp_path, opener):
    """Root configured the base; its own path may go through a link (e.g. /var/run)."""
    real = tmp_path / "real"
    (real / "d").mkdir(parents=True)
    (real / "d" / "f").write_text("abc")
    (tmp_path / "alias").symlink_to(real)
    assert _open(tmp_path / "alias" / "d" / "f", [tmp_path / "alias"]).st_size == 3
    assert _open(real / "d" / "f", [tmp_path / "alias"]).st_size == 3


def test_prefix_sibling_is_not_inside(tmp_path, opener):
    (tmp_path / "base").mkdir()
    (tmp_path / "base2").mkdir()
    (tmp_path / "base2" / "f").write_text("")
    with pytest.raises(Refused, match="outside the allowed directories"):
        _open(tmp_path / "base2" / "f", [tmp_path / "base"])


def test_base_itself_is_refused_where_a_child_is_needed(tmp_path, opener):
    with pytest.raises(Refused, match="base directory itself"):
        _open(tmp_path, [tmp_path])
    assert _open(tmp_path, [tmp_path], allow_base=True)


def test_open_parent_gives_the_directory_and_a_plain_name(tmp_path, opener):
    (tmp_path / "d").mkdir()
    dirfd, name = confine.open_parent(f"{tmp_path}/d/volume-1", [str(tmp_path)])
    try:
        assert name == "volume-1"
        assert os.fstat(dirfd).st_ino == os.stat(tmp_path / "d").st_ino
    finally:
        os.close(dirfd)


def test_split_under_names_the_base_and_the_rest(tmp_path):
    base, rest = confine.split_under(f"{tmp_path}/a/b", [str(tmp_path)])
    assert base == os.path.realpath(tmp_path) and rest == ["a", "b"]


def test_rootwrap_resolve_still_reports_where_a_link_leads(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "evil").symlink_to("/etc")
    with pytest.raises(Refused, match="resolves to '/etc/shadow'"):
        confine.resolve(str(base / "evil" / "shadow"), [str(base)])


@pytest.mark.parametrize("good", ["host:/export", "10.0.0.5:/srv/nfs", "gluster1:vol0"])
def test_good_shares(good):
    assert mount.check_share("nfs", good) == good


@pytest.mark.parametrize(
    "bad",
    ["-o exec host:/x", "host:/x -o y", "host:/a/../b", "", "host:/x;rm", "--bind", "/srv/x",
     "/etc/glusterfs/vol.vol", "host:/export\n"],
)  # fmt: skip
def test_bad_shares(bad):
    with pytest.raises(Refused):
        mount.check_share("glusterfs", bad)


def test_mount_options_come_from_a_list_per_filesystem():
    assert mount.check_options("nfs", "vers=4.2,rw, noatime") == ["vers=4.2", "rw", "noatime"]
    assert mount.check_options("tmpfs", ["size=1m"]) == ["size=1m"]
    gluster = "entry-timeout=0,attribute-timeout=0,negative-timeout=0,direct-io-mode=enable"
    assert len(mount.check_options("glusterfs", gluster)) == 4
    assert mount.check_options("glusterfs", ["backup-volfile-servers=h2:h3"])


@pytest.mark.parametrize(
    "kind,bad",
    [
        ("glusterfs", "log-file=/etc/x"),
        ("glusterfs", "dump-fuse=/etc/x"),
        ("glusterfs", "xlator-option=a=b"),
        ("nfs", "-oexec"),
        ("nfs", "rw -o exec"),
        ("nfs", "helper=/tmp/x"),
        ("nfs", "a b"),
        ("nfs", "x\ny"),
        ("nfs", "vers=4.2/x"),
        ("nfs", "exotic"),
        ("tmpfs", "mode=1777"),
        ("tmpfs", "mode=0777"),
    ],
)
def test_refused_mount_options_are_named(kind, bad):
    with pytest.raises(Refused, match="mount option"):
        mount.check_options(kind, [bad])


def test_fstypes():
    assert mount.check_fstype("glusterfs") == "glusterfs"
    for bad in ["ext4", "none", "fuse.glusterfs", "bind"]:
        with pytest.raises(Refused):
            mount.check_fstype(bad)


def test_formats_names_sizes_modes():
    assert confine.image_format("qcow2") == "qcow2"
    for bad in ["vmdk", "", "raw "]:
        with pytest.raises(Refused):
            confine.image_format(bad)
    assert confine.plain_name("volume-1.snap") == "volume-1.snap"
    assert confine.plain_name(".volume-1.deleting") == ".volume-1.deleting"
    for bad in ["../volume-2", "/etc/shadow", "-x", "a b", "", ".", ".."]:
        with pytest.raises(Refused):
            confine.plain_name(bad)
    for bad in [0, -1, True, "10", 1.5]:
        with pytest.raises(Refused):
            confine.positive_int(bad, "size")
    assert confine.file_mode(0o660) == 0o660 and confine.file_mode(0o666) == 0o666
    for bad in [0o4755, 0o755, 0o700, -1, True, "644"]:
        with pytest.raises(Refused):
            confine.file_mode(bad)
    assert confine.directory_mode(0o755) == 0o755
    for bad in [0o777, 0o1777, 0o757]:
        with pytest.raises(Refused):
            confine.directory_mode(bad)


def test_conversion_names():
    assert confine.is_conversion_name("image-1f2e.1234.99887766")
    assert confine.is_conversion_name("upload-vol_1.1.2")
    for bad in ["image-a", "image-../x.1.2", "shadow", "image-a.1.2/x", "volume-1"]:
        assert not confine.is_conversion_name(bad)


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
