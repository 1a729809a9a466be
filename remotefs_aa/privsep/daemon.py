"""``remotefs-aa-privsep-helper``: what sudo starts; it becomes oslo.privsep's daemon.

Same command line as oslo.privsep's ``privsep-helper`` (``--privsep_context``,
``--privsep_sock_path``, ``--config-file``), so sudo rules and
``helper_command`` settings look alike, but it trusts its caller less:

* no logging options: sudo lets the service pass any arguments, and
  ``--log-file`` or ``--log-config-append`` would make root write (or, with
  a logging config, run) whatever it likes; the daemon's records go to the
  service over the channel anyway;
* config files (and config dirs) that anyone but root can change, or that
  lie under ``allowed_paths`` (where the daemon writes), are refused: the
  daemon reads ``[privileged] allowed_paths`` from them;
* only this package's two contexts are served, checked by name before any
  import; the service's socket is connected to with the caller's rights
  (SUDO_UID), and must be the caller's;
* before oslo.privsep drops to the context's capabilities, the helper limits
  what any child can ever gain (``caps.harden``): the bounding set, locked
  securebits, no_new_privs;
* the file daemon runs as the service's user (the peer of the socket, from
  ``SO_PEERCRED``) unless ``[remotefs_aa_privsep_files] user`` says
  otherwise, so files it creates belong to the service and its qemu-img
  children run as the service with no capability.

Then it runs the stock ``oslo_privsep.daemon.Daemon``. When the service
closes the connection (or dies) the daemon exits at once, and a watchdog
(``runner.use_watchdog``) kills the qemu-img children still running.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import sys

from oslo_config import cfg
from oslo_privsep import comm
from oslo_privsep import daemon as priv_daemon

from remotefs_aa import exception, opts, privsep
from remotefs_aa.privsep import caps, confine, runner

LOG = logging.getLogger(__name__)


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a unix socket."""
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", data)
    return pid, uid, gid


def _uid_of(user: str) -> int | None:
    import pwd

    try:
        return int(user) if str(user).isdigit() else pwd.getpwnam(str(user)).pw_uid
    except KeyError:
        return None


def _refuse_foreign_configs() -> None:
    """Config files only root controls, and none where the daemon itself may write.

    A file under ``[privileged] allowed_paths`` could have been written
    through the file daemon (and, before this check, handed to a later
    helper as its config, widening allowed_paths to '/').
    """
    allowed = [os.path.realpath(p).rstrip("/") + "/" for p in cfg.CONF.privileged.allowed_paths]
    paths = [*cfg.CONF.config_file, *(cfg.CONF.config_dir or [])]
    for path in paths:
        if os.path.isdir(path):
            paths.extend(os.path.join(path, name) for name in sorted(os.listdir(path)))
    for path in paths:
        confine.root_controlled(path)
        real = os.path.realpath(path)
        for base in allowed:
            if real.startswith(base):
                raise exception.PrivilegedArgumentRefused(
                    f"refusing config {path!r}: it lies under [privileged] allowed_paths "
                    f"({base.rstrip('/')}), where the privileged daemon itself writes files; "
                    f"keep configs in a root-only directory such as /etc/remotefs_aa"
                )


def _connect_as_caller(path: str) -> socket.socket:
    """Connect to the service's socket with the *caller's* rights, then check who listens.

    sudo lets the service name any socket path; connecting as root could
    reach sockets only root may use. The caller is SUDO_UID/SUDO_GID (sudo
    sets them) or our own uid; the listener must be that user.
    """
    uid = int(os.environ.get("SUDO_UID", os.getuid()))
    gid = int(os.environ.get("SUDO_GID", os.getgid()))
    sock = socket.socket(socket.AF_UNIX)
    saved = (os.geteuid(), os.getegid())
    try:
        os.setegid(gid)
        os.seteuid(uid)
        try:
            sock.connect(path)
        finally:
            os.seteuid(saved[0])
            os.setegid(saved[1])
    except OSError as exc:
        sock.close()
        sys.exit(f"{privsep.HELPER_NAME}: cannot connect to {path!r} as uid {uid}: {exc}")
    _pid, peer_uid, _gid = peer_credentials(sock)
    if peer_uid != uid:
        sock.close()
        sys.exit(f"{privsep.HELPER_NAME}: {path!r} is not the caller's socket (uid {peer_uid})")
    return sock


def helper_main() -> None:
    """Parse, check, connect, harden, fork; the child serves until the service leaves."""
    cfg.CONF.register_cli_opts(
        [
            cfg.StrOpt("privsep_context", required=True),
            cfg.StrOpt("privsep_sock_path", required=True),
        ]
    )
    opts.register_opts(cfg.CONF)
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    cfg.CONF(args=sys.argv[1:], project="privsep", default_config_files=[])
    try:
        _refuse_foreign_configs()
    except exception.PrivilegedArgumentRefused as exc:
        sys.exit(f"{privsep.HELPER_NAME}: {exc}")

    name = cfg.CONF.privsep_context
    # Checked by name before anything is imported: an import runs code as root.
    known = {ctx.pypath: ctx for ctx in privsep.CONTEXTS.values()}
    if name not in known:
        sys.exit(f"{privsep.HELPER_NAME}: {name!r} is not one of remotefs_aa's privsep contexts")
    context = known[name]

    sock = _connect_as_caller(cfg.CONF.privsep_sock_path)
    priv_daemon.set_cloexec(sock)
    _pid, uid, gid = peer_credentials(sock)

    section = context.cfg_section
    if context is privsep.file_pctxt and uid != 0:
        configured = cfg.CONF[section].user
        if configured is None:
            cfg.CONF.set_override("user", str(uid), group=section)
            cfg.CONF.set_override("group", str(gid), group=section)
        elif _uid_of(configured) == 0:
            # A root file daemon would make root-owned files wherever the
            # service points it, config files that pass root_controlled included.
            sys.exit(
                f"{privsep.HELPER_NAME}: [{section}] user = {configured} would run the file "
                f"daemon as root for an unprivileged service (uid {uid}); leave it unset "
                f"(the daemon then runs as the service's user)"
            )
    keep = [int(c) for c in cfg.CONF[section].capabilities]
    if context is privsep.sys_admin_pctxt:
        runner.child_capabilities = keep  # mount(8) and the FUSE client need them
    else:
        # (Not the mount daemon's: a FUSE client it starts must outlive it.)
        runner.use_watchdog = True
    caps.harden(keep, allow_ambient=context is privsep.sys_admin_pctxt)
    channel = comm.ServerChannel(sock)

    if os.fork() != 0:
        return  # the helper exits; the daemon lives on in the child

    priv_daemon.replace_logging(priv_daemon.PrivsepLogHandler(channel))
    try:
        priv_daemon.Daemon(channel, context).run()
    except Exception as exc:
        LOG.exception(exc)
        os._exit(1)
    # The service closed the connection (or died): exit now, without waiting
    # for calls still running; the watchdog then ends their children.
    os._exit(0)
