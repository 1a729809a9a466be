"""File operations for the volume files (CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER).

System calls, not commands. Every path is opened beneath an allowed base
without following a symlink (``confine.open_beneath`` / ``open_parent``), and
the operation then acts on that descriptor with the ``*at`` calls: there is
no gap between a check and a use for a swapped directory to slip into.
Regular files with more than one hard link are never changed (a link to a
file elsewhere would carry the change out of the share). New files get
exactly the mode asked for, directories are never made world-writable, and
files belong to the daemon's user: the service's (see ``privsep.daemon``).

In the legacy rootwrap modes this process is not root, so each operation
becomes one command that the generated rootwrap filters allow (:mod:`legacy`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import secrets
import stat
from collections.abc import Callable, Iterator

from remotefs_aa import exception
from remotefs_aa.privsep import (
    confine,
    entrypoint,
    fence,
    file_pctxt,
    images,
    legacy,
    process_info,
    runner,
    settings,
)

MAX_READ = 1024 * 1024


@contextlib.contextmanager
def _parent(path: str, what: str = "path") -> Iterator[tuple[int, str]]:
    dirfd, name = confine.open_parent(path, settings().allowed_paths, what)
    try:
        yield dirfd, name
    finally:
        os.close(dirfd)


@contextlib.contextmanager
def _directory(path: str, what: str = "directory") -> Iterator[int]:
    # A share may be an allowed base itself; its files are inside it either way.
    fd = confine.open_beneath(
        path, settings().allowed_paths, what, confine.DIR_FLAGS, allow_base=True
    )
    try:
        yield fd
    finally:
        os.close(fd)


def _single_link(fd: int, path: str) -> os.stat_result:
    """fstat of a regular file we are about to change; refuse anything else."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise exception.PrivilegedArgumentRefused(
            f"{path!r} is not a regular file ({stat.filemode(st.st_mode)}); not changed"
        )
    if st.st_nlink > 1:
        raise exception.PrivilegedArgumentRefused(
            f"{path!r} has {st.st_nlink} hard links; a volume file has one. Not changed: "
            f"a link could carry the change to a file outside the share"
        )
    return st


def _sync_dir(dirfd: int) -> None:
    os.fsync(dirfd)


@entrypoint(file_pctxt)
def make_directory(path: str, mode: int = 0o755) -> None:
    """Create ``path`` and its missing parents inside an allowed base, each with ``mode``."""
    bits = confine.directory_mode(mode)
    if runner.via_commands():
        legacy.make_directory(path, bits)
        return
    base, parts = confine.split_under(path, settings().allowed_paths, "directory", True)
    try:
        current = confine.open_beneath(
            base, [base], "allowed base", confine.DIR_FLAGS, allow_base=True
        )
    except FileNotFoundError:
        # The base itself is root's configuration (e.g. state_path on a new host).
        os.makedirs(base, bits, exist_ok=True)
        current = confine.open_beneath(
            base, [base], "allowed base", confine.DIR_FLAGS, allow_base=True
        )
    try:
        for part in parts:
            try:
                os.mkdir(part, bits, dir_fd=current)
                created = True
            except FileExistsError:
                created = False
            nxt = confine.open_at(current, part, confine.DIR_FLAGS, shown=path)
            if created:
                os.fchmod(nxt, bits)  # exactly, whatever the umask
            os.close(current)
            current = nxt
    finally:
        os.close(current)


@entrypoint(file_pctxt)
def unlink(path: str) -> bool:
    """Remove a file; False if it did not exist. Directories are refused."""
    if runner.via_commands():
        return legacy.unlink(path)
    with _parent(path) as (dirfd, name):
        try:
            os.unlink(name, dir_fd=dirfd)  # never follows a link: removes the link itself
        except FileNotFoundError:
            return False
        except IsADirectoryError:
            raise exception.PrivilegedArgumentRefused(
                f"{path!r} is a directory; not removed"
            ) from None
    return True


