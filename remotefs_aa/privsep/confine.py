"""Argument checks every privileged entrypoint runs before touching anything.

These run *inside* the privileged daemon, on values an unprivileged caller
sent, so they trust nothing. A path must lie under a configured base and is
*opened*, not resolved: :func:`open_beneath` refuses ``..`` and follows no
symlink below ``/`` (``openat2`` with RESOLVE_NO_SYMLINKS, or a component
walk with ``O_NOFOLLOW`` on kernels without it), and the entrypoints then act
on the descriptor. Modes, names, sizes and formats are checked here too;
mount arguments in ``mount.py``. Each refusal names the argument and the rule.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import re
import stat
from collections.abc import Iterable

from remotefs_aa import exception

_FORMATS = frozenset({"raw", "qcow2"})


# openat2(2) (Linux >= 5.6): resolve a path refusing every symlink on the way,
# in one system call, so nothing can be swapped between the check and the use.
_SYS_OPENAT2 = 437
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_libc = ctypes.CDLL(None, use_errno=True)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


#: None: not tried yet; False: the kernel has no openat2 (component walk instead).
_have_openat2: bool | None = None

#: Flags for a directory an entrypoint works in (read it, fsync it, *at calls).
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _openat2(path: str, flags: int, mode: int) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, mode, _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS)
    fd = _libc.syscall(
        ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(-100), os.fsencode(path),  # AT_FDCWD
        ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)),
    )  # fmt: skip
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return fd


def _walk(path: str, flags: int, mode: int) -> int:
    """openat2's guarantee without it: one component at a time, never following a link."""
    parts = [p for p in path.split("/") if p]
    current = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i, part in enumerate(parts[:-1]):
            try:
                nxt = os.open(
                    part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=current
                )
            except NotADirectoryError:
                if stat.S_ISLNK(os.stat(part, dir_fd=current, follow_symlinks=False).st_mode):
                    link = "/" + "/".join(parts[: i + 1])
                    raise OSError(errno.ELOOP, "a symbolic link", link) from None
                raise
            os.close(current)
            current = nxt
        if not parts:
            return os.open("/", flags | os.O_CLOEXEC)
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=current)
    finally:
        os.close(current)


def _open_no_symlinks(path: str, flags: int, mode: int) -> int:
    global _have_openat2
    if _have_openat2 is not False:
        try:
            fd = _openat2(path, flags, mode)
            _have_openat2 = True
            return fd
        except OSError as exc:
            if exc.errno != errno.ENOSYS:
                raise
            _have_openat2 = False
    return _walk(path, flags, mode)


def _checked_path(path: object, what: str) -> str:
    if not isinstance(path, str) or not path:
        raise exception.PrivilegedArgumentRefused(f"{what} must be a non-empty string")
    if "\x00" in path:
        raise exception.PrivilegedArgumentRefused(f"{what} contains a NUL byte")
    if not os.path.isabs(path):
        raise exception.PrivilegedArgumentRefused(f"{what} {path!r} is not an absolute path")
    if ".." in path.split("/"):
        raise exception.PrivilegedArgumentRefused(f"{what} {path!r} contains '..'")
    return os.path.normpath(path)


@functools.lru_cache(maxsize=64)
def _base_forms(base: str) -> tuple[str, str]:
    """A base as configured (normalised) and its real path, resolved once per daemon."""
    return os.path.normpath(base), os.path.realpath(base)


def split_under(
    path: str, bases: Iterable[str], what: str = "path", allow_base: bool = False
) -> tuple[str, list[str]]:
    """(the real path of ``path``'s allowed base, the components below it), or refuse.

    Bases are what root configured, so symlinks in a base's own path are
    resolved once, here; below the base nothing is resolved: the opening
    itself refuses every symlink.
    """
    checked = _checked_path(path, what)
    seen = []
    for base in bases:
        if not base:
            continue
        given, real = _base_forms(base)
        seen.append(real)
        for prefix in (given, real):
            if not (checked == prefix or checked.startswith(prefix.rstrip("/") + "/")):
                continue
            rest = [p for p in checked[len(prefix) :].split("/") if p]
            if not rest and not allow_base:
                raise exception.PrivilegedArgumentRefused(
                    f"{what} {path!r} is an allowed base directory itself, not a path inside one"
                )
            return real, rest
    raise exception.PrivilegedArgumentRefused(
        f"{what} {path!r} lies outside the allowed directories "
        f"({', '.join(seen) or 'none configured'}); set [privileged] allowed_paths"
    )


