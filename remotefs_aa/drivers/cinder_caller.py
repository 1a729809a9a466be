"""The drivers when Cinder's volume service is the caller.

``volume_driver = remotefs_aa.drivers.nfs.NfsDriver`` in a backend section of
cinder.conf makes cinder-volume build the driver as Cinder builds every
driver::

    NfsDriver(configuration=<the backend's Configuration>, host="<host>@<backend>",
              cluster_name="<cluster>@<backend>" or None, is_vol_db_empty=...,
              active_backend_id=...)

:meth:`remotefs_aa.drivers.base.VolumeDriver.__new__` sees ``configuration=``
and returns an instance of :func:`cinder_class` of the class: the same
class, with :class:`CinderDriver` in front and Cinder's ``BaseVD`` behind, so
it *is* an ``NfsDriver`` (every operation is the product's own code) and also
has every member Cinder's manager expects of a driver (``init_capabilities``,
``get_backup_device``, ``clone_image`` ... from ``BaseVD``). Cinder is
imported here only, and this module only when Cinder is the caller.

What the Cinder form adds, and why:

* **Construction does no I/O.** cinder-volume constructs drivers in its parent
  process and forks one child per backend afterwards; a thread, a privileged
  daemon or a lock-backend connection made before the fork would be the
  parent's. The constructor only registers options, reads and checks them
  (refusing a cluster whose locks do not span hosts, and any
  ``volume_name_template`` but ``volume-%s``); ``do_setup`` (in the child)
  starts the privileged helper mode and the lock provider, then mounts.
* **One set of options** (:func:`register_options`): Cinder's definitions win
  wherever Cinder has one (``state_path``, ``host``, ``cluster``,
  ``reserved_percentage``, ``max_over_subscription_ratio``,
  ``image_conversion_dir``, ``[coordination] backend_url``, its ``nfs_*`` and
  ``nas_*`` options); ours are added where it has none, per backend
  (``glusterfs_*``, ``local_*``, ``provisioned_capacity_refresh_interval``)
  or service-wide (the rest of ``[coordination]``, ``[privileged]``). Nothing
  is registered when a module is imported. :class:`CinderConf` answers the
  lower layers' option reads from the backend section (then
  ``[backend_defaults]``) or from ``cfg.CONF``, so they run unchanged.
* **One lock backend**: the tooz provider reads Cinder's ``[coordination]
  backend_url``, so Cinder's own manager locks (``cinder-...``) and ours
  (``remotefs_aa-...``) live on one backend, under distinct names.
* **Cinder's errors**: our exceptions become the Cinder exceptions its
  manager acts on (``VolumeIsBusy`` and ``SnapshotIsBusy`` put a delete back
  to 'available'; ``ImageUnacceptable``, ``InvalidVolume``, ...), with our
  message, and the original as ``__cause__``.
* Cinder-only members: exports are no-ops (a file on a share needs none), the
  pool is the share, revert needs no temporary snapshot (the chain driver
  reverts in place), chain changes on an attached volume are refused (no
  Nova-assisted snapshots), and an image Cinder's create flow already
  downloaded is not fetched again.

Under eventlet (cinder-volume's default) our threads (the tooz heartbeat,
reconnect and lock-wait watcher) are ``threading`` threads, which Cinder's
monkey-patching makes green, as are the sockets and pipes they and the stock
oslo.privsep client use; with ``OS_CINDER_DISABLE_EVENTLET_PATCHING=1`` they
are native. Nothing here needs ``select.poll`` or blocks the hub for long.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from oslo_config import cfg

from remotefs_aa import coordination, exception, opts, privsep
from remotefs_aa.coordination.base import LockProvider

LOG = logging.getLogger(__name__)

#: The only file-name template the privileged daemon's name grammar fits.
VOLUME_NAME_TEMPLATE = "volume-%s"

#: Options read from the backend's section (then [backend_defaults]).
BACKEND_OPTION_NAMES = frozenset({"volume_driver", *(o.dest for o in opts.backend_opts())})

#: Driver methods whose errors are turned into Cinder's.
TRANSLATED = (
    "do_setup",
    "check_for_setup_error",
    "create_volume",
    "delete_volume",
    "create_snapshot",
    "delete_snapshot",
    "create_volume_from_snapshot",
    "create_cloned_volume",
    "extend_volume",
    "revert_to_snapshot",
    "copy_image_to_volume",
    "copy_volume_to_image",
    "initialize_connection",
    "initialize_connection_snapshot",
    "terminate_connection",
    "get_volume_stats",
)

_CLASSES: dict[type, type] = {}
_CLASSES_LOCK = threading.Lock()


def cinder_class(cls: type) -> type:
    """``cls`` as Cinder's manager needs it: (CinderDriver, cls, BaseVD), made once."""
    with _CLASSES_LOCK:
        made = _CLASSES.get(cls)
        if made is None:
            from cinder.volume import driver as cinder_driver

            made = type(
                cls.__name__,
                (CinderDriver, cls, cinder_driver.BaseVD),
                {
                    "__module__": cls.__module__,
                    "__qualname__": cls.__qualname__,
                    "__doc__": cls.__doc__,
                    "cinder_form": True,
                },
            )
            for name in TRANSLATED:
                setattr(made, name, _translating(name, getattr(made, name)))
            _CLASSES[cls] = made
        return made