@entrypoint(file_pctxt)
def truncate(path: str, size_bytes: int, mode: int = 0o600, new: bool = False) -> None:
    """Create (with ``mode``) or resize a sparse file to ``size_bytes``.

    ``new``: the file must not exist yet (FileExistsError): a leftover is
    never reused with whatever data it holds.
    """
    _size_file(path, size_bytes, mode, "truncate", lambda fd, size: os.ftruncate(fd, size), new)


@entrypoint(file_pctxt)
def fallocate(path: str, size_bytes: int, mode: int = 0o600, new: bool = False) -> None:
    """Create (with ``mode``) or grow a file with ``size_bytes`` really allocated (thick)."""
    _size_file(
        path, size_bytes, mode, "fallocate", lambda fd, size: os.posix_fallocate(fd, 0, size), new
    )


def _size_file(
    path: str,
    size_bytes: int,
    mode: int,
    command: str,
    syscall: Callable[[int, int], None],
    new: bool = False,
) -> None:
    size = confine.positive_int(size_bytes, "size")
    bits = confine.file_mode(mode)
    if runner.via_commands():
        if new and os.path.basename(os.path.normpath(path)) in legacy.list_directory(
            os.path.dirname(os.path.normpath(path))
        ):
            raise FileExistsError(errno.EEXIST, "already exists", path)
        legacy.size_file(path, size, command, bits)
        return
    with _parent(path) as (dirfd, name):
        if images.volume_of(name) is None:
            raise exception.PrivilegedArgumentRefused(f"{name!r} is not a volume's image name")
        flags = os.O_WRONLY | os.O_NONBLOCK
        try:
            fd = confine.open_at(dirfd, name, flags | os.O_CREAT | os.O_EXCL, bits, path)
            os.fchmod(fd, bits)
        except FileExistsError:
            if new:
                raise
            fd = confine.open_at(dirfd, name, flags, shown=path)
        try:
            _single_link(fd, path)
            syscall(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)


@entrypoint(file_pctxt)
def write_file_atomic(path: str, data: str, mode: int = 0o640, sync_dir: bool = True) -> None:
    """Replace ``path`` with ``data``: temp file, fsync, rename, fsync of the directory.

    A reader sees the old content or the new, never a torn file, even if the
    daemon dies half-way. ``sync_dir=False`` leaves the rename's durability
    to the next directory sync (for writes whose loss after a power cut the
    caller can recover from).
    """
    bits = confine.file_mode(mode)
    if runner.via_commands():
        legacy.write_file_atomic(path, data, bits, sync_dir)
        return
    with _parent(path) as (dirfd, name):
        _write_at(dirfd, name, data, bits, sync_dir)


def _write_at(dirfd: int, name: str, data: str, bits: int, sync_dir: bool) -> None:
    tmp = f".tmp-{secrets.token_hex(6)}"
    fd = os.open(
        tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, bits, dir_fd=dirfd
    )
    try:
        try:
            os.fchmod(fd, bits)
            view = memoryview(data.encode())
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dirfd)
        raise
    if sync_dir:
        _sync_dir(dirfd)


@entrypoint(file_pctxt)
def read_file(path: str, max_bytes: int = MAX_READ) -> str:
    """Read a small text file (an .info file); larger files are refused."""
    limit = min(confine.positive_int(max_bytes, "max_bytes"), MAX_READ)
    if runner.via_commands():
        return legacy.read_file(path, limit)
    with _parent(path) as (dirfd, name):
        return read_at(dirfd, name, limit, path)


def read_at(dirfd: int, name: str, limit: int, shown: str | None = None) -> str:
    """The text of regular file ``name`` in directory ``dirfd`` (no link followed)."""
    fd = confine.open_at(dirfd, name, os.O_RDONLY | os.O_NONBLOCK, shown=shown)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise exception.PrivilegedArgumentRefused(f"{shown or name!r} is not a regular file")
        data = os.read(fd, limit + 1)
        while len(data) <= limit:
            more = os.read(fd, limit + 1 - len(data))
            if not more:
                break
            data += more
    finally:
        os.close(fd)
    if len(data) > limit:
        raise exception.PrivilegedArgumentRefused(f"{shown or name!r} is larger than {limit} bytes")
    return data.decode()