def _under(path: str, bases: Iterable[str], what: str, allow_base: bool) -> str:
    base, rest = split_under(path, bases, what, allow_base)
    return os.path.join(base, *rest)


def open_beneath(
    path: str,
    bases: Iterable[str],
    what: str = "path",
    flags: int = os.O_RDONLY,
    mode: int = 0,
    allow_base: bool = False,
) -> int:
    """Open ``path``, which must lie under one of ``bases``; a descriptor, or refuse.

    Every component below ``/`` is resolved without following a symlink
    (``openat2`` with RESOLVE_NO_SYMLINKS, or a component walk with
    ``O_NOFOLLOW``), so a directory swapped for a link to /etc between a
    check and a use cannot redirect root: there is no separate check. The
    entrypoints then act on the descriptor (``*at`` calls, ``/proc/self/fd``
    paths for child commands). A link is refused with an error naming it.
    """
    target = _under(path, bases, what, allow_base)
    try:
        return _open_no_symlinks(target, flags, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise exception.PrivilegedArgumentRefused(
                f"{what} {path!r} has a symbolic link in it; refusing to follow it "
                f"(privileged operations never follow links below /)"
            ) from None
        raise


def open_at(dirfd: int, name: str, flags: int, mode: int = 0, shown: str | None = None) -> int:
    """``openat(dirfd, name, flags | O_NOFOLLOW)``; a symbolic link is a clear refusal.

    ``shown``: the path to name in the refusal (default: ``name``).
    """
    try:
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dirfd)
    except OSError as exc:
        link = exc.errno == errno.ELOOP
        if exc.errno == errno.ENOTDIR and flags & os.O_DIRECTORY:
            # O_DIRECTORY | O_NOFOLLOW on a link reports ENOTDIR; say which it was.
            with contextlib.suppress(OSError):
                link = stat.S_ISLNK(os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode)
        if link:
            raise exception.PrivilegedArgumentRefused(
                f"{shown or name!r} is a symbolic link; privileged operations never follow one"
            ) from None
        raise


def open_parent(
    path: str, bases: Iterable[str], what: str = "path", flags: int = DIR_FLAGS
) -> tuple[int, str]:
    """A descriptor of ``path``'s directory (opened as :func:`open_beneath`) and its name.

    The name is one plain component: every ``*at`` call on it acts inside
    that very directory, whatever is renamed around it meanwhile.
    """
    split_under(path, bases, what)  # refusals name the path itself, not its directory
    checked = os.path.normpath(path)
    name = os.path.basename(checked)
    fd = open_beneath(
        os.path.dirname(checked), bases, f"directory of {what}", flags, allow_base=True
    )
    return fd, name


def resolve(path: str, bases: Iterable[str], what: str = "path") -> str:
    """The real path of ``path`` if it lies under one of ``bases`` (the rootwrap modes).

    Only for the legacy rootwrap modes, whose commands take paths: the check
    and the use are two steps there, which is why those modes trust the
    service user (see doc/architecture.md). The daemon uses
    :func:`open_beneath`.
    """
    checked = _checked_path(path, what)
    real = os.path.realpath(checked)
    for base in (os.path.realpath(b) for b in bases if b):
        if real == base or real.startswith(base.rstrip("/") + "/"):
            return real
    raise exception.PrivilegedArgumentRefused(
        f"{what} {path!r} resolves to {real!r}, outside the allowed directories; "
        f"set [privileged] allowed_paths"
    )


