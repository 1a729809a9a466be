"""A hostile service user, root-owned victims, and the observers that judge an attack.

The attack suite (``test_privileged_attacks.py``) plays a compromised volume
service: an unprivileged process whose only way to root is the privsep
daemons, and which calls their entrypoints directly with whatever arguments
and files it likes. Three pieces, each usable on its own:

* :class:`HostileService` runs :data:`AGENT` as the service user
  (``runuser -u <user> -- <venv>/bin/python -c AGENT <config>``, privsep mode,
  ``sudo -n`` root helper, a root-owned config). The test sends it short
  Python snippets, one JSON line each, which run *as the service user* with
  the entrypoints and the helpers of :data:`AGENT` in scope and answer
  ``result``; state persists between snippets (one agent, one pair of
  daemons, for the whole module).
* :class:`Victims` makes fresh root-owned directories under ``/var/tmp``
  with root-only files of random bytes, remembers every byte (sha256), owner
  and mode, and reports what changed, appeared or vanished.
* :class:`Inotify` watches the victim directories, so an attack that makes
  root merely *open* or *read* a victim (qemu-img following a backing file)
  leaves evidence even when nothing changes. Only root can open the victims
  (0600, root-owned), so an event during an attack is root acting for the
  service.

Nothing here touches /etc, /root or any system file: every victim lives in a
directory the test made and removes.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import queue
import secrets
import shutil
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

#: The hostile service. Its helpers are the service user's own means: files
#: in a directory it owns, qemu-img and qemu-io as itself, renameat2.
AGENT = textwrap.dedent(
    r'''
    import base64, ctypes, hashlib, json, os, subprocess, sys, threading, time, traceback
    from oslo_config import cfg
    from remotefs_aa import exception, opts, privsep
    from remotefs_aa.privsep import files, mount, qemu

    conf_file = sys.argv[1]
    _proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever else prints goes to stderr, not into the protocol
    conf = cfg.ConfigOpts(); opts.register_opts(conf); privsep.register_opts(conf)
    conf(["--config-file", conf_file], default_config_files=[])
    privsep.init(conf)
    MiB = 1 << 20
    REFUSALS = (exception.PrivilegedArgumentRefused, exception.InvalidImage)

    def raw_call(ctx, name):
        """Call daemon function ``name`` over the channel, whether or not it is offered."""
        def call(*args, **kwargs):
            if ctx.channel is None:
                ctx.start()
            try:
                return ctx.channel.remote_call(name, args, kwargs, None)
            except (ImportError, NameError) as exc:  # the daemon has no such entrypoint
                raise exception.PrivilegedArgumentRefused(f"{name}: {exc}") from None
        return call

    # Entrypoints that no longer exist are still asked for, straight over the
    # channel: a hostile service is not limited to the functions we ship.
    for _module, _name in ((files, "chown"), (files, "chmod")):
        if not hasattr(_module, _name):
            setattr(_module, _name, raw_call(privsep.file_pctxt, f"{_module.__name__}.{_name}"))

    def attempt(fn, *args, **kwargs):
        """Call an entrypoint; what happened, as data."""
        try:
            return {"outcome": "done", "value": fn(*args, **kwargs)}
        except REFUSALS as exc:
            return {"outcome": "refused", "error": f"{type(exc).__name__}: {exc}"[:600]}
        except exception.PrivilegedCommandFailed as exc:
            return {"outcome": "failed", "error": f"{type(exc).__name__}: {exc}"[:600]}
        except Exception as exc:
            return {"outcome": "error", "error": f"{type(exc).__name__}: {exc}"[:600]}

    def sh(*argv, check=True, **kw):
        """A command as the service user itself."""
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=120, **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{argv} failed {proc.returncode}: {proc.stderr.strip()}")
        return {"rc": proc.returncode, "out": proc.stdout, "err": proc.stderr}

    def nobacking(path):
        """A json: filename that opens the qcow2 at ``path`` without its backing file."""
        spec = {"driver": "qcow2", "file": {"driver": "file", "filename": path},
                "backing": None}
        return "json:" + json.dumps(spec)

    def overlay(path, backing, fmt="raw", size=MiB, pattern=None, length=64 * 1024):
        """A qcow2 at ``path`` naming ``backing`` (never opened here: -u).

        ``fmt=None`` leaves no backing format in the header (qemu would probe);
        ``pattern`` writes that byte into the first ``length`` bytes (without
        opening the backing file, which the service cannot read).
        """
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", backing,
           "-F", fmt or "raw", path, str(size))
        if fmt is None:
            drop_backing_format(path)
        if pattern is not None:
            sh("qemu-io", "-c", f"write -P {pattern} 0 {length}", nobacking(path))
        return path

    def drop_backing_format(path):
        """Retype the backing-format header extension as an unknown one (qemu skips it)."""
        with open(path, "r+b") as f:
            data = bytearray(f.read(65536))
            at = data.find(bytes.fromhex("e2792aca"))
            assert at > 0, "no backing format extension"
            data[at:at + 4] = bytes.fromhex("0000beef")
            f.seek(0); f.write(data)

    def replace_bytes(path, old, new):
        """Swap a name in an image header for another of the same length."""
        old, new = old.encode(), new.encode()
        assert len(old) == len(new), (old, new)
        with open(path, "r+b") as f:
            data = f.read()
            assert data.count(old) >= 1, f"{old!r} not in {path}"
            f.seek(0); f.write(data.replace(old, new))

    def extract(path, fmt="qcow2", start=0, length=None, chain=False):
        """Bytes the service itself can read from an image it owns (no backing)."""
        out = path + ".extract"
        source = path if chain or fmt != "qcow2" else nobacking(path)
        argv = ["qemu-img", "convert", "-O", "raw"]
        if source == path:
            argv += ["-f", fmt]
        sh(*argv, source, out)
        with open(out, "rb") as f:
            f.seek(start)
            data = f.read() if length is None else f.read(length)
        os.unlink(out)
        return data

    def digest(data):
        return hashlib.sha256(data).hexdigest()

    def read_own(path):
        """Read a file the daemon made (asking it to hand the file over, where it still can)."""
        if os.stat(path).st_uid != os.getuid():
            attempt(files.chown, path, os.getuid(), os.getgid())
        with open(path, "rb") as f:
            return f.read()

    _libc = ctypes.CDLL(None, use_errno=True)
    _AT_FDCWD = -100
    _RENAME_EXCHANGE = 2

    def exchange(a, b):
        """renameat2(RENAME_EXCHANGE): swap two names atomically."""
        if hasattr(_libc, "renameat2"):
            rc = _libc.renameat2(_AT_FDCWD, a.encode(), _AT_FDCWD, b.encode(), _RENAME_EXCHANGE)
        else:  # x86_64 syscall number
            rc = _libc.syscall(316, _AT_FDCWD, a.encode(), _AT_FDCWD, b.encode(),
                               _RENAME_EXCHANGE)
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), a)

    def race(real_dir, link, fn, seconds=3.0, after=None):
        """Swap ``real_dir`` and ``link`` in a tight loop while ``fn()`` is called.

        Returns how many calls and swaps there were and each call's outcome
        counted; ``after(result)`` runs after each call (e.g. to undo a mount).
        The real directory is back under its own name afterwards.
        """
        stop = threading.Event()
        swaps = [0]

        def swapper():
            while not stop.is_set():
                exchange(real_dir, link)
                swaps[0] += 1

        thread = threading.Thread(target=swapper, daemon=True)
        outcomes, errors, calls = {}, {}, 0
        end = time.monotonic() + seconds
        thread.start()
        try:
            while time.monotonic() < end:
                result = attempt(fn)
                calls += 1
                outcomes[result["outcome"]] = outcomes.get(result["outcome"], 0) + 1
                if "error" in result:
                    errors.setdefault(result["outcome"], result["error"][:200])
                if after is not None:
                    after(result)
        finally:
            stop.set()
            thread.join()
            if os.path.islink(real_dir):
                exchange(real_dir, link)
        return {"calls": calls, "swaps": swaps[0], "outcomes": outcomes, "errors": errors}

    def mounts_under(prefix):
        """Mount points under ``prefix``, as this process sees them."""
        found = []
        with open("/proc/self/mountinfo") as f:
            for line in f:
                point = line.split()[4].replace("\\040", " ")
                if point == prefix or point.startswith(prefix.rstrip("/") + "/"):
                    found.append(point)
        return found

    G = dict(globals())
    G["G"] = G  # snippets' threads store results here
    for line in sys.stdin:
        request = json.loads(line)
        G.update(request["params"])
        G["result"] = None
        try:
            exec(request["code"], G)
            reply = {"ok": True, "result": G.get("result")}
        except BaseException as exc:
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                     "traceback": traceback.format_exc()[-3000:]}
        _proto.write(json.dumps(reply, default=repr) + "\n")
    privsep.stop()
    '''
)


class AgentError(RuntimeError):
    """A snippet raised in the hostile service (a bug in the attack, not a verdict)."""


class HostileService:
    """The agent process, as the service user; :meth:`run` sends it one snippet."""

    def __init__(self, user: str, venv: str, config: str, cwd: str = "/") -> None:
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            ["runuser", "-u", user, "--", f"{venv}/bin/python", "-c", AGENT, config],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            cwd=cwd,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def run(self, code: str, timeout: float = 180, **params: object) -> object:
        """Run ``code`` as the service; return its ``result`` (snippet errors raise)."""
        self.proc.stdin.write(json.dumps({"code": textwrap.dedent(code), "params": params}) + "\n")
        self.proc.stdin.flush()
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AgentError(f"the hostile service did not answer within {timeout} s") from None
        if line is None:
            raise AgentError(f"the hostile service exited; stderr:\n{self.tail()}")
        reply = json.loads(line)
        if not reply["ok"]:
            raise AgentError(f"{reply['error']}\n{reply.get('traceback', '')}")
        return reply["result"]

    def tail(self, chars: int = 4000) -> str:
        self.stderr.flush()
        self.stderr.seek(0)
        return self.stderr.read()[-chars:]

    def stop(self) -> None:
        """Close its stdin (it stops its daemons and exits); kill it if it will not."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- inotify ------------------------------------------------------------------

