"""qemu-img and qemu-io on checked images, by descriptor (CAP_DAC_OVERRIDE & co.).

Each entrypoint opens the images it works on itself: the directory beneath
an allowed base without following a link, every layer of the chain by name
with ``O_NOFOLLOW``, checked by :mod:`images` (formats raw and qcow2 only,
every backing file one of the same volume's files, its format named, no
external data file, no encryption). qemu-img then gets a ``json:`` spec that
names every layer as ``/proc/self/fd/N`` with its format, so it probes
nothing and opens nothing by name. New files are created here (``O_EXCL``,
with the volume's mode), and qemu-img writes into the descriptor.

The children run as the daemon's user (the service's user: see
``privsep.daemon``) with no capability at all; the descriptors are their
only way to the images. ``info`` and ``check`` parse images a tenant may have
crafted, so they also run under address-space and CPU-time limits.

In the legacy rootwrap modes the same entrypoints build path commands
(:mod:`legacy`), which the generated filters match.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import struct
import threading
from collections.abc import Iterator

from remotefs_aa import exception
from remotefs_aa.privsep import confine, entrypoint, file_pctxt, images, legacy, runner, settings

#: Longer chains are refused: a loop or a hostile image, not a real volume.
MAX_CHAIN_DEPTH = images.MAX_CHAIN_DEPTH


@contextlib.contextmanager
def _directory(path: str, what: str) -> Iterator[tuple[int, str, str]]:
    """(descriptor of ``path``'s directory, that directory as given, the file name)."""
    dirfd, name = confine.open_parent(path, settings().allowed_paths, what)
    try:
        yield dirfd, os.path.dirname(os.path.normpath(path)), name
    finally:
        os.close(dirfd)


def _run(argv: list[str], chain_fds: tuple[int, ...], what: str, **kwargs: object) -> tuple:
    return runner.run(
        argv,
        timeout=settings().command_timeout,
        pass_fds=chain_fds,
        shown=what,
        **kwargs,  # type: ignore[arg-type]
    )


@contextlib.contextmanager
def _new_file(dirfd: int, directory: str, name: str, mode: int) -> Iterator[int]:
    """Create ``name`` (it must not exist) with exactly ``mode``; removed again on error."""
    bits = confine.file_mode(mode)
    if images.volume_of(name) is None and not confine.is_conversion_name(name):
        raise exception.PrivilegedArgumentRefused(
            f"{name!r} is not a name a volume's image or a conversion file may take"
        )
    fd = os.open(
        name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, bits, dir_fd=dirfd
    )
    try:
        os.fchmod(fd, bits)  # exactly: the process umask must not change it
        yield fd
        # What qemu-img wrote is on disk before the caller publishes it.
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dirfd)
        raise
    os.close(fd)


@entrypoint(file_pctxt)
def qemu_img_create(
    path: str,
    fmt: str,
    size_bytes: int | None = None,
    backing_file: str | None = None,
    backing_fmt: str | None = None,
    mode: int = 0o600,
) -> None:
    """Create an image; with ``backing_file``, a qcow2 overlay on that file.

    The new file must not exist yet. An overlay's backing file must be one
    of the same volume's files in the same directory; it is checked (the
    file itself; its chain whenever qemu-img is given it) but not opened by
    qemu-img (``-u``), and the size defaults to the backing file's.
    """
    fmt = confine.image_format(fmt)
    if runner.via_commands():
        legacy.qemu_img_create(path, fmt, size_bytes, backing_file, backing_fmt, mode)
        return
    with _directory(path, "image") as (dirfd, directory, name):
        argv = ["qemu-img", "create", "-q", "-f", fmt]
        if backing_file is not None:
            if fmt != "qcow2":
                raise exception.PrivilegedArgumentRefused(
                    "only qcow2 images can have a backing file"
                )
            if not images.backing_allowed(images.volume_of(name), backing_file):
                raise exception.PrivilegedArgumentRefused(
                    f"backing file {backing_file!r} of {name!r} must be a file of the same "
                    f"volume in the same directory"
                )
            backing_fmt = confine.image_format(backing_fmt or "")
            # qemu-img opens nothing of it (-u): the backing file itself is
            # checked (a regular file of the volume, of that format), and the
            # chain below it is checked whenever qemu-img is given the chain.
            # Opening one layer keeps a snapshot's cost flat in the depth.
            with images.open_chain(dirfd, directory, backing_file, backing_fmt, 1) as below:
                size = below.top.virtual_size if size_bytes is None else size_bytes
            argv += ["-b", backing_file, "-F", backing_fmt, "-u"]
        elif size_bytes is None:
            raise exception.PrivilegedArgumentRefused(
                "an image without a backing file needs a size"
            )
        else:
            size = size_bytes
        size = confine.positive_int(size, "size")
        data = None
        if backing_file is not None and size <= TEMPLATE_MAX_SIZE:
            data = overlay_image(size, backing_file, backing_fmt)  # type: ignore[arg-type]
        with _new_file(dirfd, directory, name, mode) as fd:
            if data is not None:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            else:
                _run([*argv, f"/proc/self/fd/{fd}", str(size)], (fd,), f"qemu-img create {path}")


