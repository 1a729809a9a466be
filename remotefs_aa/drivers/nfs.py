"""The NFS driver (entry point ``nfs``; ``remotefs_aa.drivers.nfs.NfsDriver``).

Shares come from ``nfs_shares_config`` (Cinder's format) or from ``nas_host`` +
``nas_share_path``. Unless the mount options pin a version, each mount attempt
tries NFS 4.2, then 4.1, then the client's default.
"""

from __future__ import annotations

import re
from typing import Any

from remotefs_aa import exception
from remotefs_aa.drivers import shares as shares_mod
from remotefs_aa.drivers.mounted import MountedShareDriver

_VERSION_OPTION = re.compile(r"^(?:vers|nfsvers)=|^v[0-9]")


class NfsDriver(MountedShareDriver):
    """Volumes on NFS exports."""

    driver_name = "nfs"

    def _configured_shares(self) -> list[shares_mod.Share]:
        if self.conf.nas_host:
            if not self.conf.nas_share_path:
                raise exception.InvalidConfig(
                    self.where("nas_share_path"),
                    self.conf.nas_share_path,
                    "is required when nas_host is set",
                )
            where = self.where("nas_host") + "/nas_share_path"
            share = shares_mod.parse_line(
                f"{self.conf.nas_host}:{self.conf.nas_share_path}", "nfs", where
            )
            assert share is not None
            # Its options are nas_mount_options, the common ones (below).
            return [shares_mod.Share(share.address)]
        return super()._configured_shares()

    def common_mount_options(self) -> tuple[str, ...]:
        """nas_mount_options when set (it replaces nfs_mount_options, as in Cinder)."""
        if self.conf.nas_mount_options:
            return shares_mod.check_options(
                self.conf.nas_mount_options, self.where("nas_mount_options")
            )
        return super().common_mount_options()

    def option_variants(self, share: str) -> list[list[str]]:
        options = self.mount_options(share)
        if any(_VERSION_OPTION.match(o) for o in options):
            return [options]
        return [[*options, "vers=4.2"], [*options, "vers=4.1"], options]

    def create_snapshot(self, snapshot: Any) -> Any:
        if not self.conf.nfs_snapshot_support:
            raise exception.VolumeError(
                f"snapshot {snapshot.id} of volume {snapshot.volume_id} refused: "
                f"nfs_snapshot_support is false"
            )
        return super().create_snapshot(snapshot)
