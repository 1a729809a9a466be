"""Start and stop what a volume service needs: privileged helper, locks, driver.

One place for the start-up order (privsep before the driver touches a file;
the lock provider before any operation; do_setup and check_for_setup_error
before the first volume), used by the CLI, the demo workers, the tests and the
benchmarks alike.
"""

from __future__ import annotations

import contextlib
import difflib
import glob
import os
from collections.abc import Iterable, Iterator
from importlib import metadata

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


def unknown_options(conf: cfg.ConfigOpts) -> list[str]:
    """One warning per section and option in the parsed config files that nothing registered.

    oslo.config ignores what it does not know, so ``volume_drvier = nfs`` or a
    ``[coordinaton]`` section would silently leave the service on its defaults
    (the local driver, file locks). The files are read again with oslo.config's
    own parser and compared with what ``conf`` has registered (plus the
    deprecated names of those options); nothing is refused, because other
    projects' sections (Cinder's, oslo's) may share the file.
    """
    known_groups: dict[str, set[str]] = {"DEFAULT": set()}
    for name in conf:
        try:
            value = conf[name]
        except Exception:  # a registered option whose value does not convert
            value = None
        if isinstance(value, cfg.ConfigOpts.GroupAttr):
            known_groups.setdefault(name, set()).update(value)
        else:
            known_groups["DEFAULT"].add(name)
    for group, name in _deprecated_names():
        if group in known_groups:
            known_groups[group].add(name)
    files = list(conf.config_file or [])
    for directory in conf.config_dir or []:
        files += sorted(glob.glob(os.path.join(directory, "*.conf")))
    found = []
    for path in files:
        sections: dict[str, dict[str, list[str]]] = {}
        try:
            cfg.ConfigParser(path, sections).parse()
        except (OSError, cfg.ParseError):
            continue  # oslo.config itself already read or refused it
        for section, options in sections.items():
            if section not in known_groups:
                hint = _did_you_mean(section, known_groups, "[{}]")
                found.append(
                    f"unknown section [{section}] in {path} ignored, with its options "
                    f"{', '.join(sorted(options)) or '(none)'}{hint}"
                )
                continue
            for option in sorted(options):
                if option not in known_groups[section]:
                    hint = _did_you_mean(option, known_groups[section], "{}")
                    found.append(f"unknown option [{section}] {option} in {path} ignored{hint}")
    return found


def _did_you_mean(word: str, choices: Iterable[str], shape: str) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.75)
    return f"; did you mean {shape.format(close[0])}?" if close else ""


def _deprecated_names() -> Iterator[tuple[str, str]]:
    """(group, name) of the deprecated aliases of our options and oslo.log's.

    Read from their oslo.config.opts entry points, the published list of a
    project's options (what oslo-config-generator reads).
    """
    for ep in metadata.entry_points(group="oslo.config.opts"):
        if ep.name not in ("remotefs_aa", "oslo.log"):
            continue
        for group, group_opts in ep.load()():
            group_name = getattr(group, "name", group) or "DEFAULT"
            for opt in group_opts:
                for old in opt.deprecated_opts:
                    yield (old.group or group_name), (old.name or opt.dest)


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
