"""Mount and unmount shares (CAP_SYS_ADMIN).

The mount point is opened beneath an allowed base without following a link
and handed to mount(8) as ``/proc/self/fd/N`` with ``--no-canonicalize``, so
the kernel mounts on exactly the directory that was checked, whatever is
renamed around it meanwhile; umount is the ``umount2`` system call on the
plain name inside the pinned parent directory. Shares are ``host:/export``
(NFS) or ``host:/volume`` (GlusterFS): never a local path, which
mount.glusterfs would read as a volfile. Options come from a list per
filesystem type (what operators set for NFS and the GlusterFS FUSE client);
anything else, ``log-file=`` and ``dump-fuse=`` among them, is refused by
name. The children (mount, mount.nfs, the GlusterFS client) hold only
CAP_SYS_ADMIN, in their ambient set: see ``caps.py``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
from collections.abc import Iterator

from remotefs_aa import exception
from remotefs_aa.privsep import (
    confine,
    entrypoint,
    fence,
    process_info,
    runner,
    settings,
    sys_admin_pctxt,
)

#: Options that take no value, and options that take one (checked by _VALUE).
_NFS_FLAGS = frozenset(
    "ro rw sync async atime noatime diratime nodiratime relatime strictatime noexec nosuid "
    "nodev soft hard softreval nosoftreval intr nointr ac noac cto nocto lock nolock fsc "
    "nofsc rdirplus nordirplus sharecache nosharecache resvport noresvport tcp udp bg fg "
    "_netdev nofail acl noacl".split()
)
_NFS_VALUES = frozenset(
    "vers nfsvers minorversion proto port mountport mountproto mountvers timeo retrans "
    "rsize wsize acregmin acregmax acdirmin acdirmax actimeo lookupcache sec local_lock "
    "nconnect max_connect retry clientaddr addr mounthost namlen".split()
)
_GLUSTER_FLAGS = frozenset(
    "ro rw acl selinux worm noatime nodiratime relatime nosuid nodev noexec _netdev "
    "nofail auto_unmount fopen-keep-cache".split()
)
_GLUSTER_VALUES = frozenset(
    "backup-volfile-servers backupvolfile-server transport direct-io-mode entry-timeout "
    "attribute-timeout negative-timeout gid-timeout background-qlen congestion-threshold "
    "log-level volfile-max-fetch-attempts use-readdirp reader-thread-count lru-limit "
    "invalidate-limit kernel-writeback-cache attr-times-granularity".split()
)
_TMPFS_FLAGS = frozenset("ro rw noexec nosuid nodev".split())
_TMPFS_VALUES = frozenset("size nr_inodes mode".split())

ALLOWED_OPTIONS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "nfs": (_NFS_FLAGS, _NFS_VALUES),
    "nfs4": (_NFS_FLAGS, _NFS_VALUES),
    "glusterfs": (_GLUSTER_FLAGS, _GLUSTER_VALUES),
    "tmpfs": (_TMPFS_FLAGS, _TMPFS_VALUES),
}
# A value: letters, digits and ._:@%+- (':' separates backup servers); no
# '/' (no path anywhere), no ',' (it would start another option), no '='.
_VALUE = re.compile(r"^[A-Za-z0-9_.:@%+-]{1,255}\Z")
# host:/export or host:/volume (a bracketed IPv6 host too); never a local path.
_REMOTE = re.compile(
    r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_][A-Za-z0-9_.-]*):/?[A-Za-z0-9_.+@%-][A-Za-z0-9_./+@%-]*\Z"
)


def check_fstype(value: object) -> str:
    """One of the filesystem types the drivers (and tests: tmpfs) mount."""
    if value not in ALLOWED_OPTIONS:
        raise exception.PrivilegedArgumentRefused(
            f"filesystem type {value!r} is not one of {', '.join(sorted(ALLOWED_OPTIONS))}"
        )
    return str(value)


def check_share(kind: str, value: object) -> str:
    """``host:/export`` for NFS and GlusterFS, ``tmpfs`` for tmpfs."""
    if kind == "tmpfs":
        if value != "tmpfs":
            raise exception.PrivilegedArgumentRefused("a tmpfs mount takes 'tmpfs' as its source")
        return value
    if not isinstance(value, str) or not _REMOTE.match(value) or ".." in value.split("/"):
        raise exception.PrivilegedArgumentRefused(
            f"share {value!r} is not of the form host:/export (letters, digits and ._-/:@%+; "
            f"no local path: mount.glusterfs would read one as a volume file)"
        )
    return value


def check_options(kind: str, values: list[str] | str | None) -> list[str]:
    """Mount options for ``kind``, each one a known ``key`` or ``key=value``."""
    if values is None:
        return []
    items = values.split(",") if isinstance(values, str) else list(values)
    flags, with_value = ALLOWED_OPTIONS[kind]
    checked = []
    for item in items:
        if not isinstance(item, str):
            raise exception.PrivilegedArgumentRefused(f"mount option {item!r} is not a string")
        item = item.strip()
        if not item:
            continue
        key, has_value, value = item.partition("=")
        if has_value:
            if key not in with_value:
                raise exception.PrivilegedArgumentRefused(
                    f"mount option {key!r} is not allowed for {kind} (allowed with a value: "
                    f"{', '.join(sorted(with_value))})"
                )
            if not _VALUE.match(value):
                raise exception.PrivilegedArgumentRefused(
                    f"mount option {item!r}: the value may hold letters, digits and ._:@%+- only"
                )
            if kind == "tmpfs" and key == "mode":
                try:
                    confine.directory_mode(int(value, 8))
                except (ValueError, exception.PrivilegedArgumentRefused) as exc:
                    raise exception.PrivilegedArgumentRefused(
                        f"mount option {item!r}: {exc}"
                    ) from None
        elif key not in flags:
            raise exception.PrivilegedArgumentRefused(
                f"mount option {key!r} is not allowed for {kind} (allowed flags: "
                f"{', '.join(sorted(flags))})"
            )
        checked.append(item)
    return checked


_PATH_DIR = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_UMOUNT_NOFOLLOW = 8
_libc = ctypes.CDLL(None, use_errno=True)


def _mnt_id(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    raise OSError("no mnt_id in fdinfo")


@contextlib.contextmanager
def _point(mountpoint: str, create: bool = False) -> Iterator[tuple[int, int, str]]:
    """(descriptor of the mount point's parent, of the mount point, its name)."""
    bases = settings().allowed_paths
    confine.split_under(mountpoint, bases, "mount point")  # inside a base, not a base itself
    # O_PATH: the mount daemon holds no DAC capability, and needs only search
    # permission on the way to act on a directory by descriptor.
    parent, name = confine.open_parent(mountpoint, bases, "mount point", _PATH_DIR)
    try:
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o755, dir_fd=parent)
        fd = confine.open_at(parent, name, _PATH_DIR, shown=mountpoint)
        try:
            yield parent, fd, name
        finally:
            os.close(fd)
    finally:
        os.close(parent)