def resolve_inside(path: str, bases: Iterable[str], what: str = "path") -> str:
    """Like :func:`resolve`, but the base directory itself is refused."""
    real = resolve(path, bases, what)
    if real in {os.path.realpath(b) for b in bases if b}:
        raise exception.PrivilegedArgumentRefused(
            f"{what} {path!r} is an allowed base directory itself, not a path inside one"
        )
    return real


def image_format(value: str) -> str:
    """Only raw and qcow2 images are ever created or trusted."""
    if value not in _FORMATS:
        raise exception.PrivilegedArgumentRefused(
            f"image format {value!r} is not one of raw, qcow2"
        )
    return value


def positive_int(value: object, what: str) -> int:
    """A strictly positive integer (sizes, ids)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise exception.PrivilegedArgumentRefused(
            f"{what} must be a positive integer, not {value!r}"
        )
    return value


def _bits(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o777:
        raise exception.PrivilegedArgumentRefused(
            f"{what} mode {value!r} must be permission bits between 0 and 0o777 "
            f"(no setuid, setgid or sticky bit)"
        )
    return value


def file_mode(value: object) -> int:
    """A volume file's mode: permission bits, never executable."""
    bits = _bits(value, "file")
    if bits & 0o111:
        raise exception.PrivilegedArgumentRefused(f"file mode {bits:#o} is executable; refused")
    return bits


def directory_mode(value: object) -> int:
    """A directory's mode: permission bits, never writable by everyone."""
    bits = _bits(value, "directory")
    if bits & 0o002:
        raise exception.PrivilegedArgumentRefused(
            f"directory mode {bits:#o} is world-writable; refused (anyone could then "
            f"replace the volumes in it)"
        )
    return bits


_PLAIN = re.compile(r"^[A-Za-z0-9_.+-]+\Z")


def plain_name(value: object, what: str = "name") -> str:
    """One file name in a directory: no path, no NUL, not ``.``/``..``, no leading '-'."""
    if (
        not isinstance(value, str)
        or not _PLAIN.match(value)
        or value in (".", "..")
        or value.startswith("-")
    ):
        raise exception.PrivilegedArgumentRefused(f"{what} {value!r} is not a plain file name")
    return value


_CONVERSION = re.compile(r"^(?:image|upload)-[A-Za-z0-9][A-Za-z0-9_-]{0,127}\.[0-9]+\.[0-9]+\Z")


def is_conversion_name(name: str) -> bool:
    """Whether ``name`` is one the drivers give files in ``image_conversion_dir``."""
    return bool(_CONVERSION.match(name))


def root_controlled(path: str, owner: int = 0) -> None:
    """Refuse ``path`` unless only root (or ``owner``) can change it or where it resolves.

    The privileged daemon takes ``[privileged] allowed_paths`` and the limits
    from the config files named on its command line; a service that could
    edit one of them could widen what runs as root. So the file and every
    directory above it must belong to root and be writable by nobody else
    (a sticky directory such as /tmp is fine: others cannot replace what root
    owns in it).
    """
    real = os.path.realpath(path)
    current = real
    while True:
        try:
            st = os.stat(current)
        except OSError as exc:
            raise exception.PrivilegedArgumentRefused(
                f"config {path!r}: cannot check {current}: {exc.strerror}"
            ) from None
        is_dir = current != real or os.path.isdir(current)
        sticky = is_dir and st.st_mode & 0o1000
        foreign = st.st_uid not in (0, owner)
        if foreign or (st.st_mode & 0o022 and not sticky):
            raise exception.PrivilegedArgumentRefused(
                f"refusing config {path!r}: {current} is "
                + (f"owned by uid {st.st_uid}" if foreign else "group/world-writable")
                + ". The privileged daemon reads [privileged] allowed_paths from it, so only "
                "root may be able to change it: chown root:root and chmod go-w every part "
                "(e.g. keep it in /etc/remotefs_aa)"
            )
        if current == "/":
            return
        current = os.path.dirname(current)
