"""Shares of the NFS and GlusterFS drivers: Cinder's shares-file format, checked.

A shares file has one share per line, ``host:/export [-o option,option]``;
blank lines and lines starting with ``#`` are skipped. Instead of a file, an
NFS service may set ``nas_host`` and ``nas_share_path`` (one share, options
from ``nas_mount_options``). Every bad line is refused at start with an error
naming the file, the line number and what is wrong, before anything mounts.
"""

from __future__ import annotations

import dataclasses
import re
import shlex

from remotefs_aa import exception

# host:/path for NFS (host may be a bracketed IPv6 address); GlusterFS also
# accepts host:volume. No whitespace, no leading '-'.
_HOST = r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_][A-Za-z0-9_.-]*)"
_ADDRESS = {
    "nfs": re.compile(rf"^{_HOST}:/[A-Za-z0-9_./+@%-]*$"),
    "glusterfs": re.compile(rf"^{_HOST}:/?[A-Za-z0-9_.+@%-][A-Za-z0-9_./+@%-]*$"),
}
_OPTION = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.:/+@%-]*(=[A-Za-z0-9_.:/+@%-]*)?$")
_FORBIDDEN = frozenset({"helper", "uhelper", "exec_helper", "X-mount.mkdir"})


@dataclasses.dataclass(frozen=True)
class Share:
    """One share: its address (``host:/export``) and its own mount options."""

    address: str
    options: tuple[str, ...] = ()

    def __str__(self) -> str:
        return self.address


def check_options(text: str | None, where: str) -> tuple[str, ...]:
    """Comma-separated mount options; refuse anything that could inject an option."""
    if not text:
        return ()
    options = tuple(o.strip() for o in text.split(",") if o.strip())
    for option in options:
        if not _OPTION.match(option) or option.split("=", 1)[0] in _FORBIDDEN:
            raise exception.InvalidConfig(
                where, text, f"mount option {option!r} is not allowed (name[=value] only)"
            )
    return options


def parse_line(line: str, kind: str, where: str) -> Share | None:
    """One line of a shares file; None for blanks and comments."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise exception.InvalidConfig(where, text, f"cannot be parsed ({exc})") from None
    address, rest = words[0], words[1:]
    if not _ADDRESS[kind].match(address):
        example = "host:/export" if kind == "nfs" else "host:/volume"
        raise exception.InvalidConfig(
            where, text, f"share {address!r} is not of the form {example}"
        )
    options: tuple[str, ...] = ()
    while rest:
        flag = rest.pop(0)
        if flag != "-o" or not rest:
            raise exception.InvalidConfig(
                where, text, f"unexpected {flag!r}: only '-o option,option' may follow the share"
            )
        options += check_options(rest.pop(0), where)
    return Share(address, options)


def parse_shares_file(path: str, kind: str) -> list[Share]:
    """Every share in ``path``; InvalidConfig naming the line of the first bad one."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise exception.InvalidConfig(
            f"{kind}_shares_config", path, f"cannot be read ({exc.strerror})"
        ) from None
    shares: list[Share] = []
    seen: set[str] = set()
    for number, line in enumerate(lines, 1):
        where = f"{path} line {number}"
        share = parse_line(line, kind, where)
        if share is None:
            continue
        if share.address in seen:
            raise exception.InvalidConfig(where, line.strip(), "share listed twice")
        seen.add(share.address)
        shares.append(share)
    if not shares:
        raise exception.InvalidConfig(f"{kind}_shares_config", path, "lists no share")
    return shares