IN_ACCESS, IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x1, 0x2, 0x4, 0x8
IN_OPEN, IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x20, 0x40, 0x80, 0x100, 0x200
IN_ISDIR = 0x40000000
_WATCHED = (
    IN_ACCESS | IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_OPEN
    | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
)  # fmt: skip
_NAMES = {
    IN_ACCESS: "read", IN_MODIFY: "written", IN_ATTRIB: "attrs changed",
    IN_CLOSE_WRITE: "closed after write", IN_OPEN: "opened", IN_MOVED_FROM: "moved away",
    IN_MOVED_TO: "moved in", IN_CREATE: "created", IN_DELETE: "deleted",
}  # fmt: skip
_EVENT = struct.Struct("iIII")


class Inotify:
    """Events on the entries of some directories (not the directories themselves)."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self._dirs: dict[int, str] = {}

    def watch(self, directory: str) -> None:
        wd = self._libc.inotify_add_watch(self.fd, directory.encode(), _WATCHED)
        if wd < 0:
            raise OSError(ctypes.get_errno(), "inotify_add_watch", directory)
        self._dirs[wd] = directory

    def events(self) -> list[tuple[str, str]]:
        """(path, what) since the last call, in order; the test's own reads included."""
        found: list[tuple[str, str]] = []
        while True:
            try:
                buf = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return found
            at = 0
            while at < len(buf):
                wd, mask, _cookie, length = _EVENT.unpack_from(buf, at)
                name = buf[at + _EVENT.size : at + _EVENT.size + length].rstrip(b"\0").decode()
                at += _EVENT.size + length
                if not name or wd not in self._dirs:
                    continue  # the directory itself (a listing), or a removed watch
                for bit, what in _NAMES.items():
                    if mask & bit:
                        found.append((os.path.join(self._dirs[wd], name), what))

    def close(self) -> None:
        os.close(self.fd)


