"""The volume driver interface: Cinder's method names and return shapes.

Keeping Cinder's names (``create_volume`` returning a model update,
``initialize_connection`` returning os-brick connection info, ...) means what
operators and developers know of that ecosystem carries over, and Cinder's own
volume and snapshot objects fit wherever ours do.
"""

from __future__ import annotations

import abc
from typing import Any

from oslo_config import cfg

ModelUpdate = dict[str, Any] | None


class VolumeDriver(abc.ABC):
    """Base of every remotefs_aa volume driver.

    Drivers are constructed with the service's ``ConfigOpts`` and a host
    name, then ``do_setup`` and ``check_for_setup_error`` run once before any
    volume operation. Volumes and snapshots are plain objects with Cinder's
    attribute names (``id``, ``name``, ``name_id``, ``size``,
    ``provider_location``, ``volume``, ``volume_id``, ``status``).

    Cinder's volume service builds the very same classes with its own
    keywords (``configuration=``, ``host=``, ``cluster_name=``, ...):
    :meth:`__new__` then returns an instance of the class's Cinder form
    (:mod:`remotefs_aa.drivers.cinder_caller`), which also derives from
    Cinder's ``BaseVD``. Cinder is imported only on that path, so the CLI,
    the demo and the tests run without it.
    """

    #: Entry-point style name, for logs and stats.
    driver_name = "abstract"
    #: ``driver_volume_type`` reported by ``initialize_connection``.
    driver_volume_type = "abstract"
    #: Driver version, reported in stats (Cinder's ``get_version``).
    VERSION = "1.0.0"

    def __new__(cls, *args: Any, **kwargs: Any) -> VolumeDriver:
        if "configuration" in kwargs and not getattr(cls, "cinder_form", False):
            from remotefs_aa.drivers import cinder_caller

            return super().__new__(cinder_caller.cinder_class(cls))
        return super().__new__(cls)

    def __init__(self, conf: cfg.ConfigOpts, host: str | None = None) -> None:
        self.conf = conf
        self.host = host or conf.host

    # -- lifecycle ----------------------------------------------------------
    @abc.abstractmethod
    def do_setup(self, context: Any = None) -> None:
        """Prepare shares (mount, create directories); called once at start."""

    @abc.abstractmethod
    def check_for_setup_error(self) -> None:
        """Raise if the driver cannot work (missing tools, unusable shares)."""

    # -- volumes --------------------------------------------------------------
    @abc.abstractmethod
    def create_volume(self, volume: Any) -> ModelUpdate:
        """Create ``volume``; returns a model update such as provider_location."""

    @abc.abstractmethod
    def delete_volume(self, volume: Any) -> None:
        """Delete ``volume`` with every snapshot overlay and its .info file."""

    @abc.abstractmethod
    def create_cloned_volume(self, volume: Any, src_vref: Any) -> ModelUpdate:
        """Create ``volume`` as a full copy of ``src_vref``."""

    @abc.abstractmethod
    def extend_volume(self, volume: Any, new_size: int) -> None:
        """Grow ``volume`` to ``new_size`` GiB."""

    # -- snapshots ------------------------------------------------------------
    @abc.abstractmethod
    def create_snapshot(self, snapshot: Any) -> ModelUpdate:
        """Create ``snapshot`` of ``snapshot.volume`` as a qcow2 overlay."""

    @abc.abstractmethod
    def delete_snapshot(self, snapshot: Any) -> None:
        """Merge ``snapshot`` out of its volume's chain."""

    @abc.abstractmethod
    def create_volume_from_snapshot(self, volume: Any, snapshot: Any) -> ModelUpdate:
        """Create ``volume`` holding the data of ``snapshot``."""

    @abc.abstractmethod
    def revert_to_snapshot(self, context: Any, volume: Any, snapshot: Any) -> None:
        """Make ``volume`` hold the data of its ``snapshot`` again."""

    # -- images and attachment -----------------------------------------------
    @abc.abstractmethod
    def copy_image_to_volume(
        self,
        context: Any,
        volume: Any,
        image_service: Any,
        image_id: str,
        disable_sparse: bool = False,
    ) -> None:
        """Fill ``volume`` from an image (``disable_sparse``: allocate every block)."""

    @abc.abstractmethod
    def copy_volume_to_image(
        self, context: Any, volume: Any, image_service: Any, image_meta: dict
    ) -> None:
        """Upload the data of ``volume`` as an image."""

    @abc.abstractmethod
    def initialize_connection(self, volume: Any, connector: dict) -> dict:
        """os-brick connection info: ``{'driver_volume_type', 'data': {...}}``."""

    def terminate_connection(self, volume: Any, connector: dict, **kwargs: Any) -> None:  # noqa: B027
        """Nothing to undo for file-based volumes; kept for interface parity."""

    # -- stats ----------------------------------------------------------------
    @abc.abstractmethod
    def get_volume_stats(self, refresh: bool = False) -> dict:
        """Capacity and capabilities, with Cinder's stats keys."""