@entrypoint(file_pctxt)
def statvfs(path: str) -> dict:
    """Total, free and available bytes of the filesystem holding ``path``."""
    if runner.via_commands():
        st = os.statvfs(confine.resolve(path, settings().allowed_paths))
    else:
        fd = confine.open_beneath(
            path, settings().allowed_paths, "path", os.O_PATH | os.O_CLOEXEC, allow_base=True
        )
        try:
            st = os.statvfs(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
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
    """Who the file daemon is: pid, uid, capabilities, and the chain checks it ran.

    Lets an operator (and the tests) see that the daemon runs apart from the
    service with only the capabilities of its context.
    """
    return {
        **process_info(),
        "checks": images.checks(),
        # What it confines itself to, as read from its own config (the
        # service checks its shares and mount bases against this at start).
        "allowed_paths": list(settings().allowed_paths),
    }


@entrypoint(file_pctxt)
def rename(src: str, dst: str, exclusive: bool = False) -> None:
    """Atomically rename ``src`` to ``dst`` within one directory.

    ``exclusive``: never replace ``dst`` (FileExistsError if it exists), so a
    new volume's base is checked by this very step instead of by a listing
    of the share beforehand: ``renameat2(RENAME_NOREPLACE)``, or where the
    filesystem lacks it (NFS, FUSE), ``link`` (exclusive everywhere) then
    ``unlink`` of the source.
    """
    if runner.via_commands():
        if exclusive and os.path.basename(os.path.normpath(dst)) in legacy.list_directory(
            os.path.dirname(os.path.normpath(dst))
        ):
            raise FileExistsError(errno.EEXIST, "already exists", dst)
        legacy.rename(src, dst)
        return
    if os.path.dirname(os.path.normpath(src)) != os.path.dirname(os.path.normpath(dst)):
        raise exception.PrivilegedArgumentRefused(
            f"rename {src!r} -> {dst!r} leaves its directory; only same-directory renames"
        )
    with _parent(src, "source") as (dirfd, name):
        target = os.path.basename(os.path.normpath(dst))
        confine.plain_name(target, "destination")
        if not exclusive:
            os.rename(name, target, src_dir_fd=dirfd, dst_dir_fd=dirfd)
        else:
            _rename_noreplace(dirfd, name, target)


_RENAME_NOREPLACE = 1
_renameat2 = getattr(confine._libc, "renameat2", None)


def _rename_noreplace(dirfd: int, name: str, target: str) -> None:
    if _renameat2 is not None:
        rc = _renameat2(dirfd, os.fsencode(name), dirfd, os.fsencode(target), _RENAME_NOREPLACE)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), target)
    os.link(name, target, src_dir_fd=dirfd, dst_dir_fd=dirfd, follow_symlinks=False)
    os.unlink(name, dir_fd=dirfd)


@entrypoint(file_pctxt)
def list_directory(path: str) -> dict[str, int]:
    """Regular files directly in ``path``: name -> apparent size in bytes.

    One call instead of a stat per file, so a chain check or a stats poll is
    a single round trip.
    """
    if runner.via_commands():
        return legacy.list_directory(path)
    with _directory(path) as fd:
        return scan_fd(fd)