#: Overlays of larger volumes are made by qemu-img itself: a template holds
#: the L1 table (8 bytes per 512 MiB), 1 MiB at 64 TiB, and a template's
#: bytes stay in the daemon's memory.
TEMPLATE_MAX_SIZE = 64 << 40
#: What an empty overlay of at most TEMPLATE_MAX_SIZE can take: its header,
#: refcount table and block and L1 table, a few clusters each.
_TEMPLATE_MAX_BYTES = 4 << 20
#: A backing name qemu-img writes into the overlay templates, replaced per overlay.
_PLACEHOLDER = b"volume-" + b"0" * 36
_templates: dict[tuple[int, str], tuple[bytes, int]] = {}
_templates_lock = threading.Lock()


def overlay_image(size: int, backing_file: str, backing_fmt: str) -> bytes:
    """The bytes ``qemu-img create -f qcow2 -u -b <backing_file> -F <fmt>`` writes, without it.

    A snapshot's overlay is the one image created on every snapshot create
    and revert, and qemu-img's start-up is most of that operation's CPU
    (about 6 ms a process here). An empty overlay differs from another of
    the same size and backing format only in the backing file's name (its
    length in the header, its bytes after the header extensions), so the
    daemon has qemu-img create one template per size and backing format
    (into a memfd, once per daemon), and patches the name in. The result is
    byte for byte what qemu-img would have written (tested against it), and
    is parsed back by the header reader before it is used.
    """
    from remotefs_aa.privsep import qcow2

    name = backing_file.encode()
    key = (size, backing_fmt)
    with _templates_lock:
        found = _templates.get(key)
    if found is None:
        # qemu-img runs as the service's user, who can open the memfd it
        # writes through /proc while it runs: the template is sealed once it
        # exits, read within a bound, and refused unless its header is that
        # of a plain empty overlay. (What a tampered template could still
        # hold, the service's user may write into its own overlay anyway.)
        memfd = os.memfd_create("remotefs_aa-overlay", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", _PLACEHOLDER.decode()]
            argv += ["-F", backing_fmt, f"/proc/self/fd/{memfd}", str(size)]
            _run(argv, (memfd,), "qemu-img create (overlay template)")
            seals = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
            fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, seals)
            length = os.fstat(memfd).st_size
            if length > _TEMPLATE_MAX_BYTES:
                raise exception.PrivilegedCommandFailed(
                    "qemu-img create (overlay template)", 0, f"{length} bytes"
                )
            template = os.pread(memfd, length, 0)
        finally:
            os.close(memfd)
        (offset,) = struct.unpack_from(">Q", template, 8)
        header = qcow2.parse_header(template, len(template), "overlay template")
        plain = (
            header.format == "qcow2"
            and header.backing_file == _PLACEHOLDER.decode()
            and header.backing_format == backing_fmt
            and header.virtual_size == size
            and header.data_file is None
            and not header.encrypted
            and header.incompatible_features == 0
        )
        if not plain or len(template) != length:
            raise exception.PrivilegedCommandFailed("qemu-img create (template)", 0, "unexpected")
        found = (template, offset)
        with _templates_lock:
            if len(_templates) >= 64:
                _templates.clear()  # distinct volume sizes are few; never grow without bound
            _templates[key] = found
    template, offset = found
    data = bytearray(template)
    data[offset : offset + len(_PLACEHOLDER)] = bytes(len(_PLACEHOLDER))
    data[offset : offset + len(name)] = name
    struct.pack_into(">I", data, 16, len(name))
    check = qcow2.parse_header(bytes(data[: qcow2.READ_LIMIT]), len(data), "new overlay")
    if (check.backing_file, check.backing_format, check.virtual_size) != (
        backing_file,
        backing_fmt,
        size,
    ):
        raise exception.PrivilegedArgumentRefused(f"backing file {backing_file!r} does not fit")
    return bytes(data)


