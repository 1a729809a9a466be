"""``remotefs-aa``: the operator's command line.

Global options (``--config-file``, ``--config-dir``, ``--debug``,
``--verbose``) come first, then a command::

    remotefs-aa --config-file /etc/remotefs_aa/remotefs_aa.conf lock check
    remotefs-aa lock run volume-42 -- qemu-img info /srv/share/volume-42

Exit codes say what to fix (README, "Exit codes"): the wrapped command's own
status for ``lock run``; otherwise 0 on success, 1 when the operation failed on
the object it names, 2 on bad usage, 69 when the lock backend is unreachable,
75 when a lock is busy or timed out, 78 on a configuration the service refuses
wherever it is found (the sysexits.h meanings). Errors go to stderr, one line; with
``--format json`` that line is ``{"error": ..., "exit_code": ...}``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

from oslo_config import cfg
from oslo_log import log as oslo_log

from remotefs_aa import __version__, coordination, exception, service
from remotefs_aa.cmd import volumes
from remotefs_aa.cmd.tables import key_values

LOG = logging.getLogger(__name__)

EX_FAILURE = 1
EX_USAGE = 2
EX_UNAVAILABLE = 69
EX_TEMPFAIL = 75
EX_CONFIG = 78


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="remotefs-aa",
        description="Active-Active RemoteFS volume service tools.",
    )
    parser.add_argument(
        "--config-file",
        action="append",
        default=[],
        metavar="PATH",
        help="configuration file; may be repeated, later ones win",
    )
    parser.add_argument(
        "--config-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="directory of *.conf files read after --config-file",
    )
    parser.add_argument("--debug", action="store_true", help="log at DEBUG level")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    lock = commands.add_parser("lock", help="use the configured lock provider")
    lock_cmds = lock.add_subparsers(dest="lock_command", required=True, metavar="ACTION")

    # lock run's options also parse when given after NAME (see _lock_run_options).
    run_opts = argparse.ArgumentParser(prog="remotefs-aa lock run", add_help=False)
    run_opts.add_argument(
        "-w",
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="give up after this long (exit 75); default: [coordination] lock_acquire_timeout",
    )
    run_opts.add_argument(
        "-n", "--nonblock", action="store_true", help="fail at once (exit 75) if the lock is held"
    )
    run_opts.add_argument(
        "--format",
        choices=("table", "json"),
        default="table",
        help="json: errors as one JSON line on stderr (COMMAND's output is its own)",
    )
    run = lock_cmds.add_parser(
        "run",
        parents=[run_opts],
        help="run a command while holding a named lock (flock(1) across hosts)",
        description="Take lock NAME from the configured provider, run COMMAND, "
        "release the lock, and exit with COMMAND's status. Options may come "
        "before or after NAME; COMMAND comes after --.",
    )
    run.add_argument("name", metavar="NAME", help="lock name (prefixed with remotefs_aa-)")
    run.add_argument(
        "argv", nargs=argparse.REMAINDER, metavar="-- COMMAND...", help="the command to run"
    )
    run.set_defaults(func=cmd_lock_run, own_options=run_opts)

    check = lock_cmds.add_parser(
        "check",
        help="start the provider, take and release a lock, print what it measured",
    )
    check.add_argument(
        "--rounds", type=int, default=20, help="acquire+release rounds to time (default 20)"
    )
    check.add_argument("--format", choices=("table", "json"), default="table")
    check.set_defaults(func=cmd_lock_check)
    filters = commands.add_parser(
        "rootwrap-filters",
        help="print oslo.rootwrap filters for this configuration's allowed_paths",
        description="Print the rootwrap filters the rootwrap_daemon and sudo_rootwrap "
        "modes need, for [privileged] allowed_paths of this configuration. Write "
        "them to the filters_path of [privileged] rootwrap_config.",
    )
    filters.set_defaults(func=cmd_rootwrap_filters)
    volumes.add_parsers(commands)
    return parser


def cmd_rootwrap_filters(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
    """Print the generated rootwrap filters."""
    from remotefs_aa.privsep import rootwrap_filters

    print(rootwrap_filters.generate(conf.privileged.allowed_paths), end="")
    return 0


def load_config(args: argparse.Namespace, conf: cfg.ConfigOpts | None = None) -> cfg.ConfigOpts:
    """Register options, read the files named on the command line, validate."""
    conf = conf if conf is not None else cfg.ConfigOpts()
    oslo_log.register_options(conf)
    cli: list[str] = []
    for path in args.config_file:
        if not os.path.isfile(path):
            raise exception.InvalidConfig("--config-file", path, "no such file")
        cli += ["--config-file", path]
    for path in args.config_dir:
        cli += ["--config-dir", path]
    if args.debug:
        cli.append("--debug")
    default_files = [] if args.config_file or args.config_dir else None
    return service.make_config(cli, conf, default_files)


def _setup_logging(conf: cfg.ConfigOpts, args: argparse.Namespace) -> None:
    oslo_log.setup(conf, "remotefs_aa")
    if not (args.debug or args.verbose):
        # A CLI run shows what it prints plus warnings; -v/--debug show more.
        logging.getLogger().setLevel(logging.WARNING)


def cmd_lock_run(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
    """Hold lock NAME around COMMAND and pass its exit status through."""
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise exception.UsageError("lock run: no COMMAND given after --")
    provider = coordination.start(conf)
    try:
        with coordination.locked(
            args.name,
            blocking=not args.nonblock,
            timeout=args.timeout,
            provider=provider,
            purpose=f"lock run {argv[0]}",
        ):
            return _run_forwarding_signals(args, argv)
    except exception.LockTimeout as exc:
        if args.timeout is None:
            raise  # the wait came from [coordination] lock_acquire_timeout, as the error says
        raise exception.LockTimeout(
            exc.name,
            f"timed out after -w {args.timeout:g} s; another operation still holds it. "
            f"Retry later or give -w a longer wait",
        ) from None
    finally:
        coordination.stop()


def _lock_run_options(args: argparse.Namespace) -> None:
    """Parse ``lock run NAME [OPTIONS] -- COMMAND``'s OPTIONS as ours, not as COMMAND.

    argparse hands everything after NAME to the REMAINDER argument, so
    ``lock run job --format json -- true`` would run ``--format``. What comes
    before the ``--`` is parsed with lock run's own options; without a ``--``
    a leading option is an error, since COMMAND could not be told apart.
    """
    own_options = getattr(args, "own_options", None)
    argv = list(getattr(args, "argv", []))
    if own_options is None or not argv or argv[0] == "--" or not argv[0].startswith("-"):
        return
    if "--" not in argv:
        _, rest = own_options.parse_known_args(argv, namespace=args)
        own_options.error(f"give COMMAND after --: lock run NAME [OPTIONS] -- {' '.join(rest)}")
    end = argv.index("--")
    own_options.parse_args(argv[:end], namespace=args)
    args.argv = argv[end:]


def _run_forwarding_signals(args: argparse.Namespace, argv: list[str]) -> int:
    """Run ``argv``; SIGINT/SIGTERM go to it, and the lock outlives it."""
    try:
        child = subprocess.Popen(argv)
    except OSError as exc:
        code = 127 if isinstance(exc, FileNotFoundError) else 126
        return report_error(args, f"lock run: cannot run {argv[0]!r}: {exc}", code)

    def forward(signum: int, _frame: object) -> None:
        child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        status = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - status if status < 0 else status


def cmd_lock_check(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
    """Start the provider, time acquire+release, report the backend's traits."""
    if args.rounds < 1:
        raise exception.UsageError("lock check: --rounds must be at least 1")
    provider = coordination.load_provider(conf)
    coordination.check_cluster_safety(conf, provider)
    t0 = time.perf_counter()
    provider.start()
    started_ms = (time.perf_counter() - t0) * 1000
    try:
        name = f"{coordination.LOCK_PREFIX}check-{conf.host}-{os.getpid()}"
        samples = []
        for _ in range(args.rounds):
            t = time.perf_counter()
            lock = provider.get_lock(name)
            if not lock.acquire(blocking=True, timeout=conf.coordination.lock_acquire_timeout):
                raise exception.LockTimeout(name, "check lock did not become free")
            owner = lock.is_still_owner()
            lock.release()
            samples.append((time.perf_counter() - t) * 1000)
        heartbeat = bool(getattr(provider, "requires_heartbeat", False))
        report = {
            "lock_provider": conf.coordination.lock_provider,
            "backend": provider.describe(),
            "spans_hosts": provider.spans_hosts,
            "active_active_ready": provider.spans_hosts,
            "heartbeat_thread": heartbeat,
            "heartbeat_interval_s": conf.coordination.heartbeat if heartbeat else None,
            "owner_check": owner,
            "start_ms": round(started_ms, 3),
            "rounds": len(samples),
            "acquire_release_median_ms": round(statistics.median(samples), 3),
            "acquire_release_max_ms": round(max(samples), 3),
        }
        coordination.clean(name, provider=provider)  # one name per run: it would pile up
    finally:
        provider.stop()
    if args.format == "json":
        print(json.dumps(report, indent=2))
    else:
        rows = [
            ("lock provider", report["lock_provider"]),
            ("backend", report["backend"]),
            ("spans hosts", "yes" if report["spans_hosts"] else "no (one host only)"),
            (
                "active-active",
                "ready" if report["spans_hosts"] else "refused: use a shared tooz backend",
            ),
            (
                "heartbeat thread",
                f"yes, every {report['heartbeat_interval_s']} s"
                if heartbeat
                else "no (backend does not need one)",
            ),
            ("still-owner check", "ok" if owner else "FAILED"),
            ("start", f"{report['start_ms']:.2f} ms"),
            (
                "acquire+release",
                f"median {report['acquire_release_median_ms']:.3f} ms, "
                f"max {report['acquire_release_max_ms']:.3f} ms over {len(samples)} rounds",
            ),
        ]
        print(key_values(rows))
    return 0 if owner else EX_FAILURE