def _mounted(parent: int, fd: int) -> bool:
    return _mnt_id(fd) != _mnt_id(parent)


def _check_mounted(mountpoint: str) -> bool:
    with _point(mountpoint) as (parent, fd, _name):
        return _mounted(parent, fd)


@entrypoint(sys_admin_pctxt)
def mount(fstype: str, share: str, mountpoint: str, options: list[str] | None = None) -> bool:
    """Mount ``share`` at ``mountpoint``; False if something was already mounted there.

    The mount point is created (0755) if missing and must lie strictly inside
    one of ``[privileged] allowed_paths``. A mount that fails leaves no mount
    point this call created behind.
    """
    kind = check_fstype(fstype)
    source = check_share(kind, share)
    checked = check_options(kind, options)
    s = settings()
    if runner.via_commands():
        target = confine.resolve_inside(mountpoint, s.allowed_paths, "mount point")
        if _mounted_at(target):
            return False
        runner.run(["mkdir", "-p", "-m", "755", "--", target], timeout=s.command_timeout)
        argv = ["mount", "-t", kind, *(["-o", ",".join(checked)] if checked else [])]
        runner.run([*argv, "--", source, target], timeout=s.command_timeout)
        return True
    with _point(mountpoint, create=True) as (parent, fd, name):
        if _mounted(parent, fd):
            return False
        argv = ["mount", "--no-canonicalize", "-t", kind]
        argv += ["-o", ",".join(checked)] if checked else []
        try:
            runner.run(
                [*argv, "--", source, f"/proc/self/fd/{fd}"],
                timeout=s.command_timeout,
                pass_fds=(fd,),
                shown=f"mount -t {kind} {source} {mountpoint}",
            )
        except BaseException:
            with contextlib.suppress(OSError):
                os.rmdir(name, dir_fd=parent)  # only if empty: ours, and nothing mounted
            raise
    return True


def _mounted_at(target: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and fields[4].replace("\\040", " ") == target:
                return True
    return False


@entrypoint(sys_admin_pctxt)
def umount(mountpoint: str) -> bool:
    """Unmount ``mountpoint``; False if nothing was mounted there."""
    s = settings()
    if runner.via_commands():
        target = confine.resolve_inside(mountpoint, s.allowed_paths, "mount point")
        if not _mounted_at(target):
            return False
        runner.run(["umount", "--", target], timeout=s.command_timeout)
        return True
    # The parent stays pinned and the name is looked up inside that very
    # directory, so a directory swapped on the way cannot redirect the unmount
    # (a directory that is a mount point cannot be renamed into it: EBUSY).
    # No command: umount(8) would look the mount up again by its absolute path.
    confine.split_under(mountpoint, s.allowed_paths, "mount point")  # not a base itself
    parent, name = confine.open_parent(mountpoint, s.allowed_paths, "mount point", _PATH_DIR)
    try:
        fd = confine.open_at(parent, name, _PATH_DIR, shown=mountpoint)
        try:
            mounted = _mounted(parent, fd)
        finally:
            os.close(fd)  # an open descriptor would keep the mount busy
        if not mounted:
            return False
        if _libc.umount2(f"/proc/self/fd/{parent}/{name}".encode(), _UMOUNT_NOFOLLOW) != 0:
            err = ctypes.get_errno()
            raise exception.PrivilegedCommandFailed(
                f"umount {mountpoint}", err, f"umount: {mountpoint}: {os.strerror(err)}"
            )
    finally:
        os.close(parent)
    return True


@entrypoint(sys_admin_pctxt)
def is_mounted(mountpoint: str) -> bool:
    """Whether something is mounted at ``mountpoint`` (as the daemon sees it)."""
    if runner.via_commands():
        return _mounted_at(confine.resolve_inside(mountpoint, settings().allowed_paths))
    try:
        return _check_mounted(mountpoint)
    except FileNotFoundError:
        return False


@entrypoint(sys_admin_pctxt)
def daemon_info() -> dict:
    """Pid, uid and effective capabilities of the mount daemon."""
    return process_info()


@entrypoint(sys_admin_pctxt)
def fence_extend(token: str, deadline: float) -> bool:
    """A confirmed lease renewal: let the fenced step ``token`` run until ``deadline``."""
    return fence.extend(str(token), float(deadline))


@entrypoint(sys_admin_pctxt)
def fence_abort(token: str) -> bool:
    """The lock was lost: end the fenced step ``token`` now."""
    return fence.abort(str(token))
