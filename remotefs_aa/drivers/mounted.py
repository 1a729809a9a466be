"""Drivers whose shares are mounted: the common part of NFS and GlusterFS.

* Mount points are os-brick's: ``<mount base>/<md5 of the share>``
  (``RemoteFsClient.get_mount_point``), so a compute host's os-brick connector
  finds the very directory this service uses.
* Mounting goes through the privileged daemon (``privsep.mount``), under a
  per-share lock (``mount-<host>-<hash>``: two drivers on one host never race,
  other hosts are not held up). An existing mount is reused. Each attempt tries
  the option variants of the filesystem (NFS: 4.2, 4.1, then the default,
  unless the options pin a version); ``*_mount_attempts`` rounds are made,
  with a short back-off. A share that will not mount raises ShareMountFailed
  naming the share, the mount point and every error, and leaves no mount
  point directory behind.
* ``nas_secure_file_permissions`` / ``nas_secure_file_operations``, with
  Cinder's 'auto' (decided once per share and remembered in the share's
  ``.remotefs_aaSecureEnvIndicator`` file: 'true' on a share with no volume
  yet, 'false' on one that already has volumes).
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

    def mount_options(self, share: str) -> list[str]:
        """The service-wide options, then the share's own (later ones win in mount)."""
        common = shares_mod.check_options(
            self.option("mount_options"), f"[DEFAULT] {self.driver_name}_mount_options"
        )
        info = self._share_info.get(share)
        return [*common, *(info.options if info else ())]

    def share_options(self, share: str) -> str | None:
        options = self.mount_options(share)
        return ",".join(options) if options else None

    def option_variants(self, share: str) -> list[list[str]]:
        """The option lists to try in order, for one mount attempt."""
        return [self.mount_options(share)]

    # -- mounting ---------------------------------------------------------------

    def ensure_share_ready(self, share: str) -> None:
        from remotefs_aa.privsep import mount

        mountpoint = self.share_path(share)
        name = f"mount-{self.host}-{os.path.basename(mountpoint)}"
        with coordination.locked(name, purpose=f"mount {share}"):
            if mount.is_mounted(mountpoint):
                LOG.info("share %s: already mounted at %s, reused", share, mountpoint)
            else:
                self._mount(share, mountpoint)
        self._decide_secure(share)

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
            name = f"mount-{self.host}-{os.path.basename(mountpoint)}"
            with coordination.locked(name, purpose=f"unmount {share}"):
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
                f"[DEFAULT] {self.driver_name}_mount_point_base",
                self.mount_base,
                "must lie inside [privileged] allowed_paths (the privileged daemon mounts "
                "only there)",
            )

    # -- secure file operations ------------------------------------------------------

    def _decide_secure(self, share: str) -> None:
        """Resolve 'auto' for nas_secure_file_operations / _permissions on ``share``."""
        ops = str(self.conf.nas_secure_file_operations).lower()
        perms = str(self.conf.nas_secure_file_permissions).lower()
        if "auto" in (ops, perms):
            path = self.share_path(share)
            indicator = os.path.join(path, SECURE_INDICATOR)
            text = self.io.read_text(indicator)
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
