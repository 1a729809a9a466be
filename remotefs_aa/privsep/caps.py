"""What a privileged daemon's children may inherit: bounding set, securebits, no_new_privs.

Why this exists: oslo.privsep drops the *daemon's* capabilities to its
context's set, but an ``execve`` by uid 0 refills the permitted set from the
bounding set (root's "all file capabilities" rule), so a qemu-img started by
the file daemon used to run with every capability (CapEff 000001fffeffffff).
:func:`harden` closes that before the daemon starts serving, while the helper
still holds every capability (changing the bounding set and the securebits
needs CAP_SETPCAP, which the daemon then drops):

* the bounding set keeps only the context's capabilities, so no exec can ever
  gain another one;
* ``SECBIT_NOROOT`` (locked): exec by uid 0 no longer grants capabilities;
  ``SECBIT_NO_SETUID_FIXUP`` (locked): a uid change neither adds nor drops any;
* ``PR_SET_NO_NEW_PRIVS``: setuid binaries and file capabilities grant nothing.

A child then starts with no capability at all, unless the daemon raises one
into its ambient set on purpose (:func:`ambient_for_children`): the mount
daemon does, with CAP_SYS_ADMIN, because mount(8) and the FUSE client must
call mount(2); the file daemon never does (its qemu-img children need no
capability: they open only descriptors the daemon passes them).
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Iterable

from oslo_privsep import capabilities

_libc = ctypes.CDLL(None, use_errno=True)

PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_GET_SECUREBITS = 27
PR_SET_SECUREBITS = 28
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4

SECBIT_NOROOT = 1 << 0
SECBIT_NOROOT_LOCKED = 1 << 1
SECBIT_NO_SETUID_FIXUP = 1 << 2
SECBIT_NO_SETUID_FIXUP_LOCKED = 1 << 3
SECBIT_NO_CAP_AMBIENT_RAISE = 1 << 6
SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED = 1 << 7

_local = threading.local()


def _prctl(option: int, arg2: int = 0, arg3: int = 0) -> int:
    rc = _libc.prctl(
        ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), ctypes.c_ulong(0),
        ctypes.c_ulong(0),
    )  # fmt: skip
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}, {arg2}) failed: {os.strerror(err)}")
    return rc


def last_cap() -> int:
    """The highest capability number this kernel knows."""
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


def harden(keep: Iterable[int], allow_ambient: bool) -> None:
    """Limit what any later exec of this process (and its children) can hold.

    Call while holding CAP_SETPCAP (the helper, before the daemon drops its
    privileges). ``keep``: the context's capabilities, the only ones left in
    the bounding set. ``allow_ambient``: whether the daemon may still hand
    its children one of them through the ambient set (the mount daemon).
    """
    wanted = set(keep)
    for cap in range(last_cap() + 1):
        if cap not in wanted and _prctl(PR_CAPBSET_READ, cap) == 1:
            _prctl(PR_CAPBSET_DROP, cap)
    bits = (
        SECBIT_NOROOT
        | SECBIT_NOROOT_LOCKED
        | SECBIT_NO_SETUID_FIXUP
        | SECBIT_NO_SETUID_FIXUP_LOCKED
    )
    if not allow_ambient:
        bits |= SECBIT_NO_CAP_AMBIENT_RAISE | SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED
    # KEEP_CAPS stays unlocked: oslo.privsep sets it around its setuid.
    _prctl(PR_SET_SECUREBITS, _prctl(PR_GET_SECUREBITS) | bits)
    _prctl(PR_SET_NO_NEW_PRIVS, 1)


def ambient_for_children(caps: Iterable[int]) -> None:
    """Let children this *thread* starts hold exactly ``caps`` (ambient set).

    Capabilities are per thread and a child inherits those of the thread
    that forks it, so each worker thread of the daemon does this once before
    its first command. ``caps`` must be in the thread's permitted set.
    """
    wanted = sorted(set(caps))
    if getattr(_local, "ambient", None) == wanted:
        return
    effective, permitted, _inheritable = capabilities.get_caps()
    capabilities.drop_all_caps_except(effective, permitted, wanted)
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    for cap in wanted:
        _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap)
    _local.ambient = wanted


def process_status(pid: int | str = "self") -> dict[str, str]:
    """Uid, capability masks and NoNewPrivs of a process, from /proc/<pid>/status."""
    wanted = ("Uid", "Gid", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs")
    found: dict[str, str] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in wanted:
                found[key] = value.strip()
    return found
