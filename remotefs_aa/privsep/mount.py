"""Mount and unmount shares (CAP_SYS_ADMIN)."""

from __future__ import annotations

import os

from remotefs_aa import exception
from remotefs_aa.privsep import (
    confine,
    entrypoint,
    process_info,
    runner,
    settings,
    sys_admin_pctxt,
)


def _mounted_at(mountpoint: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and fields[4].replace("\\040", " ") == mountpoint:
                return True
    return False


@entrypoint(sys_admin_pctxt)
def mount(fstype: str, share: str, mountpoint: str, options: list[str] | None = None) -> bool:
    """Mount ``share`` at ``mountpoint``; False if it was already mounted there.

    The mount point is created if missing and must lie strictly inside one of
    ``[privileged] allowed_paths``; ``share`` and ``options`` are checked so
    nothing can be smuggled in as an extra option.
    """
    s = settings()
    fstype = confine.fstype(fstype)
    if fstype == "tmpfs":
        if share not in ("tmpfs", "none"):
            raise exception.PrivilegedArgumentRefused("a tmpfs mount takes 'tmpfs' as its source")
    else:
        share = confine.share(share)
    checked = confine.mount_options(options)
    target = confine.resolve_inside(mountpoint, s.allowed_paths, "mount point")
    if share.startswith("/"):  # a bind mount
        share = confine.resolve(share, s.allowed_paths, "bind-mount source")
    if _mounted_at(target):
        return False
    created = not os.path.isdir(target)
    if runner.via_commands():
        runner.run(["mkdir", "-p", "-m", "755", "--", target], timeout=s.command_timeout)
    else:
        os.makedirs(target, mode=0o755, exist_ok=True)
    argv = ["mount", "-t", fstype]
    if checked:
        argv += ["-o", ",".join(checked)]
    try:
        runner.run([*argv, "--", share, target], timeout=s.command_timeout)
    except BaseException:
        # Leave nothing behind: the mount point this call created goes too.
        if created and not _mounted_at(target) and not runner.via_commands():
            try:
                os.rmdir(target)
            except OSError:
                pass
        raise
    return True


@entrypoint(sys_admin_pctxt)
def umount(mountpoint: str) -> bool:
    """Unmount ``mountpoint``; False if nothing was mounted there."""
    s = settings()
    target = confine.resolve_inside(mountpoint, s.allowed_paths, "mount point")
    if not _mounted_at(target):
        return False
    runner.run(["umount", "--", target], timeout=s.command_timeout)
    return True


@entrypoint(sys_admin_pctxt)
def is_mounted(mountpoint: str) -> bool:
    """Whether something is mounted at ``mountpoint`` (as the daemon sees it)."""
    target = confine.resolve_inside(mountpoint, settings().allowed_paths, "mount point")
    return _mounted_at(target)


@entrypoint(sys_admin_pctxt)
def daemon_info() -> dict:
    """Pid, uid and effective capabilities of the mount daemon."""
    return process_info()