def scan_fd(
    dirfd: int, prefixes: tuple[str, ...] | None = None, sizes: bool = True
) -> dict[str, int]:
    """Regular files in the open directory ``dirfd`` (no privilege check here).

    ``prefixes`` keeps only names starting with one of them; ``sizes=False``
    reports 0 instead of a stat per file (the type comes from readdir), which
    matters on a network filesystem whose caches are off.
    """
    result = {}
    with os.scandir(dirfd) as entries:  # scandir works on (and closes) its own dup
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
    path: str, data: str, expected: str | None, mode: int = 0o640, durable: bool = True
) -> str | None:
    """Compare-and-swap a small file: write ``data`` only if it still holds ``expected``.

    ``expected=None`` means "the file must not exist yet". Returns None when
    written, otherwise what the file holds now (``""`` if it is gone), so the
    caller can say who won. The compare happens next to the write, in one
    call, which leaves the smallest window a writer whose lock lapsed can use.
    """
    bits = confine.file_mode(mode)
    if runner.via_commands():
        return legacy.replace_file_if(path, data, expected, bits, durable)
    with _parent(path) as (dirfd, name):
        try:
            current: str | None = read_at(dirfd, name, MAX_READ, path)
        except FileNotFoundError:
            current = None
        if current != expected:
            return "" if current is None else current
        _write_at(dirfd, name, data, bits, durable)
    return None


#: Generation claims kept per volume: a writer more than this many generations
#: behind could re-create an old claim, so they are kept this long (it must
#: also fail the compare with ``expected``, read next to its claim).
KEEP_CLAIMS = 16


def claim_name(base: str, generation: int) -> str:
    """The claim file of generation ``generation`` of volume file ``base``."""
    return f".{base}.gen.{generation}"


def effective_info(dirfd: int, base: str, names: set[str] | None = None) -> str | None:
    """The newest published ``.info`` text: ``<base>.info``, or a newer claim.

    A publisher that died between creating its claim and renaming it into
    place leaves the claim as the newest state; it counts as published.
    ``names``: the directory's names if the caller just listed them (no
    lookups are then made for claims that are not there).
    """
    try:
        text: str | None = read_at(dirfd, base + ".info", MAX_READ)
    except FileNotFoundError:
        text = None
    generation = _generation_of(text)
    while True:
        claim = claim_name(base, generation + 1)
        if names is not None and claim not in names:
            return text
        try:
            newer = read_at(dirfd, claim, MAX_READ)
        except FileNotFoundError:
            return text
        text, generation = newer, generation + 1


def _generation_of(text: str | None) -> int:
    if not text:
        return 0
    try:
        value = json.loads(text).get("generation", 0)
    except (ValueError, AttributeError):
        return 0
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def info_tmp_name(base: str, generation: int) -> str:
    """The temp file an ``.info`` of generation ``generation`` is written to before its claim.

    Deterministic, so a volume's deletion can name it without listing the
    share, and exclusive: of two publishers of one generation the second
    cannot create it (it loses, as it would at the claim).
    """
    return f".{base}.info.tmp-{generation}"


