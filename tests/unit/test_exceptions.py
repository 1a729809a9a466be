"""Every error survives the privsep round trip: ``type(e)(*e.args)`` is the same error.

oslo.privsep sends an exception raised in the daemon as its class name and
``args`` and rebuilds it in the service with ``cls(*args)``; an error whose
``args`` are not its constructor's arguments arrived as a TypeError.
"""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import remotefs_aa
from remotefs_aa import exception
from remotefs_aa.drivers import mounted

SAMPLES: dict[type, tuple] = {
    exception.RemoteFSAAError: ("something failed",),
    exception.InvalidConfig: ("[privileged] mode", "fast", "not a mode"),
    exception.UsageError: ("lock check: --rounds must be at least 1",),
    exception.PluginNotFound: ("volume driver", "nfz", ["local", "nfs"], "typo?"),
    exception.PluginLoadFailed: ("could not import x",),
    exception.LockError: ("lock trouble",),
    exception.LockNameError: ("bad name",),
    exception.LockProviderNotStarted: (),
    exception.LockAcquireFailed: ("remotefs_aa-v1", "busy"),
    exception.LockTimeout: ("remotefs_aa-v1", "timed out after 3 s"),
    exception.LockBusy: ("remotefs_aa-v1", "held elsewhere"),
    exception.LockBackendUnavailable: ("remotefs_aa-v1", "redis down"),
    exception.LockProviderStartFailed: ("cannot reach redis",),
    exception.LeaseExpired: ("remotefs_aa-v1", "qemu_img_commit", "lease ran out 1.2 s ago"),
    exception.HostLocalLockProvider: ("cluster set, file locks",),
    exception.PrivilegedError: ("privileged trouble",),
    exception.PrivilegedArgumentRefused: ("path '/etc' lies outside",),
    exception.PrivilegedCommandFailed: ("qemu-img commit /x", 1, "boom"),
    exception.PrivilegedHelperUnavailable: ("sudo refused",),
    exception.PrivilegedDaemonLost: ("remotefs_aa_privsep_files", "end of file"),
    exception.VolumeError: ("volume trouble",),
    exception._FileRefused: ("/s/x", "refused"),
    exception.InvalidImage: ("/s/volume-1.s1", "it is encrypted"),
    exception.InvalidInfoFile: ("/s/volume-1.info", "not JSON"),
    exception.StaleInfoGeneration: ("/s/volume-1.info", 4, 5),
    exception.VolumeNotFound: ("no volume",),
    exception.InvalidVolume: ("volume id 'a/b' cannot name a file",),
    exception.SnapshotNotFound: ("no snapshot",),
    exception.InvalidSnapshot: ("not the latest",),
    exception.VolumeBusy: ("has snapshots",),
    exception.VolumeExists: ("already there",),
    exception.ImageRefused: ("img-1", "it has a backing file"),
    mounted.ShareMountFailed: ("h:/x", "/mnt/abc", ["-o vers=4.2: refused", "-o vers=4.1: no"]),
}


def _all_errors() -> set[type]:
    for module in pkgutil.walk_packages(remotefs_aa.__path__, "remotefs_aa."):
        if module.name.startswith("remotefs_aa.cmd"):
            continue
        importlib.import_module(module.name)
    found, todo = set(), [exception.RemoteFSAAError]
    while todo:
        cls = todo.pop()
        found.add(cls)
        todo.extend(cls.__subclasses__())
    return found


def test_every_error_class_has_a_sample():
    assert _all_errors() - set(SAMPLES) == set(), "add a sample for each new error class"


@pytest.mark.parametrize("cls", list(SAMPLES), ids=lambda c: c.__name__)
def test_rebuilt_from_args_it_is_the_same_error(cls):
    original = cls(*SAMPLES[cls])
    rebuilt = type(original)(*original.args)
    assert type(rebuilt) is cls
    assert str(rebuilt) == str(original)
    assert vars(rebuilt) == vars(original)
    assert str(original) and not str(original).startswith("(")  # a sentence, not a tuple
