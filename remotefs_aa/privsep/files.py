"""File operations on root-owned files (CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER).

System calls, not commands, in the privsep daemon (and ``direct`` mode): no
process is started. In the rootwrap modes this process is not root, so each
operation becomes one command that the generated rootwrap filters allow.
"""

from __future__ import annotations

import errno
import os
import secrets
import tempfile
from collections.abc import Callable

from remotefs_aa import exception
from remotefs_aa.privsep import confine, entrypoint, file_pctxt, process_info, runner, settings

MAX_READ = 1024 * 1024


def _cmd(argv: list[str], stdin: str | None = None) -> tuple[int, str, str]:
    return runner.run(argv, timeout=settings().command_timeout, stdin=stdin)


def _path(path: str, what: str = "path") -> str:
    return confine.resolve_inside(path, settings().allowed_paths, what)


@entrypoint(file_pctxt)
def make_directory(path: str, mode: int = 0o755) -> None:
    """Create ``path`` and missing parents inside an allowed base."""
    target, bits = _path(path, "directory"), confine.mode_bits(mode)
    if runner.via_commands():
        _cmd(["mkdir", "-p", "-m", f"{bits:o}", "--", target])
    else:
        os.makedirs(target, mode=bits, exist_ok=True)


@entrypoint(file_pctxt)
def chmod(path: str, mode: int) -> None:
    """Set permission bits (no setuid/setgid/sticky)."""
    target, bits = _path(path), confine.mode_bits(mode)
    if runner.via_commands():
        _cmd(["chmod", f"{bits:o}", "--", target])
    else:
        os.chmod(target, bits, follow_symlinks=False)


@entrypoint(file_pctxt)
def chown(path: str, uid: int, gid: int) -> None:
    """Change owner and group (``-1`` keeps one of them)."""
    for value, what in ((uid, "uid"), (gid, "gid")):
        if isinstance(value, bool) or not isinstance(value, int) or value < -1:
            raise exception.PrivilegedArgumentRefused(f"{what} must be an integer >= -1")
    target = _path(path)
    if runner.via_commands():
        owner = ("" if uid == -1 else str(uid)) + ("" if gid == -1 else f":{gid}")
        if owner:
            _cmd(["chown", "-h", owner, "--", target])
    else:
        os.chown(target, uid, gid, follow_symlinks=False)


@entrypoint(file_pctxt)
def unlink(path: str) -> bool:
    """Remove a file; False if it did not exist. Directories are refused."""
    target = _path(path)
    if os.path.isdir(target) and not os.path.islink(target):
        raise exception.PrivilegedArgumentRefused(f"{path!r} is a directory; not removed")
    if runner.via_commands():
        _rc, out, _err = _cmd(["rm", "-fv", "--", target])
        return bool(out.strip())
    try:
        os.unlink(target)
    except FileNotFoundError:
        return False
    return True


@entrypoint(file_pctxt)
def truncate(path: str, size_bytes: int) -> None:
    """Create or resize a sparse file to ``size_bytes``."""
    _size_file(path, size_bytes, "truncate", "-s", lambda fd, size: os.ftruncate(fd, size))


@entrypoint(file_pctxt)
def fallocate(path: str, size_bytes: int) -> None:
    """Create or grow a file with ``size_bytes`` really allocated (thick)."""
    _size_file(
        path, size_bytes, "fallocate", "-l", lambda fd, size: os.posix_fallocate(fd, 0, size)
    )


def _size_file(
    path: str, size_bytes: int, command: str, flag: str, syscall: Callable[[int, int], None]
) -> None:
    target = _path(path)
    size = confine.positive_int(size_bytes, "size")
    if runner.via_commands():
        _cmd([command, flag, str(size), "--", target])
        return
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        syscall(fd, size)
    finally:
        os.close(fd)


@entrypoint(file_pctxt)
def write_file_atomic(path: str, data: str, mode: int = 0o644, sync_dir: bool = True) -> None:
    """Replace ``path`` with ``data``: temp file, fsync, rename, fsync dir.

    A reader sees the old content or the new, never a torn file, even if the
    daemon dies half-way. ``sync_dir=False`` leaves the rename's durability
    to the next directory sync (for writes whose loss after a power cut the
    caller can recover from).
    """
    target = _path(path)
    directory = os.path.dirname(target)
    bits = confine.mode_bits(mode)
    if runner.via_commands():
        tmp = os.path.join(directory, f".tmp-{secrets.token_hex(6)}")
        try:
            _cmd(["dd", f"of={tmp}", "conv=fsync", "status=none"], stdin=data)
            _cmd(["chmod", f"{bits:o}", "--", tmp])
            _cmd(["mv", "-fT", "--", tmp, target])
        except BaseException:
            _cmd(["rm", "-f", "--", tmp])
            raise
        if sync_dir:
            _cmd(["sync", "--", directory])
        return
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), bits)
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if not sync_dir:
        return
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@entrypoint(file_pctxt)
def read_file(path: str, max_bytes: int = MAX_READ) -> str:
    """Read a small text file (an .info file); larger files are refused."""
    target = _path(path)
    limit = min(confine.positive_int(max_bytes, "max_bytes"), MAX_READ)
    if runner.via_commands():
        try:
            data = _cmd(["head", "-c", str(limit + 1), "--", target])[1].encode()
        except exception.PrivilegedCommandFailed as exc:
            if "No such file" in exc.stderr:
                raise FileNotFoundError(errno.ENOENT, "No such file or directory", path) from None
            raise
    else:
        with open(target, "rb") as f:
            data = f.read(limit + 1)
    if len(data) > limit:
        raise exception.PrivilegedArgumentRefused(f"{path!r} is larger than {limit} bytes")
    return data.decode()