# -- options -------------------------------------------------------------------


def register_options(configuration: Any, conf: cfg.ConfigOpts | None = None) -> None:
    """Cinder's definitions first, then ours wherever Cinder has none.

    Per backend: Cinder's NFS and NAS options are appended from Cinder's own
    modules before ours, so an option both define keeps Cinder's type,
    default and help (``Configuration`` silently keeps the first definition).
    Importing those modules first also keeps a later import of Cinder's NFS
    driver (another backend of the same service) from colliding with ours.
    Service-wide: ours are added to ``[coordination]`` and ``[privileged]``;
    a name Cinder already defines (``backend_url``) stays Cinder's.
    """
    conf = conf if conf is not None else cfg.CONF
    # Imported for what they register: state_path, host, volume_name_template;
    # [coordination] backend_url; image_conversion_dir.
    for module in ("cinder.common.config", "cinder.coordination", "cinder.image.image_utils"):
        importlib.import_module(module)
    from cinder.volume.drivers import nfs as cinder_nfs
    from cinder.volume.drivers import remotefs as cinder_remotefs

    configuration.append_config_values(cinder_nfs.nfs_opts)
    configuration.append_config_values(cinder_remotefs.nas_opts)
    configuration.append_config_values(opts.backend_opts())
    for group, group_opts in opts.service_group_opts():
        for opt in group_opts:
            with contextlib.suppress(cfg.DuplicateOptError):
                conf.register_opt(opt, group=group)


def check_name_template(conf: cfg.ConfigOpts) -> None:
    """Refuse a ``volume_name_template`` other than Cinder's default, at start."""
    template = conf.volume_name_template
    if template != VOLUME_NAME_TEMPLATE:
        raise exception.InvalidConfig(
            "[DEFAULT] volume_name_template",
            template,
            f"remotefs_aa names a volume's files {VOLUME_NAME_TEMPLATE!r} % name_id "
            f"(its overlays <name>.<snapshot id>), the only names its privileged daemon "
            f"accepts; set it back to {VOLUME_NAME_TEMPLATE!r}",
        )


class CinderConf:
    """The option reads of our layers, answered from Cinder's configuration.

    The drivers, the lock provider and the privileged helper read options as
    ``conf.name``, ``conf[name]`` and ``conf.<group>.name``. Here a backend
    option comes from the backend's ``Configuration`` (its section, then
    ``[backend_defaults]``; never ``[DEFAULT]``, as for every Cinder driver),
    ``host`` and ``cluster`` are what Cinder gave the driver
    (``host@backend``, ``cluster@backend``), and everything else (groups,
    ``state_path``, ``image_conversion_dir``, the config files) is the
    service's ``cfg.CONF``.
    """

    def __init__(
        self,
        configuration: Any,
        conf: cfg.ConfigOpts,
        host: str | None,
        cluster: str | None,
    ) -> None:
        self._backend = configuration
        self._global = conf
        self.host = host or conf.host
        self.cluster = cluster

    @property
    def config_group(self) -> str:
        """The backend's section name."""
        return self._backend.config_group

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if name in BACKEND_OPTION_NAMES:
            return getattr(self._backend, name)
        return getattr(self._global, name)

    def __getitem__(self, name: str) -> Any:
        return getattr(self, name)

    def __contains__(self, name: str) -> bool:
        return name in BACKEND_OPTION_NAMES or name in self._global


# -- errors ----------------------------------------------------------------------


