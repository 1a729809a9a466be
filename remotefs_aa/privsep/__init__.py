"""Everything remotefs_aa does as root, on one screen.

Two privilege contexts (stock oslo.privsep: its client, wire format and
daemon), each with only the capabilities its job needs and its own config
section (``helper_command``, ``user``, ``thread_pool_size``):

* ``sys_admin_pctxt`` (``[remotefs_aa_privsep_mount]``): CAP_SYS_ADMIN, for
  mount and umount of shares;
* ``file_pctxt`` (``[remotefs_aa_privsep_files]``): CAP_CHOWN,
  CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER, for qemu-img on images
  the service cannot open itself and for file operations. Its daemon runs
  as the *service's* user (uid 0 only if the service is root), so every
  file it creates belongs to the service, and its qemu-img children run as
  that user with no capability.

The entrypoints live in ``mount.py``, ``qemu.py`` and ``files.py``; each takes
typed arguments, checks them inside the daemon (``confine.py``,
``images.py``), opens what it acts on itself, beneath an allowed base and
without following a link, and runs one fixed command or system call by
descriptor. None runs an arbitrary argv. ``daemon.py`` is the helper that
sudo starts: it refuses configs others can write, hardens what children can
inherit (``caps.py``) and then runs oslo.privsep's daemon.
"""

from __future__ import annotations

import functools
import logging
import os
import shlex
import shutil
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from oslo_config import cfg
from oslo_privsep import capabilities as pcaps
from oslo_privsep import daemon as priv_daemon
from oslo_privsep import priv_context

from remotefs_aa import exception
from remotefs_aa.privsep import fence

LOG = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

HELPER_NAME = "remotefs-aa-privsep-helper"
MOUNT_SECTION = "remotefs_aa_privsep_mount"
FILES_SECTION = "remotefs_aa_privsep_files"

MOUNT_CAPS = [pcaps.CAP_SYS_ADMIN]
FILES_CAPS = [
    pcaps.CAP_CHOWN,
    pcaps.CAP_DAC_OVERRIDE,
    pcaps.CAP_DAC_READ_SEARCH,
    pcaps.CAP_FOWNER,
]


class _Channel(priv_daemon.RootwrapClientChannel):
    """oslo.privsep's client channel; a daemon lost mid-call is PrivilegedDaemonLost."""

    def remote_call(
        self, name: str, args: tuple, kwargs: dict, timeout: float | None = None
    ) -> Any:
        try:
            if not self.running:
                # The reader ended between the context's check and this call.
                raise OSError("the privileged daemon's channel is closed")
            return super().remote_call(name, args, kwargs, timeout)
        except OSError as exc:
            # The channel's reader fails every waiting call with a plain
            # OSError when the daemon goes away, and a send to a daemon
            # that is gone fails with a ConnectionError; an entrypoint's own
            # FileNotFoundError & co. arrive as their subclasses.
            lost = type(exc) is OSError or isinstance(exc, ConnectionError)
            if lost and not self.running:
                raise exception.PrivilegedDaemonLost(
                    self._section,
                    exc,  # type: ignore[attr-defined]
                ) from exc
            raise

    def _reader_main(self, reader: Any) -> None:
        """oslo.privsep's reader, which also fails the waiting calls when the read fails.

        The stock reader handles EOF only. A daemon killed while a request
        waits unread in its socket resets the connection instead
        (ECONNRESET), and a garbled reply raises in the deserializer: the
        stock thread then dies with its waiters left waiting for good and
        the channel still marked running, so the context never restarts
        its daemon. Here both end like EOF: every waiting call fails with a
        plain OSError (PrivilegedDaemonLost above) and the next call starts
        a new daemon.
        """
        try:
            super()._reader_main(reader)
        except Exception as exc:  # whatever ended the reader ends the channel
            section = getattr(self, "_section", "privileged daemon")
            LOG.warning("[%s] lost the privileged daemon's channel: %s", section, exc)
            lost = OSError(f"the privileged daemon's channel failed: {exc!r}")
            with self.lock:
                for mbox in self.outstanding_msgs.values():
                    mbox.set_exception(lost)
                self.running = False