@entrypoint(file_pctxt)
def qemu_img_info(path: str, fmt: str, backing_chain: bool = False) -> list[dict]:
    """``qemu-img info --output=json -U`` of the image (and with ``backing_chain``
    every layer below it), one dict per layer, top first, each with its real path.

    qemu-img sees one layer at a time (its backing cut off), so it opens
    nothing but the checked descriptor it is given.
    """
    s = settings()
    fmt = confine.image_format(fmt)
    if runner.via_commands():
        return legacy.qemu_img_info(path, fmt, backing_chain)
    result = []
    with (
        _directory(path, "image") as (dirfd, directory, name),
        images.open_chain(dirfd, directory, name, fmt, None if backing_chain else 1) as chain,
    ):
        for i, layer in enumerate(chain.layers):
            _rc, out, _err = _run(
                ["qemu-img", "info", "--output=json", "-U", chain.spec(i, 1)],
                (layer.fd,),
                f"qemu-img info {os.path.join(directory, layer.name)}",
                max_memory_mib=s.info_max_memory,
                max_cpu_seconds=s.info_max_cpu,
            )
            info = json.loads(out)
            info["filename"] = os.path.join(directory, layer.name)
            result.append(info)
    return result


@entrypoint(file_pctxt)
def qemu_img_commit(path: str, fmt: str = "qcow2") -> int:
    """Merge the overlay at ``path`` into its backing file; the layers qemu-img was given.

    ``-d``: the overlay is not emptied afterwards. It is deleted next anyway,
    and emptying it aborts on GlusterFS FUSE mounts ("First cluster in emptied
    image is in use"). Committing the same overlay twice (crash recovery)
    copies the same data again, which is harmless.

    Only the overlay and its backing file are opened (and checked) when
    :func:`commit_needs_only_two` says nothing below them can be read: then
    qemu-img gets the backing file with ``"backing": null`` and the cost no
    longer grows with the chain's depth. Otherwise the whole chain, as before.
    """
    if confine.image_format(fmt) != "qcow2":
        raise exception.PrivilegedArgumentRefused("only a qcow2 overlay can be committed")
    if runner.via_commands():
        legacy.qemu_img_commit(path)
        return 0
    with _directory(path, "image") as (dirfd, directory, name):
        with images.open_chain(dirfd, directory, name, "qcow2", max_depth=2) as two:
            if len(two.layers) < 2:
                raise exception.PrivilegedArgumentRefused(
                    f"{path!r} has no backing file to commit into"
                )
            if commit_needs_only_two(two.layers[0], two.layers[1]):
                argv = ["qemu-img", "commit", "-q", "-d", two.spec()]
                _run(argv, two.fds(), f"qemu-img commit {path}")
                return len(two.layers)
        with images.open_chain(dirfd, directory, name, "qcow2") as chain:
            argv = ["qemu-img", "commit", "-q", "-d", chain.spec()]
            _run(argv, chain.fds(), f"qemu-img commit {path}")
            return len(chain.layers)


