"""Start and stop what a volume service needs: privileged helper, locks, driver.

One place for the start-up order (privsep before the driver touches a file;
the lock provider before any operation; do_setup and check_for_setup_error
before the first volume), used by the CLI, the demo workers, the tests and the
benchmarks alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from oslo_config import cfg

from remotefs_aa import __version__, coordination, drivers, opts, privsep
from remotefs_aa.drivers.base import VolumeDriver


def make_config(
    args: list[str],
    conf: cfg.ConfigOpts | None = None,
    default_config_files: list[str] | None = [],  # noqa: B006 - never mutated
) -> cfg.ConfigOpts:
    """A ConfigOpts with every option registered, parsed from ``args``, validated.

    ``default_config_files=None`` lets oslo.config look in its usual places
    (/etc/remotefs_aa/...), as the CLI does when given no --config-file.
    """
    conf = conf if conf is not None else cfg.ConfigOpts()
    opts.register_opts(conf)
    privsep.register_opts(conf)
    conf(
        args,
        project="remotefs_aa",
        version=__version__,
        default_config_files=default_config_files,
    )
    opts.validate(conf)
    return conf


_drivers: list[VolumeDriver] = []


def start(conf: cfg.ConfigOpts, host: str | None = None) -> VolumeDriver:
    """Privileged helper mode, lock provider, then the driver, set up and checked."""
    privsep.init(conf)
    coordination.start(conf)
    try:
        driver = drivers.load_driver(conf, host=host)
        _drivers.append(driver)
        driver.do_setup()
        driver.check_for_setup_error()
    except BaseException:
        stop()
        raise
    return driver


def stop() -> None:
    """Close the drivers, stop the lock provider and the privileged daemons this process started."""
    try:
        while _drivers:
            close = getattr(_drivers.pop(), "close", None)
            if close is not None:
                close()
    finally:
        try:
            coordination.stop()
        finally:
            privsep.stop()


@contextlib.contextmanager
def running(conf: cfg.ConfigOpts, host: str | None = None) -> Iterator[VolumeDriver]:
    """``start`` ... ``stop`` as a context manager."""
    driver = start(conf, host)
    try:
        yield driver
    finally:
        stop()