def to_cinder(exc: exception.RemoteFSAAError, method: str, args: tuple) -> Exception:
    """The Cinder exception the manager expects for ``exc`` raised by ``method``."""
    from cinder import exception as cinder_exc

    message = str(exc)
    target = args[0] if args else None
    busy = (exception.VolumeBusy, exception.LockBusy, exception.LockTimeout)
    # A lock backend that cannot be reached means nothing ran: for a delete,
    # "busy" puts the resource back to its former status, which is the truth.
    if isinstance(exc, busy) or (
        isinstance(exc, exception.LockBackendUnavailable)
        and method in ("delete_volume", "delete_snapshot")
    ):
        if method == "delete_snapshot":
            return cinder_exc.SnapshotIsBusy(
                message=message, snapshot_name=getattr(target, "name", "?")
            )
        return cinder_exc.VolumeIsBusy(message=message, volume_name=getattr(target, "name", "?"))
    table: list[tuple[type, Callable[..., Exception]]] = [
        (exception.ImageRefused, cinder_exc.ImageUnacceptable),
        (exception.InvalidConfig, cinder_exc.InvalidConfigurationValue),
        (exception.InvalidVolume, cinder_exc.InvalidVolume),
        (exception.InvalidSnapshot, cinder_exc.InvalidSnapshot),
        (exception.VolumeNotFound, cinder_exc.VolumeNotFound),
        (exception.SnapshotNotFound, cinder_exc.SnapshotNotFound),
    ]
    for ours, theirs in table:
        if isinstance(exc, ours):
            return theirs(message=message)
    return cinder_exc.VolumeBackendAPIException(message=message)