def report_error(args: argparse.Namespace, message: str, code: int) -> int:
    """Print one error line on stderr (JSON with ``--format json``); return ``code``."""
    if getattr(args, "format", None) == "json":
        print(json.dumps({"error": message, "exit_code": code}), file=sys.stderr)
    else:
        print(f"remotefs-aa: {message}", file=sys.stderr)
    return code


def _wants_json(argv: Sequence[str]) -> bool:
    """``--format json`` among our own arguments (not in ``lock run``'s COMMAND)."""
    own = list(argv)[: list(argv).index("--")] if "--" in argv else list(argv)
    return "--format=json" in own or ("--format", "json") in itertools.pairwise(own)


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """``parse_args``, with argparse's usage error as one JSON line when JSON was asked for."""
    if not _wants_json(argv):
        args = parser.parse_args(argv)
        _lock_run_options(args)
        return args
    text = io.StringIO()
    try:
        with contextlib.redirect_stderr(text):
            args = parser.parse_args(argv)
            _lock_run_options(args)
            return args
    except SystemExit as exc:
        if not exc.code:
            raise
        lines = text.getvalue().strip().splitlines()
        message = lines[-1].removeprefix("remotefs-aa ").strip() if lines else "bad usage"
        report_error(argparse.Namespace(format="json"), message, EX_USAGE)
        raise SystemExit(EX_USAGE) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _build_parser()
    try:
        args = _parse(parser, argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EX_USAGE
    try:
        conf = load_config(args)
    except (exception.InvalidConfig, cfg.Error, ValueError) as exc:
        return report_error(args, f"configuration error: {exc}", EX_CONFIG)
    _setup_logging(conf, args)
    if args.command != "demo-worker":  # the demo already warned, once
        for warning in service.unknown_options(conf):
            LOG.warning("configuration: %s", warning)
    try:
        return args.func(conf, args)
    except exception.UsageError as exc:
        return report_error(args, str(exc), EX_USAGE)
    except (exception.LockBusy, exception.LockTimeout) as exc:
        return report_error(args, str(exc), EX_TEMPFAIL)
    except (exception.LockBackendUnavailable, exception.LockProviderStartFailed) as exc:
        return report_error(args, str(exc), EX_UNAVAILABLE)
    except (
        exception.PluginNotFound,
        exception.PluginLoadFailed,
        exception.HostLocalLockProvider,
        exception.InvalidConfig,
    ) as exc:
        return report_error(args, f"configuration error: {exc}", EX_CONFIG)
    except exception.RemoteFSAAError as exc:
        return report_error(args, str(exc), EX_FAILURE)
    except Exception as exc:
        if getattr(args, "format", None) != "json":
            raise  # a bug: the traceback is what to report
        LOG.debug("unexpected error", exc_info=True)
        return report_error(args, f"unexpected error: {type(exc).__name__}: {exc}", EX_FAILURE)


if __name__ == "__main__":
    sys.exit(main())
