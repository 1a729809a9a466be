"""The generated rootwrap filters allow exactly the commands our code builds."""

from __future__ import annotations

import json
import os

import pytest
from oslo_rootwrap import wrapper

from remotefs_aa import privsep
from remotefs_aa.privsep import files, mount, qemu, rootwrap_filters, runner
from tests import REPO

EXEC_DIRS = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
RESIZE = ["qemu-img", "resize", "-q", "-f", "qcow2"]
JSON_HEAD = 'json:{"driver": "qcow2", "file": '


class Recorder(runner.Executor):
    """Stands in for rootwrap: records every argv instead of running it."""

    via_commands = True

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def execute(self, argv, stdin, timeout, pass_fds=()):
        assert not pass_fds  # rootwrap runs commands by path
        wrapped = ["timeout", "--kill-after=5", str(int(timeout)), *argv]
        self.calls.append(wrapped)
        if "info" in argv:
            return 0, json.dumps({"virtual-size": 1}), ""
        if "check" in argv:
            return 0, "{}", ""
        return 0, "", ""


@pytest.fixture
def recorded(tmp_path, monkeypatch):
    base = tmp_path / "base"
    (base / "vol").mkdir(parents=True)
    rec = Recorder()
    settings = privsep.Settings.__new__(privsep.Settings)
    settings.allowed_paths = [str(base)]
    settings.command_timeout = 60
    settings.info_max_memory = 1024
    settings.info_max_cpu = 30
    monkeypatch.setattr(privsep, "_settings", settings)
    monkeypatch.setattr(runner, "_executor", rec)
    for ctx in privsep.CONTEXTS.values():
        monkeypatch.setattr(ctx, "client_mode", False)
    monkeypatch.setattr(mount, "_mounted_at", lambda path: False)
    return str(base / "vol"), rec


def _filters(tmp_path, base):
    d = tmp_path / "filters"
    d.mkdir()
    (d / "remotefs_aa.filters").write_text(rootwrap_filters.generate([os.path.dirname(base)]))
    return wrapper.load_filters([str(d)])


def test_every_command_built_by_the_entrypoints_is_allowed(recorded, tmp_path):
    vol, rec = recorded
    img = f"{vol}/volume-1"
    qemu.qemu_img_create(img, "raw", 1024)
    qemu.qemu_img_create(f"{img}.s1", "qcow2", backing_file="volume-1", backing_fmt="raw")
    qemu.qemu_img_create(f"{img}.s2", "qcow2", 2048, "volume-1.s1", "qcow2")
    for fmt in ("raw", "qcow2"):
        for chain in (False, True):
            qemu.qemu_img_info(img, fmt, chain)
    qemu.image_chain(f"{img}.s2")
    qemu.qemu_img_commit(f"{img}.s1")
    qemu.qemu_img_rebase(f"{img}.s2", "volume-1", "raw", unsafe=True)
    qemu.qemu_img_resize(img, "raw", 4096)
    qemu.qemu_img_resize(f"{img}.s2", "qcow2", 4096, skip_backing=True)
    qemu.qemu_img_convert(img, "raw", f"{vol}/volume-2", "qcow2")
    qemu.qemu_img_convert(img, "raw", f"{vol}/volume-3", "raw", sparse=False)
    qemu.qemu_img_check(f"{img}.s2")
    files.make_directory(f"{vol}/d", 0o750)
    files.unlink(f"{vol}/gone")
    files.truncate(img, 10)
    files.truncate(f"{vol}/volume-4", 10, 0o660)
    files.fallocate(img, 10)
    files.write_file_atomic(f"{vol}/volume-1.info", '{"active": "volume-1"}')
    files.read_file(f"{vol}/volume-1.info")
    mount.mount("glusterfs", "gluster1:/vol0", f"{vol}/mnt", ["log-level=WARNING"])
    mount.mount("nfs", "10.0.0.5:/export", f"{vol}/mnt2", "vers=4.2,rw")
    mount.mount("tmpfs", "tmpfs", f"{vol}/mnt3")
    filters = _filters(tmp_path, vol)
    assert len(rec.calls) > 30
    for argv in rec.calls:
        assert wrapper.match_filter(filters, argv, exec_dirs=EXEC_DIRS), argv


@pytest.mark.parametrize(
    "argv",
    [
        ["cat", "/etc/shadow"],
        ["rm", "-rf", "--", "{base}"],
        ["chmod", "4755", "--", "{base}/x"],
        ["truncate", "-s", "1", "--", "{base}/../x"],
        ["truncate", "-s", "1", "--", "/etc/passwd"],
        ["truncate", "-s", "1", "--", "{base}"],
        ["dd", "of=/etc/shadow", "conv=fsync", "status=none"],
        ["mount", "-t", "tmpfs", "-o", "-oexec", "--", "tmpfs", "{base}/m"],
        ["mount", "-t", "ext4", "--", "/dev/sda1", "{base}/m"],
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "../other", "-F", "raw", "{base}/o"],
        ["qemu-img", "info", "--output=json", "{base}/x"],  # without resource limits
        # A JSON spec that names another backing file, or a second file.
        [*RESIZE, JSON_HEAD + '{"driver": "file", "filename": "{base}/x"}, "backing": "/e"}', "1"],
        [
            *RESIZE,
            JSON_HEAD + '{"driver": "file", "filename": "{base}/x", "a": 1}, "backing": null}',
            "1",
        ],
    ],
)
def test_other_commands_are_refused(tmp_path, argv):
    base = str(tmp_path / "base")
    os.makedirs(base)
    filters = _filters(tmp_path, base + "/x")
    full = ["timeout", "--kill-after=5", "60", *(a.replace("{base}", base) for a in argv)]
    with pytest.raises(wrapper.NoFilterMatched):
        wrapper.match_filter(filters, full, exec_dirs=EXEC_DIRS)


def test_shipped_filters_match_the_defaults():
    """Regenerate: remotefs-aa rootwrap-filters > etc/remotefs_aa/rootwrap.d/remotefs_aa.filters"""
    with open(os.path.join(REPO, "etc/remotefs_aa/rootwrap.d/remotefs_aa.filters")) as f:
        assert f.read() == rootwrap_filters.generate(["/var/lib/remotefs_aa"])