#: The granularity of qemu-img commit's copy (an active commit is a mirror
#: job): the target's cluster size, clamped to 4 KiB .. 64 KiB
#: (``bdrv_get_default_bitmap_granularity``).
_MIRROR_MIN, _MIRROR_MAX = 4096, 65536


def commit_needs_only_two(top: images.Layer, below: images.Layer) -> bool:
    """Whether committing ``top`` into ``below`` reads nothing beneath ``below``.

    qemu-img commit copies ``top``'s allocated data into ``below`` in chunks
    of the mirror granularity G (``below``'s cluster size, clamped to 4-64
    KiB). It reads beneath ``below`` only to fill the rest of a ``below``
    cluster it writes partly (copy-on-write from ``below``'s backing file),
    to zero an area it grows ``below`` by (when that backing file is longer),
    or when G is smaller than ``below``'s cluster (it then widens each copy
    to whole clusters, reading them through the chain). So the chain may be
    cut below ``below`` when:

    * ``below`` is raw or has no backing file (there is nothing beneath), or
    * ``below``'s cluster is at most 64 KiB (no widening), ``top``'s
      allocation unit (cluster, or subcluster with extended L2) is a multiple
      of G (each chunk it dirties is whole ``top`` data, never read through
      into ``below``; and G covers whole ``below`` clusters), ``below`` is
      no shorter than ``top`` (it is not grown), and ``top``'s size is a
      multiple of G or equal to ``below``'s (no partial last chunk inside
      ``below``).

    Proven by tests that read back every byte for each case, allowed or not
    (tests/functional/test_commit_cut.py).
    """
    if below.format == "raw" or below.backing is None:
        return True
    if top.allocation_unit is None or below.cluster_size is None:
        return False
    if below.cluster_size > _MIRROR_MAX:
        return False
    grain = max(_MIRROR_MIN, below.cluster_size)
    if top.allocation_unit % grain:
        return False
    if below.virtual_size < top.virtual_size:
        return False
    return top.virtual_size % grain == 0 or top.virtual_size == below.virtual_size


@entrypoint(file_pctxt)
def qemu_img_rebase(path: str, backing_file: str, backing_fmt: str, unsafe: bool = True) -> None:
    """Point the qcow2 overlay at ``path`` to another backing file (``-u``: names only).

    Only the unsafe form exists (the drivers merge data with commit first);
    the new backing file must be one of the same volume's files, and is
    checked with its chain before the name is written.
    """
    if not unsafe:
        raise exception.PrivilegedArgumentRefused("only unsafe (-u) rebases are offered")
    backing_fmt = confine.image_format(backing_fmt)
    if runner.via_commands():
        legacy.qemu_img_rebase(path, backing_file, backing_fmt)
        return
    with (
        _directory(path, "image") as (dirfd, directory, name),
        images.open_chain(dirfd, directory, name, "qcow2", max_depth=1) as top,
    ):
        if not images.backing_allowed(images.volume_of(name), backing_file):
            raise exception.PrivilegedArgumentRefused(
                f"backing file {backing_file!r} of {name!r} must be a file of the same "
                f"volume in the same directory"
            )
        with images.open_chain(dirfd, directory, backing_file, backing_fmt, max_depth=1):
            pass  # it exists, is one of the volume's files, of that format (see create)
        argv = ["qemu-img", "rebase", "-q", "-u", "-f", "qcow2", "-b", backing_file]
        argv += ["-F", backing_fmt, f"/proc/self/fd/{top.top.fd}"]
        _run(argv, top.fds(), f"qemu-img rebase -u {path} onto {backing_file}")