def _translating(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return func(self, *args, **kwargs)
        except exception.RemoteFSAAError as exc:
            raise to_cinder(exc, name, args) from exc

    return call


# -- what a service process starts once ---------------------------------------------

_STARTED_LOCK = threading.Lock()
_started = {"privsep": False, "atexit": False}


def start_services(conf: Any, provider: LockProvider) -> None:
    """The privileged helper mode and the lock provider, once per process.

    cinder-volume runs one backend per child process, but a test (or a
    service with several backends of ours in one process) may construct
    more: the first starts both, later ones use what runs. The lock backend
    is the service's ``[coordination]``, the same for every backend.
    """
    with _STARTED_LOCK:
        if not _started["privsep"]:
            privsep.init(conf)
            _started["privsep"] = True
        try:
            coordination.get_provider()
        except exception.LockProviderNotStarted:
            provider.start()
            coordination.set_provider(provider)
        if not _started["atexit"]:
            # Releases what the provider holds and ends its heartbeat when the
            # service exits; the privileged daemons exit with their client.
            atexit.register(coordination.stop)
            _started["atexit"] = True


# -- the Cinder form of a driver ---------------------------------------------------------


class CinderDriver:
    """What a remotefs_aa driver adds when Cinder's volume service is the caller.

    Always first in the bases of :func:`cinder_class` (before the product's
    class, which comes before Cinder's ``BaseVD``).
    """

    #: Several cinder-volume services of one cluster may drive one share: every
    #: chain change is locked through a lock provider that must span hosts
    #: (checked in the constructor, so a host-local one fails the service).
    SUPPORTS_ACTIVE_ACTIVE = True
    cinder_form = True

    def __init__(
        self,
        *args: Any,
        configuration: Any,
        host: str | None = None,
        cluster_name: str | None = None,
        is_vol_db_empty: bool | None = None,
        active_backend_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        from cinder.volume import driver as cinder_driver

        # BaseVD first: it appends Cinder's generic per-backend options
        # (reserved_percentage, max_over_subscription_ratio, ...) before ours.
        cinder_driver.BaseVD.__init__(
            self, host=host, cluster_name=cluster_name, configuration=configuration
        )
        register_options(configuration)
        check_name_template(cfg.CONF)
        conf = CinderConf(configuration, cfg.CONF, host, cluster_name)
        opts.validate(conf)
        self.option_section = configuration.config_group
        self.is_vol_db_empty = is_vol_db_empty
        self.active_backend_id = active_backend_id
        super().__init__(conf, host=conf.host)  # type: ignore[call-arg]
        # Built (not started) now, so a cluster with host-local locks fails
        # the service at once instead of leaving it running uninitialised.
        self._provider = coordination.load_provider(conf)
        coordination.check_cluster_safety(conf, self._provider)
        LOG.info(
            "%s for Cinder backend [%s]: host %s, cluster %s, locks %s",
            type(self).__name__,
            self.option_section,
            conf.host,
            cluster_name,
            self._provider.describe(),
        )

    # -- lifecycle (in the forked child) --------------------------------------------

    def do_setup(self, context: Any) -> None:
        """Start the privileged helper mode and the locks, then set up the shares.

        Cinder never stops a driver: at exit the driver leaves its shares (its
        presence record and lock), as the standalone service's stop does.
        """
        start_services(self.conf, self._provider)
        super().do_setup(context)  # type: ignore[misc]
        atexit.register(self.close)  # type: ignore[attr-defined]

    def _init_vendor_properties(self) -> tuple[dict, str | None]:
        return {}, None

    def get_volume_stats(self, refresh: bool = False) -> dict:
        """Stats, cached between the manager's refreshes (every 60 s by default)."""
        if refresh or not self._stats:
            self._stats = super().get_volume_stats(refresh)  # type: ignore[misc]
        return self._stats

    # -- chain changes Cinder may ask of an attached volume --------------------------------

    def create_snapshot(self, snapshot: Any) -> Any:
        _refuse_attached(snapshot.volume, f"snapshot {snapshot.id}")
        return super().create_snapshot(snapshot)  # type: ignore[misc]

    def delete_snapshot(self, snapshot: Any) -> None:
        _refuse_attached(snapshot.volume, f"deleting snapshot {snapshot.id}")
        super().delete_snapshot(snapshot)  # type: ignore[misc]

    def revert_to_snapshot(self, context: Any, volume: Any, snapshot: Any) -> None:
        _refuse_attached(volume, f"reverting to snapshot {snapshot.id}")
        super().revert_to_snapshot(context, volume, snapshot)  # type: ignore[misc]

    def extend_volume(self, volume: Any, new_size: int) -> None:
        _refuse_attached(volume, f"extending to {new_size} GiB")
        super().extend_volume(volume, new_size)  # type: ignore[misc]

    # -- members only Cinder calls ------------------------------------------------------

    def create_export(self, context: Any, volume: Any, connector: Any) -> None:
        """Nothing to export: compute hosts mount the share (os-brick) themselves."""
        return None

    def ensure_export(self, context: Any, volume: Any) -> None:
        """Nothing to re-export after a restart."""
        return None

    def remove_export(self, context: Any, volume: Any) -> None:
        """Nothing was exported."""
        return None

    def get_pool(self, volume: Any) -> str | None:
        """The volume's pool: the share it lives on (a pool per share)."""
        share = getattr(volume, "provider_location", None)
        return share if share in self.shares else None  # type: ignore[attr-defined]

    def snapshot_revert_use_temp_snapshot(self) -> bool:
        """False: a revert recreates the top overlay in place; no copy needs a backup."""
        return False

    def secure_file_operations_enabled(self) -> bool:
        """Cinder's meaning: ``nas_secure_file_operations`` is 'true'."""
        return str(self.conf.nas_secure_file_operations).strip().lower() == "true"  # type: ignore[attr-defined]

    def fetch_image(self, context: Any, image_service: Any, image_id: str, path: str) -> str:
        """The image Cinder's create flow already downloaded, else a download of our own."""
        temporary = getattr(image_service, "temp_images", None)
        if temporary is not None and context is not None:
            found = temporary.get(context, image_id)
            if found and os.path.isfile(found):
                LOG.debug("image %s: using Cinder's download %s", image_id, found)
                return found
        return super().fetch_image(context, image_service, image_id, path)  # type: ignore[misc]


def _refuse_attached(volume: Any, what: str) -> None:
    """Refuse a chain change under a running guest (Cinder allows some with ``force``).

    A hypervisor holding the active image open keeps writing into it after a
    new overlay is put on top (its data would land in the snapshot) and
    cannot follow a merge or a revert; that needs Nova's assisted snapshots,
    which these drivers do not do. Nothing is changed.
    """
    status = getattr(volume, "status", None)
    attached = getattr(volume, "attach_status", None)
    if status == "in-use" or attached == "attached":
        raise exception.InvalidVolume(
            f"volume {volume.id} is attached ({status}); {what} needs it detached: the "
            f"guest would keep writing to the image under the new chain (online snapshots "
            f"need Nova-assisted snapshots, which remotefs_aa does not do). Nothing was changed."
        )
