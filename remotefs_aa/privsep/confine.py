"""Argument checks every privileged entrypoint runs before touching anything.

These run *inside* the privileged daemon, on values an unprivileged caller
sent, so they trust nothing: paths are resolved (symlinks, ``..``) and must
lie under a configured base; share strings and mount options may not smuggle
in extra command-line options. Each refusal names the argument and the rule.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

from remotefs_aa import exception

# host:/export (NFS, GlusterFS volume as host:/vol or host:vol), or an absolute
# directory for the local driver / bind mounts. No whitespace, no leading '-'.
_SHARE_RE = re.compile(r"^(?:[A-Za-z0-9_.\[\]:%-]+:/?[A-Za-z0-9_./+@%-]*|/[A-Za-z0-9_./+@%-]*)$")
_OPTION_RE = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.:/+@%-]*(=[A-Za-z0-9_.:/+@%,-]*)?$")
_FSTYPES = frozenset({"nfs", "nfs4", "glusterfs", "tmpfs", "none", "fuse.glusterfs"})
# Mount options that would let a caller run code or reach other files as root.
_FORBIDDEN_OPTIONS = frozenset({"helper", "uhelper", "exec_helper", "X-mount.mkdir"})
_FORMATS = frozenset({"raw", "qcow2"})


def resolve(path: str, bases: Iterable[str], what: str = "path") -> str:
    """The real path of ``path`` if it lies under one of ``bases``; else refuse.

    The path need not exist yet (a file about to be created): its deepest
    existing ancestor is resolved, so a symlinked directory cannot point the
    new file outside the base.
    """
    if not isinstance(path, str) or not path:
        raise exception.PrivilegedArgumentRefused(f"{what} must be a non-empty string")
    if "\x00" in path:
        raise exception.PrivilegedArgumentRefused(f"{what} contains a NUL byte")
    if not os.path.isabs(path):
        raise exception.PrivilegedArgumentRefused(f"{what} {path!r} is not an absolute path")
    real = os.path.realpath(path)
    real_bases = [os.path.realpath(b) for b in bases if b]
    for base in real_bases:
        if real == base or real.startswith(base.rstrip("/") + "/"):
            return real
    raise exception.PrivilegedArgumentRefused(
        f"{what} {path!r} resolves to {real!r}, outside the allowed directories "
        f"({', '.join(real_bases) or 'none configured'}); set [privileged] allowed_paths"
    )


def resolve_inside(path: str, bases: Iterable[str], what: str = "path") -> str:
    """Like :func:`resolve`, but the base directory itself is refused."""
    real = resolve(path, bases, what)
    if real in {os.path.realpath(b) for b in bases if b}:
        raise exception.PrivilegedArgumentRefused(
            f"{what} {path!r} is an allowed base directory itself, not a path inside one"
        )
    return real


def share(value: str) -> str:
    """A share string: ``host:/export``, ``host:volume`` or an absolute path."""
    if not isinstance(value, str) or not _SHARE_RE.match(value) or value.startswith("-"):
        raise exception.PrivilegedArgumentRefused(
            f"share {value!r} is not of the form host:/export or /absolute/path "
            f"(letters, digits and ._-/:@%+ only)"
        )
    if ".." in value.split("/"):
        raise exception.PrivilegedArgumentRefused(f"share {value!r} contains '..'")
    return value


def fstype(value: str) -> str:
    """One of the filesystem types the drivers mount."""
    if value not in _FSTYPES:
        raise exception.PrivilegedArgumentRefused(
            f"filesystem type {value!r} is not one of {', '.join(sorted(_FSTYPES))}"
        )
    return value


def mount_options(options: Iterable[str] | str | None) -> list[str]:
    """Mount options as a list of ``key`` / ``key=value`` items, checked one by one."""
    if options is None:
        return []
    items = options.split(",") if isinstance(options, str) else list(options)
    checked = []
    for item in items:
        item = item.strip() if isinstance(item, str) else item
        if not item:
            continue
        if not isinstance(item, str) or not _OPTION_RE.match(item):
            raise exception.PrivilegedArgumentRefused(
                f"mount option {item!r} is not a plain key or key=value (no spaces, no leading '-')"
            )
        if item.split("=", 1)[0] in _FORBIDDEN_OPTIONS:
            raise exception.PrivilegedArgumentRefused(f"mount option {item!r} is not allowed")
        checked.append(item)
    return checked


def image_format(value: str) -> str:
    """Only raw and qcow2 images are ever created or trusted."""
    if value not in _FORMATS:
        raise exception.PrivilegedArgumentRefused(
            f"image format {value!r} is not one of raw, qcow2"
        )
    return value


def backing_name(value: str) -> str:
    """A backing-file name relative to the overlay: one plain file name."""
    if (
        not isinstance(value, str)
        or not value
        or "/" in value
        or value.startswith(("-", "."))
        or not re.match(r"^[A-Za-z0-9_.+-]+$", value)
    ):
        raise exception.PrivilegedArgumentRefused(
            f"backing file {value!r} must be a plain file name in the same directory"
        )
    return value


def positive_int(value: object, what: str) -> int:
    """A strictly positive integer (sizes, ids)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise exception.PrivilegedArgumentRefused(
            f"{what} must be a positive integer, not {value!r}"
        )
    return value


def mode_bits(value: object) -> int:
    """File permission bits; setuid, setgid and sticky are refused."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o777:
        raise exception.PrivilegedArgumentRefused(
            f"mode {value!r} must be permission bits between 0 and 0o777"
        )
    return value


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
