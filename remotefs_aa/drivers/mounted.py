"""Drivers whose shares are mounted: the common part of NFS and GlusterFS.

* Mount points are os-brick's: ``<mount base>/<md5 of the share>``
  (``RemoteFsClient.get_mount_point``), so a compute host's os-brick connector
  finds the very directory this service uses.
* Mounting goes through the privileged daemon (``privsep.mount``), under a
  per-share lock (``mount-<host>-<hash>``, the host without Cinder's
  ``@backend``: two drivers on one host never race, other hosts are not held
  up). An existing mount is reused. Each attempt tries
  the option variants of the filesystem (NFS: 4.2, 4.1, then the default,
  unless the options pin a version); ``*_mount_attempts`` rounds are made,
  with a short back-off. A share that will not mount raises ShareMountFailed
  naming the share, the mount point and every error, and leaves no mount
  point directory behind.
* ``nas_secure_file_permissions`` / ``nas_secure_file_operations``, with
  Cinder's 'auto' (decided once per share and remembered in the share's
  ``.remotefs_aaSecureEnvIndicator`` file: 'true' on a share with no volume
  yet, 'false' on one that already has volumes; a share Cinder's own NFS
  driver used keeps the decision in its ``.cinderSecureEnvIndicator``).
* Connection info as Cinder's NFS driver returns it, which os-brick's
  connectors mount: ``options`` are mount *flags* (``-o a,b``) and
  ``mount_point_base`` (next to ``data``) is this service's mount base.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from remotefs_aa import coordination, exception
from remotefs_aa.drivers import shares as shares_mod
from remotefs_aa.drivers.remotefs import RemoteFSDriver

LOG = logging.getLogger(__name__)

SECURE_INDICATOR = ".remotefs_aaSecureEnvIndicator"
#: Where Cinder's own NFS driver remembers its 'auto' decision for a share.
CINDER_SECURE_INDICATOR = ".cinderSecureEnvIndicator"


class ShareMountFailed(exception.VolumeError):
    """A share could not be mounted; nothing was left mounted or created."""

    def __init__(self, share: str, mountpoint: str, errors: list[str]) -> None:
        super().__init__(share, mountpoint, list(errors))
        self.share = share
        self.mountpoint = mountpoint
        self.errors = errors

    def message(self) -> str:
        detail = "; ".join(self.errors[-3:])
        return (
            f"could not mount share {self.share} at {self.mountpoint} after "
            f"{len(self.errors)} attempt(s): {detail}. Check that the server exports it to "
            f"this host and that the mount options are right"
        )


class MountedShareDriver(RemoteFSDriver):
    """Shares from a Cinder-style shares file, mounted under a mount point base."""

    # driver_name ('nfs' or 'glusterfs') is also the shares-file syntax, the
    # filesystem type given to mount and os-brick's mount type.

    def __init__(self, conf: Any, host: str | None = None, io: Any = None) -> None:
        super().__init__(conf, host, io)
        self._share_info: dict[str, shares_mod.Share] = {}
        self._client: Any = None
        self._secure: dict[str, tuple[bool, bool]] = {}
        self._in_process: Any = None

    # -- shares -----------------------------------------------------------------

    def load_shares(self) -> list[str]:
        found = self._configured_shares()
        self._share_info = {s.address: s for s in found}
        return [s.address for s in found]

    def _configured_shares(self) -> list[shares_mod.Share]:
        return shares_mod.parse_shares_file(self.option("shares_config"), self.driver_name)

    @property
    def mount_base(self) -> str:
        return self.option("mount_point_base")

    def _os_brick(self) -> Any:
        if self._client is None:
            from os_brick.remotefs import remotefs

            self._client = remotefs.RemoteFsClient(
                self.driver_name,
                None,
                **{f"{self.driver_name}_mount_point_base": self.mount_base},
            )
        return self._client

    def share_path(self, share: str) -> str:
        return self._os_brick().get_mount_point(share)

    def common_mount_options(self) -> tuple[str, ...]:
        """The options every share of this driver is mounted with."""
        return shares_mod.check_options(
            self.option("mount_options"), self.where(f"{self.driver_name}_mount_options")
        )

    def mount_options(self, share: str) -> list[str]:
        """The service-wide options, then the share's own (later ones win in mount)."""
        info = self._share_info.get(share)
        return [*self.common_mount_options(), *(info.options if info else ())]

    def share_options(self, share: str) -> str | None:
        """Mount flags for os-brick (``-o a,b``): it passes them to mount(8) as they are."""
        options = self.mount_options(share)
        return "-o " + ",".join(options) if options else None

    def _connection(self, share: str, name: str, fmt: str) -> dict:
        info = super()._connection(share, name, fmt)
        # os-brick's connector takes its mount base from here unless the
        # compute host configures its own (Nova does); Cinder returns its own.
        info["mount_point_base"] = os.path.realpath(self.mount_base)
        return info

    def option_variants(self, share: str) -> list[list[str]]:
        """The option lists to try in order, for one mount attempt."""
        return [self.mount_options(share)]

    # -- mounting ---------------------------------------------------------------

    def ensure_share_ready(self, share: str) -> None:
        from remotefs_aa.privsep import mount

        mountpoint = self.share_path(share)
        with coordination.locked(self._mount_lock(mountpoint), purpose=f"mount {share}"):
            if mount.is_mounted(mountpoint):
                LOG.info("share %s: already mounted at %s, reused", share, mountpoint)
            else:
                self._mount(share, mountpoint)
        self._decide_secure(share)

    def _mount_lock(self, mountpoint: str) -> str:
        # Mounts are per machine: Cinder's host is "host@backend", and two
        # backends of one machine on one share must not race each other.
        machine = self.host.partition("@")[0]
        return f"mount-{machine}-{os.path.basename(mountpoint)}"

    def _mount(self, share: str, mountpoint: str) -> None:
        from remotefs_aa.privsep import files, mount

        # The mount point is made by the file daemon (as this service's user):
        # the mount daemon holds CAP_SYS_ADMIN only and may not write in a
        # directory the service owns, such as its state_path.
        files.make_directory(mountpoint, 0o755)
        errors: list[str] = []
        attempts = max(1, int(self.option("mount_attempts")))
        for attempt in range(1, attempts + 1):
            for options in self.option_variants(share):
                shown = ",".join(options) or "(no options)"
                try:
                    started = time.monotonic()
                    mount.mount(self.driver_name, share, mountpoint, options)
                    LOG.info(
                        "share %s: mounted at %s with %s in %.0f ms (attempt %d)",
                        share,
                        mountpoint,
                        shown,
                        (time.monotonic() - started) * 1000,
                        attempt,
                    )
                    return
                except exception.PrivilegedCommandFailed as exc:
                    reason = (exc.stderr or str(exc)).strip().splitlines()
                    errors.append(f"-o {shown}: {reason[-1] if reason else exc}")
                    LOG.warning("share %s: mount with %s failed: %s", share, shown, errors[-1])
            if attempt < attempts:
                time.sleep(min(0.5 * attempt, 3.0))
        raise ShareMountFailed(share, mountpoint, errors)

    def unmount_shares(self) -> None:
        """Unmount every configured share this host has mounted (operators, tests)."""
        from remotefs_aa.privsep import mount

        self.close()  # leave the shares (this service's records there) while they are mounted
        for share in self._shares:
            mountpoint = self.share_path(share)
            with coordination.locked(self._mount_lock(mountpoint), purpose=f"unmount {share}"):
                mount.umount(mountpoint)

    def do_setup(self, context: Any = None) -> None:
        self._check_mount_base()  # before anything is mounted
        super().do_setup(context)

    def check_for_setup_error(self) -> None:
        self._check_mount_base()
        super().check_for_setup_error()

    def _check_mount_base(self) -> None:
        if not self.daemon_may_act_in(self.mount_base):
            raise exception.InvalidConfig(
                self.where(f"{self.driver_name}_mount_point_base"),
                self.mount_base,
                f"must lie inside [privileged] allowed_paths ({self.allowed_paths_text()}): "
                f"the privileged daemon mounts only there",
            )

    # -- secure file operations ------------------------------------------------------

    def _decide_secure(self, share: str) -> None:
        """Resolve 'auto' for nas_secure_file_operations / _permissions on ``share``."""
        ops = str(self.conf.nas_secure_file_operations).strip().lower()
        perms = str(self.conf.nas_secure_file_permissions).strip().lower()
        if "auto" in (ops, perms):
            path = self.share_path(share)
            indicator = os.path.join(path, SECURE_INDICATOR)
            text = self.io.read_text(indicator)
            cinders = os.path.join(path, CINDER_SECURE_INDICATOR)
            if text is None and self.io.read_text(cinders) is not None:
                # A share Cinder's NFS driver made secure: its file says so by existing.
                text = "true"
            if text is None:
                files = self.io.list_directory(path)
                fresh = not any(n.startswith("volume-") for n in files)
                text = "true" if fresh else "false"
                self.io.replace_text_if(indicator, text + "\n", None)
                LOG.info(
                    "share %s: secure file operations/permissions 'auto' decided %s (%s share)",
                    share,
                    text,
                    "new" if fresh else "existing",
                )
            auto = text.strip() == "true"
            ops = str(auto).lower() if ops == "auto" else ops
            perms = str(auto).lower() if perms == "auto" else perms
        self._secure[share] = (ops == "true", perms == "true")

    def secure(self, share: str) -> tuple[bool, bool]:
        """(secure file operations, secure file permissions) for ``share``."""
        return self._secure.get(share, (False, False))

    def file_mode(self, share: str) -> int:
        """Mode of new volume files: 0660 with secure permissions, else 0666 (Cinder)."""
        return 0o660 if self.secure(share)[1] else 0o666

    def io_for(self, share: str) -> Any:
        """In-process file operations on shares with secure file operations."""
        if not self.secure(share)[0]:
            return self.io
        if self._in_process is None:
            from remotefs_aa.image.chain import InProcessIO

            self._in_process = InProcessIO(self.conf)
        return self._in_process
