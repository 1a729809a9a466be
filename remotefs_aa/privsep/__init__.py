"""Everything remotefs_aa does as root, on one screen.

Two privilege contexts, each with only the capabilities its job needs and
its own config section (``helper_command``, ``user``, ``thread_pool_size``):

* ``sys_admin_pctxt`` (``[remotefs_aa_privsep_mount]``): CAP_SYS_ADMIN, for
  mount and umount of shares;
* ``file_pctxt`` (``[remotefs_aa_privsep_files]``): CAP_CHOWN,
  CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER, for qemu-img on
  root-owned images and for file operations.

The entrypoints live in ``mount.py``, ``qemu.py`` and ``files.py``; each takes
typed arguments, checks them with ``confine.py`` inside the daemon, and runs
one fixed command or system call. None runs an arbitrary argv.
"""

from __future__ import annotations

import copy
import functools
import os
import shlex
import shutil
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from oslo_config import cfg
from oslo_privsep import capabilities as caps
from oslo_privsep import daemon as priv_daemon
from oslo_privsep import priv_context

from remotefs_aa import exception, opts
from remotefs_aa.privsep import runner
from remotefs_aa.privsep.lean import HELPER_NAME, LeanContext

F = TypeVar("F", bound=Callable[..., Any])

MOUNT_SECTION = "remotefs_aa_privsep_mount"
FILES_SECTION = "remotefs_aa_privsep_files"

MOUNT_CAPS = [caps.CAP_SYS_ADMIN]
FILES_CAPS = [caps.CAP_CHOWN, caps.CAP_DAC_OVERRIDE, caps.CAP_DAC_READ_SEARCH, caps.CAP_FOWNER]

sys_admin_pctxt = LeanContext(
    "remotefs_aa",
    cfg_section=MOUNT_SECTION,
    pypath=__name__ + ".sys_admin_pctxt",
    capabilities=MOUNT_CAPS,
)

file_pctxt = LeanContext(
    "remotefs_aa",
    cfg_section=FILES_SECTION,
    pypath=__name__ + ".file_pctxt",
    capabilities=FILES_CAPS,
)

_CAP_NAMES = {v: k for k, v in caps.CAPS_BYNAME.items()}


def entrypoint(ctx: priv_context.PrivContext) -> Callable[[F], F]:
    """``ctx.entrypoint`` plus a clear error when the daemon cannot start.

    oslo.privsep reports a helper that fails (sudo refuses, wrong path) as
    FailedToDropPrivileges with no hint; callers get
    PrivilegedHelperUnavailable naming the context, the command and the fix.
    """

    def decorate(func: F) -> F:
        inner = ctx.entrypoint(func)

        @functools.wraps(func)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return inner(*args, **kwargs)
            except priv_daemon.FailedToDropPrivileges as exc:
                raise exception.PrivilegedHelperUnavailable(
                    f"could not start the privileged daemon [{ctx.cfg_section}] with "
                    f"{ctx.conf.helper_command!r}: {exc}. Check [privileged] root_helper "
                    f"and that sudo allows {HELPER_NAME} (etc/remotefs_aa/sudoers.d)"
                ) from exc

        # The daemon looks entrypoints up by name and checks this marker.
        setattr(call, priv_context._ENTRYPOINT_ATTR, ctx)
        return call  # type: ignore[return-value]

    return decorate


CONTEXTS = {MOUNT_SECTION: sys_admin_pctxt, FILES_SECTION: file_pctxt}

# Inside the daemon the options come from the config files the helper
# was started with, parsed into the global CONF.
opts.register_opts(cfg.CONF)


class Settings:
    """The values the entrypoints enforce, read where they run.

    In the daemon they come from the global CONF (the service's own config
    files, passed to the helper); in ``direct`` mode from the service's
    ConfigOpts through :func:`init`.
    """

    def __init__(self, conf: cfg.ConfigOpts) -> None:
        group = conf.privileged
        self.allowed_paths: list[str] = [p for p in group.allowed_paths if p]
        self.command_timeout: int = group.command_timeout
        self.info_max_memory: int = group.qemu_img_info_max_memory
        self.info_max_cpu: int = group.qemu_img_info_max_cpu