@entrypoint(file_pctxt)
def statvfs(path: str) -> dict:
    """Total, free and available bytes of the filesystem holding ``path``."""
    # statvfs needs no privilege, only search permission on the path.
    st = os.statvfs(confine.resolve(path, settings().allowed_paths))
    return {
        "total": st.f_blocks * st.f_frsize,
        "free": st.f_bfree * st.f_frsize,
        "available": st.f_bavail * st.f_frsize,
    }


@entrypoint(file_pctxt)
def ping() -> bool:
    """Do nothing: measures the cost of one round trip to the daemon."""
    return True


@entrypoint(file_pctxt)
def daemon_info() -> dict:
    """Who the file daemon is: pid, uid and effective capability mask.

    Lets an operator (and the tests) see that the daemon runs apart from the
    service with only the capabilities of its context.
    """
    return process_info()


@entrypoint(file_pctxt)
def rename(src: str, dst: str) -> None:
    """Atomically rename ``src`` to ``dst`` (replacing it), within one directory."""
    source, target = _path(src, "source"), _path(dst, "destination")
    if os.path.dirname(source) != os.path.dirname(target):
        raise exception.PrivilegedArgumentRefused(
            f"rename {src!r} -> {dst!r} leaves its directory; only same-directory renames"
        )
    if runner.via_commands():
        _cmd(["mv", "-fT", "--", source, target])
        return
    os.replace(source, target)


@entrypoint(file_pctxt)
def list_directory(path: str) -> dict[str, int]:
    """Regular files directly in ``path``: name -> apparent size in bytes.

    One call instead of a stat per file, so a chain check or a stats poll is
    a single round trip.
    """
    directory = _path(path, "directory")
    if runner.via_commands():
        out = _cmd(["ls", "-lAn", "--time-style=long-iso", "--", directory])[1]
        files: dict[str, int] = {}
        for line in out.splitlines():
            # mode links uid gid size date time name
            parts = line.split(maxsplit=7)
            if len(parts) == 8 and parts[0].startswith("-"):
                files[parts[7]] = int(parts[4])
        return files
    return scan(directory)


def scan(
    directory: str, prefixes: tuple[str, ...] | None = None, sizes: bool = True
) -> dict[str, int]:
    """Regular files in an already confined ``directory`` (no privilege check here).

    ``prefixes`` keeps only names starting with one of them; ``sizes=False``
    reports 0 instead of a stat per file (the type comes from readdir), which
    matters on a network filesystem whose caches are off.
    """
    result = {}
    with os.scandir(directory) as entries:
        for entry in entries:
            if prefixes is not None and not entry.name.startswith(prefixes):
                continue
            try:
                if entry.is_file(follow_symlinks=False):
                    result[entry.name] = entry.stat(follow_symlinks=False).st_size if sizes else 0
            except FileNotFoundError:
                continue  # removed (by another volume's operation) while we listed
    return result


@entrypoint(file_pctxt)
def replace_file_if(
    path: str, data: str, expected: str | None, mode: int = 0o644, durable: bool = True
) -> str | None:
    """Compare-and-swap a small file: write ``data`` only if it still holds ``expected``.

    ``expected=None`` means "the file must not exist yet". Returns None when
    written, otherwise what the file holds now (``""`` if it is gone), so the
    caller can say who won. The compare happens next to the write, in one
    call, which leaves the smallest window a writer whose lock lapsed can use.
    """
    _path(path)
    try:
        current: str | None = read_file.__wrapped__(path)  # type: ignore[attr-defined]
    except FileNotFoundError:
        current = None
    if current != expected:
        return "" if current is None else current
    write_file_atomic.__wrapped__(path, data, mode, sync_dir=durable)  # type: ignore[attr-defined]
    return None


@entrypoint(file_pctxt)
def unlink_many(directory: str, names: list[str]) -> list[str]:
    """Remove files ``names`` (plain names) from ``directory``, in order; those removed.

    One round trip for a volume's whole chain. Missing files are skipped;
    directories and names with a path in them are refused before anything is
    removed.
    """
    folder = _path(directory, "directory")
    for name in names:
        if not isinstance(name, str) or not name or "/" in name or "\x00" in name:
            raise exception.PrivilegedArgumentRefused(f"{name!r} is not a plain file name")
        if name in (".", ".."):
            raise exception.PrivilegedArgumentRefused(f"{name!r} is not a file")
    removed = []
    if runner.via_commands():
        for name in names:
            _rc, out, _err = _cmd(["rm", "-fv", "--", os.path.join(folder, name)])
            if out.strip():
                removed.append(name)
        return removed
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in names:
            try:
                os.unlink(name, dir_fd=dir_fd)  # never follows a symlink
            except FileNotFoundError:
                continue
            except IsADirectoryError:
                raise exception.PrivilegedArgumentRefused(
                    f"{name!r} in {directory!r} is a directory; not removed"
                ) from None
            removed.append(name)
    finally:
        os.close(dir_fd)
    return removed
