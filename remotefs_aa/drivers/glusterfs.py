"""The GlusterFS driver (entry point ``glusterfs``), over the FUSE client.

Shares are ``host:/volume`` (or ``host:volume``) lines in
``glusterfs_shares_config``, mounted with ``mount -t glusterfs`` through the
privileged daemon.
"""

from __future__ import annotations

from remotefs_aa.drivers.mounted import MountedShareDriver


class GlusterfsDriver(MountedShareDriver):
    """Volumes on GlusterFS volumes."""

    driver_name = "glusterfs"