@entrypoint(file_pctxt)
def qemu_img_resize(path: str, fmt: str, size_bytes: int, skip_backing: bool = False) -> None:
    """Grow an image to ``size_bytes`` (shrinking is refused by qemu-img).

    ``skip_backing`` opens a qcow2 image without its backing chain (the
    header, backing name included, is kept as it is). qemu-img reads the
    backing file only to learn whether it is longer than the image, in which
    case the new area must be zeroed; the caller passes ``skip_backing`` when
    its checked headers say it is not. On a network filesystem that saves one
    open per link (GlusterFS here: 13.5 ms instead of 24 ms with two links).
    """
    fmt = confine.image_format(fmt)
    size = str(confine.positive_int(size_bytes, "size"))
    if runner.via_commands():
        legacy.qemu_img_resize(path, fmt, size, skip_backing)
        return
    depth = 1 if skip_backing else None
    with (
        _directory(path, "image") as (dirfd, directory, name),
        images.open_chain(dirfd, directory, name, fmt, depth) as chain,
    ):
        _run(
            ["qemu-img", "resize", "-q", chain.spec(), size], chain.fds(), f"qemu-img resize {path}"
        )


@entrypoint(file_pctxt)
def qemu_img_convert(
    src: str, src_fmt: str, dst: str, dst_fmt: str, sparse: bool = True, mode: int = 0o600
) -> None:
    """Copy an image (or a whole chain, flattened) into a new file ``dst``.

    ``src`` is checked like every image (a file outside a volume, such as a
    downloaded image in the conversion directory, may have no backing file
    at all); ``dst`` must not exist yet and is created with ``mode``.
    """
    src_fmt, dst_fmt = confine.image_format(src_fmt), confine.image_format(dst_fmt)
    if runner.via_commands():
        legacy.qemu_img_convert(src, src_fmt, dst, dst_fmt, sparse, mode)
        return
    with (
        _directory(src, "source image") as (sdir, sdirectory, sname),
        images.open_chain(sdir, sdirectory, sname, src_fmt) as chain,
        _directory(dst, "destination image") as (ddir, ddirectory, dname),
        _new_file(ddir, ddirectory, dname, mode) as fd,
    ):
        argv = ["qemu-img", "convert", "-q", *([] if sparse else ["-S", "0"])]
        argv += copy_options(chain, fd, sparse)
        argv += ["-O", dst_fmt, chain.spec(), f"/proc/self/fd/{fd}"]
        _run(argv, (*chain.fds(), fd), f"qemu-img convert {src} {dst}")


#: Filesystems whose copy_file_range shares or offloads the data: XFS and btrfs
#: (reflinks), NFS (a server-side COPY from 4.2 on).
_OFFLOADING = frozenset({0x58465342, 0x9123683E, 0x6969})
#: From this much allocated source data on, O_DIRECT (``-t none -T none``)
#: beats the page cache (measured: benchmarks/scale.py, "data"): below it the
#: page cache's read-ahead and write-behind win; above it, writing through
#: the cache and then fsyncing the result costs several times the copy.
DIRECT_FROM_BYTES = 256 * 1024 * 1024


def _fs_type(fd: int) -> int | None:
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type is its first field
    if confine._libc.fstatfs(fd, buf) != 0:
        return None
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def _direct_ok(fd: int) -> bool:
    """Whether the file behind ``fd`` can be opened with O_DIRECT (tmpfs cannot)."""
    try:
        probe = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(probe)
    return True


def copy_options(chain: images.OpenChain, dst_fd: int, sparse: bool) -> list[str]:
    """qemu-img convert's copy options for this chain into this new file.

    Copy offload (``-C``: copy_file_range) where the destination filesystem
    shares or offloads the data (a reflink on XFS and btrfs, a server-side
    copy on NFS 4.2); not with ``-S 0`` (thick), which qemu-img refuses with
    it. Otherwise O_DIRECT on both sides for large copies (see
    :data:`DIRECT_FROM_BYTES`), where both files allow it. Either way the
    daemon fsyncs the new file before it returns (``_new_file``).
    """
    if sparse and _fs_type(dst_fd) in _OFFLOADING:
        return ["-C"]
    data = sum(os.fstat(layer.fd).st_blocks * 512 for layer in chain.layers)
    fds = (dst_fd, *chain.fds())
    if data >= DIRECT_FROM_BYTES and all(_direct_ok(fd) for fd in fds):
        return ["-t", "none", "-T", "none"]
    return []


