"""An unprivileged service process, a sudo rule for our privsep helper only, real daemons.

The fixture creates a system user, a virtualenv it can read (made with
Debian's /usr/bin/python3: the default python3 here lives in root's home),
and a sudoers rule that allows that user exactly one command: the venv's
remotefs-aa-privsep-helper. The service process then proves the separation: what it
cannot do itself (mount, write into a root-owned directory, read a root-only
image) it can do through the daemon, and nothing else through sudo.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import tempfile
import textwrap

import pytest

from remotefs_aa import privsep
from remotefs_aa.privsep import rootwrap_filters

pytestmark = pytest.mark.functional

SERVICE = textwrap.dedent(
    """
    import ctypes, json, os, subprocess, sys
    from oslo_config import cfg
    from remotefs_aa import exception, opts, privsep
    from remotefs_aa.privsep import files, mount, qemu

    base, conf_file = sys.argv[1], sys.argv[2]
    conf = cfg.ConfigOpts(); opts.register_opts(conf); privsep.register_opts(conf)
    conf(["--config-file", conf_file], default_config_files=[])
    privsep.init(conf)
    out = {"uid": os.getuid()}
    target = os.path.join(base, "mnt")
    out["daemon_mount"] = mount.mount("tmpfs", "tmpfs", target, ["size=1m"])
    out["mounted"] = mount.is_mounted(target)
    out["daemon_umount"] = mount.umount(target)
    # The same mount from the service itself, now that the mount point exists.
    direct = subprocess.run(["mount", "-t", "tmpfs", "tmpfs", target],
                            capture_output=True, text=True)
    out["direct_mount_rc"] = direct.returncode
    out["direct_mount_err"] = direct.stderr.strip()
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.mount(b"tmpfs", target.encode(), b"tmpfs", 0, None)
    out["direct_mount_syscall_errno"] = ctypes.get_errno() if rc != 0 else 0
    try:
        open(os.path.join(base, "volume-1"), "w")
        out["direct_write"] = "allowed"
    except PermissionError as exc:
        out["direct_write"] = "EACCES"
    qemu.qemu_img_create(os.path.join(base, "volume-1"), "raw", 1 << 20, mode=0o660)
    qemu.qemu_img_create(os.path.join(base, "volume-1.s1"), "qcow2",
                         backing_file="volume-1", backing_fmt="raw", mode=0o660)
    info = qemu.qemu_img_info(os.path.join(base, "volume-1.s1"), "qcow2", backing_chain=True)
    out["chain"] = [i["filename"] for i in info]
    # Delete the middle of a chain through the daemon: commit, rebase, unlink.
    s1, s2 = (os.path.join(base, f"volume-1.s{i}") for i in (1, 2))
    qemu.qemu_img_create(s2, "qcow2", backing_file="volume-1.s1", backing_fmt="qcow2",
                         mode=0o660)
    qemu.qemu_img_commit(s1, "qcow2")
    qemu.qemu_img_rebase(s2, "volume-1", "raw", unsafe=True)
    files.unlink(s1)
    info = qemu.qemu_img_info(s2, "qcow2", backing_chain=True)
    out["merged_chain"] = [i["filename"] for i in info]
    out["check"] = qemu.qemu_img_check(s2)["exit_code"]
    # Every file the daemon made belongs to the service, with the mode asked for.
    out["owners"] = sorted({(os.stat(p).st_uid, os.stat(p).st_mode & 0o777)
                            for p in (os.path.join(base, "volume-1"), s2)})
    # ... and the service reads its own volume directly (a compute host's qemu would too).
    direct_info = subprocess.run(["qemu-img", "info", "-f", "qcow2", s2],
                                 capture_output=True, text=True)
    out["direct_info_rc"] = direct_info.returncode
    try:
        files.read_file("/etc/shadow")
        out["shadow"] = "read"
    except exception.PrivilegedArgumentRefused as exc:
        out["shadow"] = str(exc)
    out["file_daemon"] = files.daemon_info()
    out["mount_daemon"] = mount.daemon_info()
    sudo_any = subprocess.run(["sudo", "-n", "true"], capture_output=True, text=True)
    out["sudo_true_rc"] = sudo_any.returncode
    privsep.stop()
    print(json.dumps(out))
    """
)


@pytest.mark.parametrize("mode", ["privsep", "rootwrap_daemon"])
def test_unprivileged_service_works_only_through_the_daemon(
    service_venv, service_user, rootwrap_dir, mode
):
    base = tempfile.mkdtemp(prefix="rfsaa-unpriv-")
    os.chmod(base, 0o755)  # noqa: S103 - root-owned: the service user cannot write here
    filters = os.path.join(rootwrap_dir, "rootwrap.d")
    os.makedirs(filters, exist_ok=True)
    with open(os.path.join(filters, "remotefs_aa.filters"), "w") as f:
        f.write(rootwrap_filters.generate([base]))
    with open(os.path.join(rootwrap_dir, "rootwrap.conf"), "w") as f:
        f.write(rootwrap_filters.rootwrap_conf(filters))
    conf_file = os.path.join(rootwrap_dir, "rfsaa.conf")  # root-only, not under state_path
    with open(conf_file, "w") as f:
        f.write(
            f"[DEFAULT]\nstate_path = {base}\n[privileged]\nmode = {mode}\n"
            f"root_helper = sudo -n\nrootwrap_config = {rootwrap_dir}/rootwrap.conf\n"
        )
    os.chmod(conf_file, 0o644)
    try:
        result = subprocess.run(
            ["runuser", "-u", service_user, "--", f"{service_venv}/bin/python", "-c", SERVICE,
             base, conf_file],
            capture_output=True, text=True, timeout=300, cwd="/",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-4000:]
        out = json.loads(result.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run(["umount", os.path.join(base, "mnt")], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(out))
    assert out["uid"] != 0
    assert out["direct_mount_rc"] != 0, out
    assert "superuser" in out["direct_mount_err"] or "ermission" in out["direct_mount_err"]
    assert out["direct_mount_syscall_errno"] == errno.EPERM  # the service cannot mount
    assert out["daemon_mount"] is True and out["mounted"] is True and out["daemon_umount"] is True
    assert out["direct_write"] == "EACCES"
    assert out["chain"] == [f"{base}/volume-1.s1", f"{base}/volume-1"]
    assert out["merged_chain"] == [f"{base}/volume-1.s2", f"{base}/volume-1"]
    assert out["check"] == 0
    assert out["owners"] == [[out["uid"], 0o660]]  # the service's files, its mode
    assert out["direct_info_rc"] == 0
    assert "outside the allowed directories" in out["shadow"]
    if mode == "privsep":
        # The mount daemon is root with CAP_SYS_ADMIN only; the file daemon is the
        # service's own user with the file capabilities (rootwrap: commands as root).
        assert out["mount_daemon"]["uid"] == 0
        assert out["file_daemon"]["uid"] == out["uid"]
        assert out["file_daemon"]["cap_eff"] == sum(1 << c for c in privsep.FILES_CAPS)
    assert out["sudo_true_rc"] != 0  # sudo allows it our privsep helper and nothing else


OWN_CONFIG = textwrap.dedent(
    """
    import json, os, subprocess, sys, tempfile
    from oslo_config import cfg
    from remotefs_aa import exception, opts, privsep
    from remotefs_aa.privsep import files

    helper = sys.argv[1]
    mine = tempfile.mkdtemp()  # the service's own directory, its own file
    conf_file = os.path.join(mine, "wide.conf")
    with open(conf_file, "w") as f:
        f.write("[privileged]\\nallowed_paths = /\\nroot_helper = sudo -n\\n")
    conf = cfg.ConfigOpts(); opts.register_opts(conf); privsep.register_opts(conf)
    conf(["--config-file", conf_file], default_config_files=[])
    privsep.init(conf)
    out = {}
    try:
        out["shadow"] = files.read_file("/etc/shadow")[:10]
    except exception.PrivilegedHelperUnavailable as exc:
        out["refused"] = str(exc)
    privsep.stop()
    # sudo allows the helper with any arguments; logging options are not among them.
    log = os.path.join(mine, "x")
    direct = subprocess.run(
        ["sudo", "-n", helper, "--log-file", "/etc/rfsaa-should-not-exist",
         "--privsep_context", "remotefs_aa.privsep.file_pctxt", "--privsep_sock_path", log],
        capture_output=True, text=True, timeout=60)
    out["log_option_rc"] = direct.returncode
    out["log_option_err"] = direct.stderr.strip()[-300:]
    print(json.dumps(out))
    """
)


def test_service_cannot_widen_the_daemon_with_its_own_config(service_venv, service_user):
    """The sudo rule allows the helper with any arguments; the helper allows little."""
    helper = f"{service_venv}/bin/remotefs-aa-privsep-helper"
    result = subprocess.run(
        ["runuser", "-u", service_user, "--", f"{service_venv}/bin/python", "-c", OWN_CONFIG,
         helper],
        capture_output=True, text=True, timeout=300, cwd="/",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert "shadow" not in out, "the daemon read /etc/shadow for the service"
    assert "refusing config" in out["refused"] and "owned by uid" in out["refused"]
    assert "chown root:root" in out["refused"]
    assert out["log_option_rc"] != 0 and "--log-file" in out["log_option_err"], out
    assert not os.path.exists("/etc/rfsaa-should-not-exist")