def exists_at(dirfd: int, name: str) -> bool:
    """Whether ``name`` is a regular file in ``dirfd`` (one lookup; a link is not followed)."""
    try:
        return stat.S_ISREG(os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False


@entrypoint(file_pctxt)
def publish_info(
    directory: str,
    base: str,
    data: str,
    generation: int,
    expected: str | None,
    mode: int = 0o640,
    durable: bool = True,
) -> str | None:
    """Compare-and-swap a volume's ``.info``: publish generation ``generation`` exactly once.

    Atomic on the share itself, for writers on any host: the new text is
    written and fsync'd to the temp file :func:`info_tmp_name` (created
    exclusively: a second publisher of the same generation loses there), then
    that descriptor is *linked* to the claim name ``.<base>.gen.<generation>``
    (``link(2)`` fails if the name exists: of all writers that read
    generation N, exactly one creates N+1), then renamed over ``<base>.info``
    (Cinder's name; the same inode as the claim), and the directory is
    fsync'd: a generation reported as written survives a power cut.
    ``durable=False`` skips both fsyncs, for claims whose loss in a power
    cut recovery handles (the exclusive link makes the compare-and-swap
    atomic either way). ``expected`` is the text the caller read (None: no
    ``.info`` yet, and no deletion marker either). Returns None when
    published, otherwise the newest published text (``""`` if none), so
    the caller can say who won.

    The claim is linked from the descriptor (``/proc/self/fd/N``), not from
    the temp name: a publisher whose temp file was removed meanwhile (a
    leftover sweep under the volume's lock) links nothing, since its inode
    has no name left, and can never publish a file another writer is
    still writing under the same name.
    """
    bits = confine.file_mode(mode)
    confine.positive_int(generation, "generation")
    if images.volume_of(base) is None or "." in base:
        raise exception.PrivilegedArgumentRefused(f"{base!r} is not a volume's base file name")
    if runner.via_commands():
        return legacy.replace_file_if(
            os.path.join(directory, base + ".info"), data, expected, bits, True
        )
    with _directory(directory) as dirfd:
        current = effective_info(dirfd, base)
        if current != expected:
            return "" if current is None else current
        if expected is None and exists_at(dirfd, f".{base}.deleting"):
            return ""  # a volume of this id is being deleted: not a new one
        tmp = info_tmp_name(base, generation)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags, bits, dir_fd=dirfd)
        except FileExistsError:
            # Another publisher of this generation is at work (or died at it:
            # the next locked operation on the volume removes its leftover).
            return effective_info(dirfd, base) or ""
        # The temp file is compared by inode while its descriptor is still
        # open: a closed, removed inode's number can be reused at once by a
        # successor's temp file of the same name.
        ino = os.fstat(fd).st_ino
        try:
            os.fchmod(fd, bits)
            view = memoryview(data.encode())
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
            os.link(
                f"/proc/self/fd/{fd}",
                claim_name(base, generation),
                dst_dir_fd=dirfd,
                follow_symlinks=True,
            )
        except (FileExistsError, FileNotFoundError):
            # The claim exists (another writer won) or our temp file was
            # removed under us (we were fenced): either way we lost.
            _unlink_if_same(dirfd, tmp, ino)
            os.close(fd)
            return effective_info(dirfd, base) or ""
        except BaseException:
            _unlink_if_same(dirfd, tmp, ino)
            os.close(fd)
            raise
        os.close(fd)
        try:
            os.rename(tmp, base + ".info", src_dir_fd=dirfd, dst_dir_fd=dirfd)
        except FileNotFoundError:
            pass  # removed by a sweep: the claim is published, and readers read claims
        if durable:
            _sync_dir(dirfd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(claim_name(base, generation - KEEP_CLAIMS), dir_fd=dirfd)
    return None


def _unlink_if_same(dirfd: int, name: str, ino: int) -> None:
    """Remove ``name`` if it is still the file we created (inode ``ino``), not a successor's."""
    with contextlib.suppress(FileNotFoundError):
        if os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_ino == ino:
            os.unlink(name, dir_fd=dirfd)


@entrypoint(file_pctxt)
def unlink_many(directory: str, names: list[str]) -> list[str]:
    """Remove files ``names`` (plain names) from ``directory``, in order; those removed.

    One round trip for a volume's whole chain. Missing files are skipped;
    directories and names with a path in them are refused before anything is
    removed.
    """
    for name in names:
        confine.plain_name(name, "file name")
    if runner.via_commands():
        return legacy.unlink_many(directory, names)
    removed = []
    with _directory(directory) as dirfd:
        for name in names:
            try:
                os.unlink(name, dir_fd=dirfd)  # never follows a symlink
            except FileNotFoundError:
                continue
            except IsADirectoryError:
                raise exception.PrivilegedArgumentRefused(
                    f"{name!r} in {directory!r} is a directory; not removed"
                ) from None
            removed.append(name)
    return removed


@entrypoint(file_pctxt)
def fence_extend(token: str, deadline: float) -> bool:
    """A confirmed lease renewal: let the fenced step ``token`` run until ``deadline``."""
    return fence.extend(str(token), float(deadline))


@entrypoint(file_pctxt)
def fence_abort(token: str) -> bool:
    """The lock was lost: end the fenced step ``token`` now."""
    return fence.abort(str(token))