# -- victims ------------------------------------------------------------------


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _entry(path: str) -> tuple:
    st = os.lstat(path)
    kind = "dir" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode) else "other"
    digest = _sha(path) if kind == "file" else None
    size = st.st_size if kind == "file" else None
    return kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, size, digest


@dataclass
class VictimDir:
    """One root-owned directory of root-only files an attack aims at."""

    path: str
    inotify: Inotify
    before: dict[str, tuple] = field(default_factory=dict)
    contents: dict[str, bytes] = field(default_factory=dict)

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def snapshot(self) -> dict[str, tuple]:
        """Every entry (recursively): kind, mode, uid, gid, size, sha256."""
        result = {}
        for root, dirs, names in os.walk(self.path):
            dirs.sort()
            for name in sorted(dirs + names):
                full = os.path.join(root, name)
                result[os.path.relpath(full, self.path)] = _entry(full)
        result["."] = _entry(self.path)
        return result

    def changes(self) -> list[str]:
        """What differs from when it was made: one phrase per change."""
        now = self.snapshot()
        self.inotify.events()  # our own reads
        found = []
        appeared = set(now) - set(self.before)
        for name in sorted(set(self.before) | set(now)):
            old, new = self.before.get(name), now.get(name)
            where = self.file(name)
            if old is None:
                if os.path.dirname(name) in appeared:
                    continue  # inside a new directory: that one is reported
                found.append(f"{where} appeared ({new[0]}, owner {new[2]}, mode {new[1]:o})")
            elif new is None:
                found.append(f"{where} was deleted")
            elif old != new:
                parts = []
                if old[0] != new[0]:
                    parts.append(f"became a {new[0]}")
                if old[1] != new[1]:
                    parts.append(f"mode {old[1]:o} -> {new[1]:o}")
                if old[2:4] != new[2:4]:
                    parts.append(f"owner {old[2]}:{old[3]} -> {new[2]}:{new[3]}")
                if old[4] != new[4]:
                    parts.append(f"size {old[4]} -> {new[4]}")
                if old[5] != new[5]:
                    parts.append("content changed")
                found.append(f"{where} {', '.join(parts)}")
        return found


