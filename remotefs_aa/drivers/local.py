"""The local-directory driver: each share is a directory on this host; nothing is mounted.

It is the embedded default (``volume_driver = local``): the main job, the
tests and the benchmarks run the whole driver stack on it without any server.
Two services on one host can share its directories Active-Active; across
hosts use the NFS or GlusterFS driver.
"""

from __future__ import annotations

import os
from typing import Any

from remotefs_aa import exception
from remotefs_aa.drivers.remotefs import RemoteFSDriver


class LocalDriver(RemoteFSDriver):
    """Volumes as files in the directories of ``local_shares``."""

    driver_name = "local"

    def load_shares(self) -> list[str]:
        shares = []
        for entry in self.conf.local_shares:
            if not entry or not os.path.isabs(entry):
                raise exception.InvalidConfig(
                    self.where("local_shares"), entry, "each share must be an absolute directory"
                )
            shares.append(os.path.normpath(entry))
        return shares

    def ensure_share_ready(self, share: str) -> None:
        from remotefs_aa.privsep import files

        if not os.path.isdir(share):
            files.make_directory(share, 0o755)

    def share_path(self, share: str) -> str:
        return share

    def initialize_connection(self, volume: Any, connector: dict) -> dict:
        """os-brick's LocalConnector shape (``device_path``), plus the RemoteFS keys."""
        info = super().initialize_connection(volume, connector)
        data = info["data"]
        data["device_path"] = os.path.join(self.share_path(data["export"]), data["name"])
        return info
