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
    driver_volume_type = "glusterfs"
    storage_protocol = "glusterfs"
    kind = "glusterfs"
    fstype = "glusterfs"
    shares_config_opt = "glusterfs_shares_config"
    mount_point_base_opt = "glusterfs_mount_point_base"
    mount_options_opt = "glusterfs_mount_options"
    mount_attempts_opt = "glusterfs_mount_attempts"
    sparsed_volumes_opt = "glusterfs_sparsed_volumes"
    qcow2_volumes_opt = "glusterfs_qcow2_volumes"