class Victims:
    """Fresh root-owned victim directories under /var/tmp, and their observers."""

    def __init__(self) -> None:
        self.root = tempfile.mkdtemp(prefix="rfsaa-victims-", dir="/var/tmp")
        os.chmod(self.root, 0o755)  # noqa: S103 - root-owned; others may only look
        self.inotify = Inotify()
        self.dirs: dict[str, VictimDir] = {}

    def make(
        self,
        name: str,
        files: dict[str, bytes | int] | None = None,
        subdirs: tuple[str, ...] = (),
        mode: int = 0o600,
        dir_mode: int = 0o755,
    ) -> VictimDir:
        """A victim directory ``name``: files of given bytes (or that many random bytes)."""
        path = os.path.join(self.root, name)
        os.mkdir(path)
        os.chmod(path, dir_mode)
        victim = VictimDir(path, self.inotify)
        for fname, content in ({"secret": 1 << 20} if files is None else files).items():
            data = secrets.token_bytes(content) if isinstance(content, int) else content
            full = os.path.join(path, fname)
            with open(full, "wb") as f:
                f.write(data)
            os.chmod(full, mode)
            victim.contents[fname] = data
        for sub in subdirs:
            os.mkdir(os.path.join(path, sub))
            os.chmod(os.path.join(path, sub), 0o755)  # noqa: S103 - root-owned
        victim.before = victim.snapshot()
        self.inotify.watch(path)
        self.inotify.events()
        self.dirs[name] = victim
        return victim

    def events(self) -> list[tuple[str, str]]:
        return self.inotify.events()

    def all_changes(self) -> list[str]:
        """Changes in every victim directory, plus anything new in the root."""
        found = []
        for victim in self.dirs.values():
            found += victim.changes()
        known = set(self.dirs)
        for name in sorted(os.listdir(self.root)):
            if name not in known:
                found.append(f"{os.path.join(self.root, name)} appeared")
        return found

    def cleanup(self) -> None:
        self.inotify.close()
        release_mounts(self.root)
        subprocess.run(["rm", "-rf", "--one-file-system", self.root], check=False)


# -- clean-up of what the attacks may leave ------------------------------------


def mounts_under(prefix: str) -> list[str]:
    """Mount points at or under ``prefix`` in this mount namespace, deepest first."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix.rstrip("/") + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains ``text`` (a path only this test uses)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            pids.append(int(entry))
    return pids


def release_mounts(prefix: str) -> None:
    """Unmount everything under ``prefix`` and stop the FUSE clients that served it."""
    for _ in range(100):  # mounts may be stacked on one point
        for point in mounts_under(prefix):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)
        if not mounts_under(prefix):
            break
    for pid in processes_mentioning(prefix):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def remove_tree(path: str) -> None:
    release_mounts(path)
    if os.path.exists(path):
        subprocess.run(["rm", "-rf", "--one-file-system", path], check=False)
    if os.path.exists(path):
        shutil.rmtree(path, ignore_errors=True)


# -- a root-only socket --------------------------------------------------------


class UnixListener:
    """A root-only UNIX socket that records who connects (pid, uid, gid from SO_PEERCRED)."""

    def __init__(self, path: str, mode: int = 0o600) -> None:
        self.path = path
        self.peers: list[tuple[int, int, int]] = []
        self._server = socket.socket(socket.AF_UNIX)
        self._server.bind(path)
        os.chmod(path, mode)
        self._server.listen(8)
        self._server.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        size = struct.calcsize("3i")
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, size)
            self.peers.append(struct.unpack("3i", creds))
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._server.close()


# -- processes ----------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                text = f.read()
        except OSError:
            continue
        ppid = int(text.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def proc_status(pid: int) -> dict[str, str]:
    """Name, uids and capability masks from /proc/<pid>/status (empty if gone)."""
    keys = ("Name", "Uid", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs")
    try:
        with open(f"/proc/{pid}/status") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    result = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in keys:
            result[key] = value.strip()
    return result


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.05) -> object:
    """Poll ``predicate`` until it returns something true or ``timeout`` passes."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > end:
            return value
        time.sleep(interval)
