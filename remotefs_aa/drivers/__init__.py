"""Volume drivers, found through the ``remotefs_aa.volume_drivers`` namespace."""

from __future__ import annotations

from oslo_config import cfg

from remotefs_aa import exception, plugins
from remotefs_aa.drivers.base import VolumeDriver

__all__ = ["VolumeDriver", "load_driver", "load_driver_class"]


def load_driver_class(name: str) -> type[VolumeDriver]:
    """The class for ``volume_driver`` = an entry-point name or dotted path."""
    return plugins.load_class(plugins.VOLUME_DRIVERS_NAMESPACE, name, "volume driver", VolumeDriver)


def load_driver(conf: cfg.ConfigOpts, host: str | None = None) -> VolumeDriver:
    """Construct the driver named by ``[DEFAULT] volume_driver``."""
    cls = load_driver_class(conf.volume_driver)
    try:
        return cls(conf, host=host)
    except exception.RemoteFSAAError:
        raise
    except Exception as exc:
        raise exception.PluginLoadFailed(
            f"volume driver {conf.volume_driver!r} failed to initialise: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