class Context(priv_context.PrivContext):
    """A stock PrivContext whose daemon is our helper and whose failures are our errors."""

    def start(self, method: priv_context.Method = priv_context.Method.ROOTWRAP) -> None:
        """Start the daemon through ``helper_command`` (forking is not offered)."""
        if method is not priv_context.Method.ROOTWRAP:
            raise ValueError(f"{self.cfg_section}: only the helper command starts this daemon")
        with self.start_lock:
            if self.channel is not None:
                return
            said = _HelperWords()
            try:
                with said:
                    channel = _Channel(context=self)
            except priv_daemon.FailedToDropPrivileges as exc:
                why = f" ({said.last()})" if said.last() else ""
                raise exception.PrivilegedHelperUnavailable(
                    f"could not start the privileged daemon [{self.cfg_section}] with "
                    f"{self.conf.helper_command!r}: {exc}{why}. Check [privileged] "
                    f"root_helper and that sudo allows {HELPER_NAME} (etc/remotefs_aa/sudoers.d)"
                ) from exc
            channel._section = self.cfg_section  # type: ignore[attr-defined]
            self.channel = channel


class _HelperWords(logging.Handler):
    """Collects what the helper printed while it started (oslo.privsep logs its stderr)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        # oslo.privsep logs through an oslo.log adapter; handlers live on its logger.
        self._logger = getattr(priv_daemon.LOG, "logger", priv_daemon.LOG)

    def __enter__(self) -> _HelperWords:
        self._logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            # The helper's stderr is read by a thread of oslo.privsep; give
            # it a moment to pass on the last line the helper wrote.
            deadline = time.monotonic() + 1.0
            while not self.lines and time.monotonic() < deadline:
                time.sleep(0.02)
        self._logger.removeHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if text.startswith("privsep log: "):
            self.lines.append(text[len("privsep log: ") :])

    def last(self) -> str:
        return self.lines[-1] if self.lines else ""


sys_admin_pctxt = Context(
    "remotefs_aa",
    cfg_section=MOUNT_SECTION,
    pypath=__name__ + ".sys_admin_pctxt",
    capabilities=MOUNT_CAPS,
)

file_pctxt = Context(
    "remotefs_aa",
    cfg_section=FILES_SECTION,
    pypath=__name__ + ".file_pctxt",
    capabilities=FILES_CAPS,
)

CONTEXTS = {MOUNT_SECTION: sys_admin_pctxt, FILES_SECTION: file_pctxt}

#: Worker threads per daemon. oslo.privsep's default is the CPU count, but a
#: fence_extend sent while long commands run must find a free worker, or the
#: commands are ended at their old deadline.
THREAD_POOL_SIZE = 32
for _section in CONTEXTS:
    cfg.CONF.set_default("thread_pool_size", THREAD_POOL_SIZE, group=_section)
_CAP_NAMES = {v: k for k, v in pcaps.CAPS_BYNAME.items()}


def entrypoint(ctx: Context) -> Callable[[F], F]:
    """``ctx.entrypoint``, fenced by the caller's lease, body reachable as ``__wrapped__``.

    Called inside a locked operation (``fence.current()``), the call is
    refused once the lease ran out or a lock was lost, and otherwise carries
    ``(token, deadline)`` to where the body runs (the daemon, or this process
    in ``direct`` mode and the rootwrap modes), which refuses to start after
    the deadline and ends a running child when it passes. ``call.local`` is
    the same call with the body run in this process (secure file operations,
    as the service's user), fenced alike.
    """

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def body(*args: Any, _fence: tuple[str, float] | None = None, **kwargs: Any) -> Any:
            if _fence is None:
                return func(*args, **kwargs)
            token, deadline = _fence
            with fence.enforced(token, deadline, func.__name__):
                return func(*args, **kwargs)

        remote = ctx.entrypoint(body)

        def fenced(
            target: Callable[..., Any],
            senders: Callable[[], tuple[Callable[..., Any], Callable[..., Any]]],
            prepare: Callable[[], None] = lambda: None,
        ) -> Callable[..., Any]:
            @functools.wraps(func)
            def call(*args: Any, **kwargs: Any) -> Any:
                current = fence.current()
                if current is None or "_fence" in kwargs:
                    return target(*args, **kwargs)
                hook = fence.on_step
                if hook is not None:
                    hook("before", func.__name__)
                try:
                    if not fence.ENFORCE:
                        return target(*args, **kwargs)
                    # The daemon first (a slow start, sudo or a busy host, is
                    # not the step's time: the heartbeat renews meanwhile), then
                    # the deadline as it is now.
                    prepare()
                    current.check(func.__name__)
                    token = current.begin(senders())
                    try:
                        return target(*args, _fence=(token, current.deadline), **kwargs)
                    finally:
                        current.end(token)
                finally:
                    if hook is not None:
                        hook("after", func.__name__)

            return call

        call = fenced(remote, lambda: _senders(ctx), lambda: _started(ctx))
        # The same step run in this process (secure file operations run the
        # bodies as the service's user): fenced alike, its deadline moved or
        # ended here by the heartbeat thread.
        call.local = fenced(body, lambda: (fence.extend, fence.abort))  # type: ignore[attr-defined]

        # The daemon finds the entrypoint by this module attribute and checks
        # the marker oslo.privsep set on what ctx.entrypoint returned.
        call.__dict__.update(remote.__dict__)
        call.__wrapped__ = func  # type: ignore[attr-defined]
        return call  # type: ignore[return-value]

    return decorate


def _started(ctx: Context) -> None:
    """Start (or restart) ``ctx``'s daemon now if the call would (as oslo.privsep does)."""
    if not ctx.client_mode:
        return
    if ctx.channel is not None and not ctx.channel.running:
        LOG.warning("privileged daemon [%s] is gone; starting a new one", ctx.cfg_section)
        ctx.stop()
    if ctx.channel is None:
        ctx.start()


def _senders(ctx: Context) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The context's fence_extend / fence_abort entrypoints (their modules import us)."""
    if ctx is sys_admin_pctxt:
        from remotefs_aa.privsep import mount as module
    else:
        from remotefs_aa.privsep import files as module  # type: ignore[no-redef]
    return module.fence_extend, module.fence_abort


class Settings:
    """The values the entrypoints enforce, read where they run.

    In the daemon they come from the config files the helper was started
    with (root's); in ``direct`` mode, the rootwrap modes and in-process
    file operations from the service's ConfigOpts through :func:`use`.
    """

    def __init__(self, conf: cfg.ConfigOpts) -> None:
        group = conf.privileged
        self.allowed_paths: list[str] = [p for p in group.allowed_paths if p]
        self.command_timeout: int = group.command_timeout
        self.info_max_memory: int = group.qemu_img_info_max_memory
        self.info_max_cpu: int = group.qemu_img_info_max_cpu


_settings: Settings | None = None
_settings_lock = threading.Lock()


def settings() -> Settings:
    """Current settings; in the daemon, loaded from its config on first use."""
    global _settings
    if _settings is None:
        with _settings_lock:
            if _settings is None:
                _settings = Settings(cfg.CONF)
    return _settings


def use(conf: cfg.ConfigOpts) -> None:
    """Enforce ``conf``'s ``[privileged]`` values for entrypoints run in this process."""
    global _settings
    _settings = Settings(conf)


def _tool(name: str) -> str:
    """A console script of this environment (the venv's bin dir first)."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    return here if os.path.exists(here) else (shutil.which(name) or here)


def helper_command(conf: cfg.ConfigOpts) -> str:
    """``[root_helper] <venv>/bin/remotefs-aa-privsep-helper --config-file ...``."""
    from remotefs_aa import opts

    argv = [*shlex.split(conf.privileged.root_helper or ""), _tool(HELPER_NAME)]
    return shlex.join([*argv, *opts.config_file_args(conf)])


def init(conf: cfg.ConfigOpts) -> None:
    """Choose how privileged calls run, from ``[privileged] mode``.

    ``privsep``: each context starts its daemon on first use through
    ``helper_command`` (default: root_helper + remotefs-aa-privsep-helper + this
    service's config files; set it in the context's section to override).
    ``direct``: entrypoints run in this process, which must be root.
    ``rootwrap_daemon`` / ``sudo_rootwrap``: legacy; the bodies run here and
    their commands gain root through rootwrap (see ``legacy.py``).
    """
    from remotefs_aa.privsep import legacy, runner

    mode = conf.privileged.mode
    if mode == "privsep" and conf.privileged.use_rootwrap_daemon:
        mode = "rootwrap_daemon"
    if mode == "direct":
        if os.geteuid() != 0:
            raise exception.InvalidConfig(
                "[privileged] mode", mode, "needs a service running as root; use privsep"
            )
        for ctx in CONTEXTS.values():
            ctx.set_client_mode(False)
        use(conf)
        runner.set_executor(runner.Executor())
        return
    if mode in ("rootwrap_daemon", "sudo_rootwrap"):
        for ctx in CONTEXTS.values():
            ctx.set_client_mode(False)
        use(conf)
        helper = shlex.split(conf.privileged.root_helper or "")
        config = conf.privileged.rootwrap_config
        if not os.path.isfile(config):
            raise exception.InvalidConfig(
                "[privileged] rootwrap_config", config, "no such file; see etc/remotefs_aa/"
            )
        for allowed in settings().allowed_paths:
            real = os.path.realpath(allowed).rstrip("/") + "/"
            if os.path.realpath(config).startswith(real):
                raise exception.InvalidConfig(
                    "[privileged] rootwrap_config",
                    config,
                    f"lies under allowed path {allowed}, so the privileged commands "
                    f"could rewrite their own filters; keep it in a root-only "
                    f"directory such as /etc/remotefs_aa",
                )
        LOG.warning(legacy.WARNING, mode)
        if mode == "rootwrap_daemon":
            runner.set_executor(
                runner.RootwrapDaemonExecutor(helper, _tool("oslo-rootwrap-daemon"), config)
            )
        else:
            runner.set_executor(runner.SudoRootwrapExecutor(helper, _tool("oslo-rootwrap"), config))
        return
    runner.set_executor(runner.Executor())
    for section, ctx in CONTEXTS.items():
        ctx.set_client_mode(True)
        own = _section_value(conf, section, "helper_command")
        cfg.CONF.set_override("helper_command", own or helper_command(conf), group=section)


def _section_value(conf: cfg.ConfigOpts, section: str, key: str) -> object:
    try:
        return conf[section][key]
    except (cfg.NoSuchOptError, cfg.NoSuchGroupError):
        return None


def stop() -> None:
    """Stop the daemons this process started (they also exit when it does)."""
    global _settings
    _settings = None
    for ctx in CONTEXTS.values():
        if ctx.client_mode and ctx.channel is not None:
            ctx.stop()


def register_opts(conf: cfg.ConfigOpts) -> None:
    """Register the privsep context sections on a service's ConfigOpts."""
    for section, opt_list in list_opts():
        if section not in conf:
            conf.register_opts(opt_list, group=section)


def list_opts() -> list[tuple[str, list[cfg.Opt]]]:
    """The privsep context sections, with each context's own capabilities."""
    import copy

    result = []
    for section, capset in ((MOUNT_SECTION, MOUNT_CAPS), (FILES_SECTION, FILES_CAPS)):
        section_opts = copy.deepcopy(priv_context.OPTS)
        for opt in section_opts:
            if opt.dest == "capabilities":
                opt.default = [_CAP_NAMES.get(c, str(c)) for c in capset]
            elif opt.dest == "thread_pool_size":
                opt.default = THREAD_POOL_SIZE
        result.append((section, section_opts))
    return result


def process_info() -> dict:
    """Pid, uid, capability masks and no_new_privs of the calling process.

    Called by each context's ``daemon_info`` entrypoint, inside its daemon.
    """
    from remotefs_aa.privsep import caps

    status = caps.process_status()
    return {
        "pid": os.getpid(),
        "uid": os.getuid(),
        "gid": os.getgid(),
        "cap_eff": int(status.get("CapEff", "0"), 16),
        "cap_bnd": int(status.get("CapBnd", "0"), 16),
        "no_new_privs": status.get("NoNewPrivs") == "1",
    }