@entrypoint(file_pctxt)
def qemu_img_check(path: str, fmt: str = "qcow2") -> dict:
    """``qemu-img check --output=json`` of one image; exit codes 2 and 3 (damage) give data too."""
    s = settings()
    fmt = confine.image_format(fmt)
    if runner.via_commands():
        return legacy.qemu_img_check(path, fmt)
    with (
        _directory(path, "image") as (dirfd, directory, name),
        images.open_chain(dirfd, directory, name, fmt, max_depth=1) as chain,
    ):
        rc, out, _err = _run(
            ["qemu-img", "check", "--output=json", chain.spec()],
            chain.fds(),
            f"qemu-img check {path}",
            max_memory_mib=s.info_max_memory,
            max_cpu_seconds=s.info_max_cpu,
            ok_codes=(0, 2, 3),
        )
    result = json.loads(out) if out.strip() else {}
    result["filename"] = path
    result["exit_code"] = rc
    return result


@entrypoint(file_pctxt)
def image_chain(path: str, raw: list[str] | None = None, fmt: str | None = None) -> list[dict]:
    """Headers of ``path`` and every backing file below it, top first, checked.

    Read in Python by descriptor (no process per link: see
    benchmarks/image_header.py) under the same rules as every qemu-img call
    here: a chain that names anything but the same volume's files, or lacks
    a backing format, is refused (InvalidImage). Files named in ``raw`` are
    raw by the caller's records and are never parsed: a guest may have
    written anything, a fake qcow2 header included, into a raw volume.
    ``fmt``: the top's format; by default the header decides (qcow2 magic or
    raw). In the rootwrap modes, where this process cannot read the images,
    one ``qemu-img info --backing-chain -U -f`` gives the same fields.
    """
    if runner.via_commands():
        top_raw = os.path.basename(os.path.normpath(path)) in (raw or ())
        return legacy.image_chain(path, fmt or ("raw" if top_raw else "qcow2"))
    from remotefs_aa.privsep import qcow2

    names = frozenset(raw or ())
    with _directory(path, "image") as (dirfd, directory, name):
        if fmt is None:
            if name in names:
                fmt = "raw"
            else:
                fd = images.open_image(dirfd, directory, name)
                try:
                    fmt = qcow2.read_header_fd(fd, path).format
                finally:
                    os.close(fd)
        with images.open_chain(dirfd, directory, name, fmt, raw=names) as chain:
            return [
                {
                    "filename": os.path.join(directory, layer.name),
                    "format": layer.format,
                    "virtual_size": layer.virtual_size,
                    "backing_file": layer.backing,
                    "backing_format": (
                        chain.layers[i + 1].format if i + 1 < len(chain.layers) else None
                    ),
                    "data_file": None,
                    "encrypted": False,
                }
                for i, layer in enumerate(chain.layers)
            ]


@entrypoint(file_pctxt)
def write_pattern(path: str, fmt: str, offset: int, length: int, pattern: int) -> None:
    """Fill ``length`` bytes at ``offset`` of the image with byte ``pattern`` (qemu-io).

    What a guest would write: the demo and the verification of every chain
    use it, so they run as an unprivileged service too. Only a pattern, an
    offset and a length cross over; no qemu-io command text does.
    """
    command = (
        f"write -P {_byte(pattern)} {_offset(offset)} {confine.positive_int(length, 'length')}"
    )
    fmt = confine.image_format(fmt)
    if runner.via_commands():
        legacy.qemu_io(path, fmt, command, read_only=False)
        return
    with (
        _directory(path, "image") as (dirfd, directory, name),
        images.open_chain(dirfd, directory, name, fmt) as chain,
    ):
        _run(["qemu-io", "-c", command, chain.spec()], chain.fds(), f"qemu-io {path}")


