"""Every configuration option of remotefs_aa, registered in one place.

``list_opts()`` feeds ``oslo-config-generator --namespace remotefs_aa``; the
generated ``etc/remotefs_aa/remotefs_aa.conf.sample`` is committed and a unit
test fails when it is stale, so the sample never drifts from the code.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from urllib import parse

from oslo_config import cfg
from oslo_utils import units

from remotefs_aa import exception

DEFAULT_STATE_PATH = "/var/lib/remotefs_aa"

core_opts = [
    cfg.StrOpt(
        "volume_driver",
        default="local",
        help="Volume driver: an entry-point name from the "
        "remotefs_aa.volume_drivers namespace (nfs, glusterfs, local) or a "
        "dotted class path such as remotefs_aa.drivers.nfs.NfsDriver.",
    ),
    cfg.StrOpt(
        "state_path",
        default=DEFAULT_STATE_PATH,
        help="Directory for this service's own state: file locks, the default "
        "sqlite database and the file lock backend. Not on a shared share.",
    ),
    cfg.StrOpt(
        "host",
        default=socket.gethostname(),
        sample_default="<hostname>",
        help="Name of this volume service host. Locks, logs and the per-host "
        "work records carry it, so it must be unique among the services that "
        "share a backend.",
    ),
    cfg.StrOpt(
        "cluster",
        help="Name of the Active-Active cluster this service belongs to. When "
        "set, several services may run against the same shares at once, and "
        "the service refuses to start with a lock provider whose locks do not "
        "span hosts.",
    ),
    cfg.StrOpt(
        "image_conversion_dir",
        default="$state_path/conversion",
        help="Where images are downloaded to before they are checked and "
        "converted into a volume, and where volumes are converted before "
        "they are uploaded (Cinder's option). Must lie under [privileged] "
        "allowed_paths and be writable by the service.",
    ),
]

coordination_opts = [
    cfg.StrOpt(
        "lock_provider",
        default="tooz",
        help="Lock provider: an entry-point name from the "
        "remotefs_aa.lock_providers namespace (tooz: any tooz backend, for "
        "many hosts; local: inter-process file locks on this host only) or a "
        "dotted class path.",
    ),
    cfg.StrOpt(
        "backend_url",
        default="file://$state_path/coordination",
        secret=True,
        help="tooz backend URL for the tooz lock provider, e.g. "
        "zookeeper://10.0.0.5:2181, redis://10.0.0.5:6379, "
        "etcd3+http://10.0.0.5:2379. The file:// default only coordinates "
        "processes of one host. Kept secret because URLs may carry passwords.",
    ),
    cfg.FloatOpt(
        "heartbeat",
        default=1.0,
        min=0.01,
        help="Seconds between heartbeats to the lock backend, for backends "
        "whose locks and sessions expire unless refreshed (Redis, memcached, "
        "etcd). No heartbeat thread runs for backends that do not need one.",
    ),
    cfg.FloatOpt(
        "lease_margin",
        min=0.0,
        help="Seconds taken off a lock's lease when computing until when it is "
        "surely still ours (its fencing deadline: the send time of the last "
        "confirmed renewal + the backend's lock expiry - this margin). Covers "
        "clock-rate differences and the time the privileged daemon needs to end "
        "a step. Unset: max(0.5, a tenth of the expiry). See doc/locking.md.",
    ),
    cfg.FloatOpt(
        "connect_timeout",
        default=5.0,
        min=0.1,
        help="Seconds a connection attempt to the lock backend may take (at start "
        "and on each reconnect) before it counts as failed. Client libraries wait "
        "far longer on their own: kazoo 10 s with a retry warning each time, "
        "redis-py on an unanswering address until TCP gives up.",
    ),
    cfg.FloatOpt(
        "initial_reconnect_backoff",
        default=0.1,
        min=0.001,
        help="Seconds to wait before the first attempt to reconnect to the "
        "lock backend after the connection is lost. Each failed attempt "
        "doubles the wait, with random jitter, up to max_reconnect_backoff.",
    ),
    cfg.FloatOpt(
        "max_reconnect_backoff",
        default=60.0,
        min=0.001,
        help="Longest wait, in seconds, between two attempts to reconnect to the lock backend.",
    ),
    cfg.FloatOpt(
        "lock_acquire_timeout",
        min=0.0,
        help="Seconds an operation waits for all of its locks before it fails "
        "with a lock timeout, leaving the resource untouched. Unset waits as "
        "long as it takes (a warning names the lock every "
        "lock_wait_warning_interval seconds).",
    ),
    cfg.FloatOpt(
        "lock_handoff_interval",
        default=0.06,
        min=0.0,
        help="Fairness on backends without a fair queue (Redis, etcd, memcached, "
        "SQL, file): a waiter holds the companion lock '<name>-turn', and a "
        "process re-taking a lock within this many seconds of releasing it pauses "
        "this long when it finds a turn requested, so the waiter (polling at most "
        "every 0.05 s) gets in. Without it one busy host starved another for 9 s "
        "on one volume. Not used on ZooKeeper, whose queue is fair. 0 turns it off.",
    ),
    cfg.FloatOpt(
        "lock_wait_warning_interval",
        default=30.0,
        min=0.1,
        help="While an operation waits for a lock, log a warning naming the "
        "lock this often, so a stuck holder is visible.",
    ),
    cfg.FloatOpt(
        "slow_lock_log_threshold",
        default=1.0,
        min=0.0,
        help="Lock waits and holds longer than this many seconds are logged "
        "at INFO level instead of DEBUG.",
    ),
    cfg.StrOpt(
        "lock_path",
        default="$state_path/locks",
        help="Directory of the lock files of the local lock provider. Must be "
        "on a local filesystem of this host.",
    ),
]

privileged_opts = [
    cfg.StrOpt(
        "mode",
        default="privsep",
        choices=[
            ("privsep", "a long-lived oslo.privsep daemon per capability set (default)"),
            ("rootwrap_daemon", "the oslo.rootwrap daemon, commands checked by filters"),
            ("sudo_rootwrap", "one 'sudo oslo-rootwrap' per call: the legacy, slow way"),
            ("direct", "run in this process; only when it is already root (tests)"),
        ],
        help="How privileged operations run. Driver code calls the same functions in every "
        "mode. The two rootwrap modes are legacy: rootwrap runs commands by path, so they "
        "trust the service user with root (the service warns at start); privsep does not.",
    ),
    cfg.BoolOpt(
        "use_rootwrap_daemon",
        default=False,
        deprecated_group="DEFAULT",
        help="The seed's name for mode = rootwrap_daemon: true selects that mode when "
        "mode is left at its default.",
    ),
    cfg.StrOpt(
        "root_helper",
        default="sudo",
        help="Command that gains root to start the privsep daemon (privsep "
        "mode) or the rootwrap daemon; empty when the service already runs "
        "as root.",
    ),
    cfg.StrOpt(
        "rootwrap_config",
        default="/etc/remotefs_aa/rootwrap.conf",
        help="oslo.rootwrap configuration for the rootwrap_daemon and "
        "sudo_rootwrap modes. Its filters must come from "
        "`remotefs-aa rootwrap-filters` for this configuration.",
    ),
    cfg.ListOpt(
        "allowed_paths",
        default=["$state_path"],
        help="Directories under which privileged file operations, qemu-img and "
        "mount points may act. Every path argument must lie under one of these; "
        "below it no '..' and no symbolic link is accepted (the daemon opens "
        "paths without following links). The mount point bases, shares and "
        "image_conversion_dir must lie under them (the service refuses to "
        "start otherwise).",
    ),
    cfg.IntOpt(
        "command_timeout",
        default=3600,
        min=1,
        help="Seconds after which a privileged command (qemu-img convert, "
        "commit, mount ...) is killed and reported as failed.",
    ),
    cfg.IntOpt(
        "qemu_img_info_max_memory",
        default=1024,
        min=64,
        help="Address-space limit, in MiB, for qemu-img info and check, which "
        "parse images that tenants may have crafted.",
    ),
    cfg.IntOpt(
        "qemu_img_info_max_cpu",
        default=30,
        min=1,
        help="CPU-time limit, in seconds, for qemu-img info and check.",
    ),
]

#: Options every RemoteFS driver reads (Cinder's names, types and defaults
#: where Cinder has them). Under Cinder these live in each backend section and
#: [backend_defaults]; standalone, in [DEFAULT].
driver_opts = [
    cfg.StrOpt(
        "volume_backend_name",
        help="Backend name reported in get_volume_stats (default: the driver's name).",
    ),
    cfg.IntOpt(
        "reserved_percentage",
        default=0,
        min=0,
        max=100,
        help="Percentage of each share's capacity kept free: a share whose free "
        "space would drop below it takes no new volume.",
    ),
    cfg.StrOpt(
        "max_over_subscription_ratio",
        default="20.0",
        regex=r"^(auto|\d*\.\d+|\d+)$",
        help="Thin provisioning: the provisioned size of all volumes on a share "
        "may reach this multiple of its capacity (1.0 = no over-subscription; at "
        "least 1.0). 'auto' derives it from the share's use as Cinder's scheduler "
        "does: 1 + provisioned / (used + 1) GiB, or 20 on an empty share. A string, "
        "as Cinder's option is, so one cinder.conf line means the same in both.",
    ),
    cfg.IntOpt(
        "provisioned_capacity_refresh_interval",
        default=60,
        min=0,
        help="Seconds between rescans of a share's volume sizes for the "
        "provisioned capacity in get_volume_stats; between rescans the driver "
        "counts its own creates, extends and deletes. 0 rescans on every poll.",
    ),
]

#: The local-directory driver (each share is a directory; nothing is mounted).
local_driver_opts = [
    cfg.ListOpt(
        "local_shares",
        default=["$state_path/shares/local"],
        help="Directories used as shares by the local driver. Each must lie under "
        "[privileged] allowed_paths; missing ones are created.",
    ),
    cfg.BoolOpt(
        "local_sparsed_volumes",
        default=True,
        help="Create raw volumes as sparse files (False: fallocate the whole "
        "size, 'thick'). Same meaning as Cinder's nfs_sparsed_volumes.",
    ),
    cfg.BoolOpt(
        "local_qcow2_volumes",
        default=False,
        help="Create volumes as qcow2 files instead of raw. Same meaning as "
        "Cinder's nfs_qcow2_volumes.",
    ),
]


def _share_driver_opts(
    prefix: str, what: str, shares_file: str, mount_options: str | None = None, why: str = ""
) -> list[cfg.Opt]:
    return [
        cfg.StrOpt(
            f"{prefix}_shares_config",
            default=f"/etc/remotefs_aa/{shares_file}",
            help=f"File listing the {what} shares, one per line: 'host:/export "
            "[-o option,option]'; '#' starts a comment.",
        ),
        cfg.StrOpt(
            f"{prefix}_mount_point_base",
            default="$state_path/mnt",
            help="Directory under which shares are mounted, each at the md5 of the "
            "share (os-brick's naming). Must lie inside [privileged] allowed_paths.",
        ),
        cfg.StrOpt(
            f"{prefix}_mount_options",
            default=mount_options,
            help="Mount options for every share (comma separated); a share's own "
            "'-o' options are added after these." + why,
        ),
        cfg.IntOpt(
            f"{prefix}_mount_attempts",
            default=3,
            min=1,
            help="Rounds of mount attempts (each trying every option variant) before "
            "a share is reported unmountable.",
        ),
        cfg.BoolOpt(
            f"{prefix}_sparsed_volumes",
            default=True,
            help="Create raw volumes as sparse files (False: fallocate, thick).",
        ),
        cfg.BoolOpt(
            f"{prefix}_qcow2_volumes",
            default=False,
            help="Create volumes as qcow2 files instead of raw.",
        ),
    ]


#: The NFS and GlusterFS drivers (Cinder's option names).
nas_driver_opts = [
    *_share_driver_opts("nfs", "NFS", "nfs_shares"),
    cfg.BoolOpt(
        "nfs_snapshot_support",
        default=False,
        help="Allow snapshots on NFS shares (Cinder's option and default). Unlike "
        "Cinder's NFS driver, snapshots also work with nas_secure_file_operations "
        "true: the chain code runs as the service user then.",
    ),
    *_share_driver_opts(
        "glusterfs",
        "GlusterFS",
        "glusterfs_shares",
        "entry-timeout=0,attribute-timeout=0,negative-timeout=0,direct-io-mode=enable",
        " The default turns off the FUSE client's name and attribute caches: "
        "with several hosts on one volume, a cached entry would hide a file "
        "another host just created (see doc/glusterfs.md).",
    ),
    cfg.StrOpt("nas_host", default="", help="NFS server address, instead of nfs_shares_config."),
    cfg.StrOpt("nas_share_path", default="", help="Export path on nas_host, e.g. /srv/volumes."),
    cfg.StrOpt(
        "nas_mount_options",
        help="Mount options for NFS shares (comma separated): when set, used "
        "instead of nfs_mount_options (Cinder's meaning), and the options of the "
        "nas_host share.",
    ),
    cfg.StrOpt(
        "nas_secure_file_operations",
        default="auto",
        help="true, false or auto (any case, as in Cinder). true: volume file "
        "operations run as this service's user, not through the root daemon. auto: "
        "true on a share that has no volume yet, false on one that has, decided "
        "once and remembered in the share (Cinder decides by whether its database "
        "is empty; a share's own content is what several hosts agree on).",
    ),
    cfg.StrOpt(
        "nas_secure_file_permissions",
        default="auto",
        help="true, false or auto (any case). true: new volume files get mode "
        "0660, false: 0666 (Cinder's meanings). auto: as for "
        "nas_secure_file_operations.",
    ),
]

COORDINATION_GROUP = "coordination"
PRIVILEGED_GROUP = "privileged"


def backend_opts() -> list[cfg.Opt]:
    """The options of one volume backend (a backend section under Cinder)."""
    return [*driver_opts, *local_driver_opts, *nas_driver_opts]


def service_group_opts() -> list[tuple[str, list[cfg.Opt]]]:
    """The service-wide groups besides [DEFAULT]: [coordination] and [privileged]."""
    return [
        (COORDINATION_GROUP, list(coordination_opts)),
        (PRIVILEGED_GROUP, list(privileged_opts)),
    ]


#: Cinder's scheduler uses this ratio for 'auto' on a pool nothing is provisioned on.
AUTO_RATIO_WHEN_EMPTY = 20.0


def parse_over_subscription_ratio(value: object) -> float | str:
    """``max_over_subscription_ratio`` as a number >= 1, or the string 'auto'.

    Both worlds read the option as a string (Cinder's type), so this is the one
    place that says what the text means; ValueError names what is wrong.
    """
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    ratio = float(text)
    if ratio < 1.0:
        raise ValueError(f"must be at least 1.0 or 'auto', not {ratio}")
    return ratio


def effective_over_subscription_ratio(
    value: object, total: float, free: float, provisioned: float
) -> float:
    """The ratio to plan with; 'auto' is derived as Cinder's scheduler derives it.

    Any unit works as long as all three sizes use the same one; 'auto' adds 1
    GiB to the used space as Cinder does, so sizes are in bytes here.
    """
    ratio = parse_over_subscription_ratio(value)
    if ratio != "auto":
        return float(ratio)
    if not provisioned:
        return AUTO_RATIO_WHEN_EMPTY
    return 1.0 + provisioned / (max(0.0, total - free) + units.Gi)


SECURE_VALUES = ("true", "false", "auto")


def register_opts(conf: cfg.ConfigOpts) -> None:
    """Register every remotefs_aa option on ``conf`` (idempotent)."""
    conf.register_opts(core_opts)
    conf.register_opts(driver_opts)
    conf.register_opts(local_driver_opts)
    conf.register_opts(nas_driver_opts)
    conf.register_opts(coordination_opts, group=COORDINATION_GROUP)
    conf.register_opts(privileged_opts, group=PRIVILEGED_GROUP)


def config_file_args(conf: cfg.ConfigOpts) -> list[str]:
    """``--config-file``/``--config-dir`` arguments (absolute) that reload ``conf``'s files.

    For processes started on the service's behalf (the privileged helper, the
    demo's workers), so they read exactly the configuration this one did.
    """
    args: list[str] = []
    for path in conf.config_file or []:
        args += ["--config-file", os.path.abspath(path)]
    for path in conf.config_dir or []:
        args += ["--config-dir", os.path.abspath(path)]
    return args


def list_opts() -> list[tuple[str | None, list[cfg.Opt]]]:
    """Options by group, for oslo-config-generator (privsep sections included)."""
    return [("DEFAULT", [*core_opts, *backend_opts()]), *service_group_opts()]


def list_all_opts() -> list[tuple[str | None, list[cfg.Opt]]]:
    """:func:`list_opts` plus the privsep daemons' sections, for the sample."""
    from remotefs_aa import privsep

    return [*list_opts(), *privsep.list_opts()]


def _all_opts() -> Iterable[tuple[str | None, cfg.Opt]]:
    for group, opts in list_opts():
        for opt in opts:
            yield (None if group == "DEFAULT" else group), opt


def validate(conf: cfg.ConfigOpts) -> None:
    """Read every option once and check the values that depend on each other.

    oslo.config converts values lazily, so a typo in a config file would
    otherwise surface in the middle of an operation. Reading everything here
    turns it into one error at start that names the option and the value.
    """
    for group, opt in _all_opts():
        qualified = f"[{group or 'DEFAULT'}] {opt.dest}"
        try:
            (conf[group] if group else conf)[opt.dest]
        except (cfg.ConfigFileValueError, ValueError) as exc:
            # oslo's text repeats the option and the file location; keep the
            # part that says what is wrong with the value.
            reason = str(exc).rpartition(" is not valid: ")[2]
            raise exception.InvalidConfig(qualified, _raw_value(conf, group, opt), reason) from exc
    try:
        parse_over_subscription_ratio(conf.max_over_subscription_ratio)
    except ValueError as exc:
        raise exception.InvalidConfig(
            "max_over_subscription_ratio", conf.max_over_subscription_ratio, str(exc)
        ) from None
    for name in ("nas_secure_file_operations", "nas_secure_file_permissions"):
        if str(conf[name]).strip().lower() not in SECURE_VALUES:
            raise exception.InvalidConfig(name, conf[name], "must be true, false or auto")
    coord = conf[COORDINATION_GROUP]
    if coord.max_reconnect_backoff < coord.initial_reconnect_backoff:
        raise exception.InvalidConfig(
            "[coordination] max_reconnect_backoff",
            coord.max_reconnect_backoff,
            f"must not be smaller than initial_reconnect_backoff "
            f"({coord.initial_reconnect_backoff})",
        )
    if coord.lock_provider == "tooz":
        validate_backend_url(coord.backend_url)
    if not conf.host:
        raise exception.InvalidConfig("[DEFAULT] host", conf.host, "must not be empty")


def validate_backend_url(url: str) -> None:
    """Refuse a backend URL whose scheme no installed tooz driver handles."""
    from remotefs_aa import plugins

    parsed = parse.urlparse(url or "")
    known = plugins.installed_names("tooz.backends")
    if not parsed.scheme:
        raise exception.InvalidConfig(
            "[coordination] backend_url",
            redact_url(url),
            f"not a URL; expected scheme://..., one of: {', '.join(known)}",
        )
    if parsed.scheme not in known:
        raise exception.InvalidConfig(
            "[coordination] backend_url",
            redact_url(url),
            f"no tooz driver for scheme {parsed.scheme!r}; installed: {', '.join(known)}",
        )


def redact_url(url: str) -> str:
    """Hide a password in a URL before it reaches a log or an error."""
    parsed = parse.urlparse(url or "")
    if parsed.password:
        netloc = parsed.netloc.replace(f":{parsed.password}@", ":***@")
        return parse.urlunparse(parsed._replace(netloc=netloc))
    return url


def _raw_value(conf: cfg.ConfigOpts, group: str | None, opt: cfg.Opt) -> object:
    """Best-effort raw text of an option that failed to convert."""
    try:
        namespace = conf._namespace
        if namespace is not None:
            values, _loc = namespace._get_value([(group or "DEFAULT", opt.dest)], multi=opt.multi)
            return values[-1] if isinstance(values, list) and values else values
    except Exception:  # noqa: S110 - only decorates an error message
        pass
    return "<unreadable>"