_settings: Settings | None = None


def settings() -> Settings:
    """Current settings; loaded from the global CONF on first use."""
    global _settings
    if _settings is None:
        _settings = Settings(cfg.CONF)
    return _settings


def _tool(name: str) -> str:
    """A console script of this environment (the venv's bin dir first)."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    return here if os.path.exists(here) else (shutil.which(name) or here)


def _helper_command(conf: cfg.ConfigOpts) -> str:
    """``[root_helper] <venv>/bin/remotefs-aa-privsep-helper --config-file ...``."""
    argv = [*shlex.split(conf.privileged.root_helper or ""), _tool(HELPER_NAME)]
    return shlex.join([*argv, *opts.config_file_args(conf)])


def init(conf: cfg.ConfigOpts) -> None:
    """Choose how privileged calls run, from ``[privileged] mode``.

    ``privsep``: each context starts its daemon on first use through
    ``helper_command`` (default: root_helper + remotefs-aa-privsep-helper + this
    service's config files; set it in the context's section to override).
    ``direct``: entrypoints run in this process, which must be root.
    """
    global _settings
    mode = conf.privileged.mode
    if mode == "direct":
        if os.geteuid() != 0:
            raise exception.InvalidConfig(
                "[privileged] mode", mode, "needs a service running as root; use privsep"
            )
        for ctx in CONTEXTS.values():
            ctx.set_client_mode(False)
        _settings = Settings(conf)
        runner.set_executor(runner.Executor())
        return
    if mode in ("rootwrap_daemon", "sudo_rootwrap"):
        # The entrypoint bodies run in this process (arguments are checked
        # here, and again by the rootwrap filters); their commands gain root
        # through rootwrap.
        for ctx in CONTEXTS.values():
            ctx.set_client_mode(False)
        _settings = Settings(conf)
        helper = shlex.split(conf.privileged.root_helper or "")
        config = conf.privileged.rootwrap_config
        if not os.path.isfile(config):
            raise exception.InvalidConfig(
                "[privileged] rootwrap_config", config, "no such file; see etc/remotefs_aa/"
            )
        for allowed in _settings.allowed_paths:
            real = os.path.realpath(allowed).rstrip("/") + "/"
            if os.path.realpath(config).startswith(real):
                raise exception.InvalidConfig(
                    "[privileged] rootwrap_config",
                    config,
                    f"lies under allowed path {allowed}, so the privileged commands "
                    f"could rewrite their own filters; keep it in a root-only "
                    f"directory such as /etc/remotefs_aa",
                )
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
        cfg.CONF.set_override("helper_command", own or _helper_command(conf), group=section)


def _section_value(conf: cfg.ConfigOpts, section: str, key: str) -> object:
    try:
        return conf[section][key]
    except (cfg.NoSuchOptError, cfg.NoSuchGroupError):
        return None


def stop() -> None:
    """Stop the daemons this process started (they also die with it)."""
    global _settings
    _settings = None
    for ctx in CONTEXTS.values():
        if ctx.client_mode and ctx.channel is not None:
            ctx.stop()


def register_opts(conf: cfg.ConfigOpts) -> None:
    """Register the privsep context sections on a service's ConfigOpts."""
    for section, opt_list in list_opts():
        conf.register_opts(opt_list, group=section)


def list_opts() -> list[tuple[str, list[cfg.Opt]]]:
    """The privsep context sections, with each context's own capabilities."""
    result = []
    for section, capset in ((MOUNT_SECTION, MOUNT_CAPS), (FILES_SECTION, FILES_CAPS)):
        section_opts = copy.deepcopy(priv_context.OPTS)
        for opt in section_opts:
            if opt.dest == "capabilities":
                opt.default = [_CAP_NAMES.get(c, str(c)) for c in capset]
        result.append((section, section_opts))
    return result


def process_info() -> dict:
    """Pid, uid and effective capability mask of the calling process.

    Called by each context's ``daemon_info`` entrypoint, inside its daemon.
    """
    cap_eff = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                cap_eff = int(line.split()[1], 16)
    return {"pid": os.getpid(), "uid": os.getuid(), "cap_eff": cap_eff}