@entrypoint(file_pctxt)
def pattern_matches(path: str, fmt: str, offset: int, length: int, pattern: int) -> bool:
    """Does the image read back ``pattern`` in every byte of the range? (read-only)."""
    command = f"read -P {_byte(pattern)} {_offset(offset)} {confine.positive_int(length, 'length')}"
    fmt = confine.image_format(fmt)
    if runner.via_commands():
        rc, out, err = legacy.qemu_io(path, fmt, command, read_only=True)
    else:
        with (
            _directory(path, "image") as (dirfd, directory, name),
            images.open_chain(dirfd, directory, name, fmt) as chain,
        ):
            rc, out, err = _run(
                ["qemu-io", "-r", "-U", "-c", command, chain.spec()],
                chain.fds(),
                f"qemu-io -r {path}",
                ok_codes=(0, 1),
            )
    if "verification failed" in out + err:
        return False
    if rc != 0:
        raise exception.PrivilegedCommandFailed(f"qemu-io -r {path}", rc, err or out)
    return True


def _byte(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
        raise exception.PrivilegedArgumentRefused(f"pattern must be a byte, not {value!r}")
    return value


def _offset(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise exception.PrivilegedArgumentRefused(f"offset must be >= 0, not {value!r}")
    return value


@entrypoint(file_pctxt)
def volume_state(directory: str, base: str, default_format: str, walk: bool = True) -> dict:
    """Everything a chain operation reads first, in one round trip, by name only.

    ``{"info": text of <base>.info (or of a newer claim) or None, "deleting":
    bool, "files": {name: 0} of this volume's files found among those looked
    up, "chain": headers from the active image down (or None)}``.

    Nothing is listed: the cost is the volume's own, however many other
    volumes share the directory. Looked up are ``<base>.info`` and the claims
    above it, the deletion marker, the base, the chain from the active image
    down (``walk``), the files a recorded intent names, and the temp file the
    next generation's publisher would use (a leftover of one that died, for
    the locked caller to remove). Nothing here is trusted by the daemon: the
    active name is only used to start the walk (if it is one of the volume's
    file names); the caller validates the .info text and every header exactly
    as if it had read them one by one.
    """
    from remotefs_aa.privsep import files

    if images.volume_of(base) is None or "." in base:
        raise exception.PrivilegedArgumentRefused(f"{base!r} is not a volume's base file name")
    if runner.via_commands():
        return legacy.volume_state(directory, base, default_format, walk)
    dirfd = confine.open_beneath(
        directory, settings().allowed_paths, "directory", confine.DIR_FLAGS, allow_base=True
    )
    try:
        found: dict[str, int] = {}
        # A link or a non-file where the .info or a claim should be is refused,
        # never read as "no .info": that would show the volume as its bare base.
        text = files.effective_info(dirfd, base)
        active: str | None = base
        fmt = default_format
        named: list[object] = []
        generation = 0
        if text is not None:
            found[base + ".info"] = 0
            try:
                data = json.loads(text)
                fmt = data.get("format", default_format)
                active = data.get("active")
                generation = files._generation_of(text)
                intent = data.get("intent")
                if isinstance(intent, dict):
                    named = [intent.get(k) for k in ("file", "base", "higher", "tmp")]
                if images.volume_of(active) != images.volume_of(base):
                    active = None
            except (ValueError, AttributeError, TypeError):
                active = None
        chain = None
        if walk and isinstance(active, str) and files.exists_at(dirfd, active):
            try:
                chain = image_chain.__wrapped__(  # type: ignore[attr-defined]
                    os.path.join(directory, active), [base] if fmt == "raw" else None
                )
                found.update((os.path.basename(link["filename"]), 0) for link in chain)
            except (OSError, exception.RemoteFSAAError):
                chain = None  # the caller reads it again and reports the problem
        volume = images.volume_of(base)
        wanted = [base, f".{base}.deleting", files.info_tmp_name(base, generation + 1), *named]
        for name in wanted:
            if (
                isinstance(name, str)
                and name not in found
                and (images.volume_of(name) == volume or name.startswith(f".{base}."))
                and "/" not in name
                and files.exists_at(dirfd, name)
            ):
                found[name] = 0
    finally:
        os.close(dirfd)
    deleting = f".{base}.deleting"
    return {"info": text, "deleting": deleting in found, "files": found, "chain": chain}


@entrypoint(file_pctxt)
def share_scan(directory: str, default_format: str) -> dict:
    """One pass over a share: what stats, ``volume list`` and the leftover sweep need.

    One directory read (names and types from readdir; a stat only for a raw
    base that is its volume's active image, for its size), and per volume its
    ``.info`` text (with any newer claim, from names the read already has)
    and the header of its active image: ``{"volumes": {id: {"info": text or
    None, "deleting": bool, "base": bool, "size": virtual size of the active
    image or None, "error": why it could not be read or None, "files": [every
    name of the volume]}}}``. Nothing else is opened, so its cost is one read
    of the directory plus one header per volume, not one directory read per
    volume. Headers are read as every chain walk reads them (by descriptor,
    no link followed, raw never parsed when the ``.info`` says raw); the
    caller validates the ``.info`` texts.
    """
    fmt_default = confine.image_format(default_format)
    if runner.via_commands():
        return legacy.share_scan(directory, fmt_default)
    dirfd = confine.open_beneath(
        directory, settings().allowed_paths, "directory", confine.DIR_FLAGS, allow_base=True
    )
    try:
        from remotefs_aa.privsep import files

        by_volume: dict[str, list[str]] = {}
        for name in files.scan_fd(dirfd, ("volume-", ".volume-"), sizes=False):
            match = images.ANY_OF_VOLUME.match(name)
            if match is not None:
                by_volume.setdefault(match["vol"], []).append(name)
        volumes = {}
        for vid, names in by_volume.items():
            volumes[vid] = _scan_volume(dirfd, directory, vid, names, fmt_default)
    finally:
        os.close(dirfd)
    return {"volumes": volumes}


def _scan_volume(dirfd: int, directory: str, vid: str, names: list[str], fmt: str) -> dict:
    """One volume of :func:`share_scan`: its ``.info`` text and its active image's size."""
    from remotefs_aa.privsep import files, qcow2

    base = f"volume-{vid}"
    present = set(names)
    text: str | None = None
    error: str | None = None
    if base + ".info" in present or any(n.startswith(f".{base}.gen.") for n in present):
        try:
            text = files.effective_info(dirfd, base, present)
        except (OSError, exception.RemoteFSAAError) as exc:
            error = f"{base}.info cannot be read: {exc}"
    active: object = base
    if text is not None:
        try:
            data = json.loads(text)
            fmt = data.get("format", fmt) if data.get("format") in images.FORMATS else fmt
            active = data.get("active")
        except (ValueError, AttributeError):
            active = None  # the caller reports the unusable file
    size = None
    if isinstance(active, str) and active in present and images.backing_allowed(vid, active):
        path = os.path.join(directory, active)
        try:
            fd = images.open_image(dirfd, directory, active)
            try:
                if active == base and fmt == "raw":
                    size = os.fstat(fd).st_size  # raw is raw: never parsed
                else:
                    header = qcow2.read_header_fd(fd, path)
                    size = header.virtual_size
            finally:
                os.close(fd)
        except FileNotFoundError:
            pass  # removed since the directory read: reported without a size
        except (OSError, exception.RemoteFSAAError) as exc:
            error = error or str(exc)
    if size is None and base in present:
        # No usable active image (an unreadable .info, say): the base file's
        # length, what a listing used to report for it.
        with contextlib.suppress(OSError):
            size = os.stat(base, dir_fd=dirfd, follow_symlinks=False).st_size
    return {
        "info": text,
        "deleting": f".{base}.deleting" in present,
        "base": base in present,
        "size": size,
        "error": error,
        "files": sorted(names),
    }
