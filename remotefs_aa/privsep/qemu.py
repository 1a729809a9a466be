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
import json
import os
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
    of the same volume's files in the same directory; it is checked (with
    its whole chain) but not opened by qemu-img (``-u``), and the size
    defaults to the backing file's.
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
            with images.open_chain(dirfd, directory, backing_file, backing_fmt) as below:
                size = below.top.virtual_size if size_bytes is None else size_bytes
            argv += ["-b", backing_file, "-F", backing_fmt, "-u"]
        elif size_bytes is None:
            raise exception.PrivilegedArgumentRefused(
                "an image without a backing file needs a size"
            )
        else:
            size = size_bytes
        size = confine.positive_int(size, "size")
        with _new_file(dirfd, directory, name, mode) as fd:
            _run([*argv, f"/proc/self/fd/{fd}", str(size)], (fd,), f"qemu-img create {path}")


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
def qemu_img_commit(path: str, fmt: str = "qcow2") -> None:
    """Merge the overlay at ``path`` into its backing file.

    ``-d``: the overlay is not emptied afterwards. It is deleted next anyway,
    and emptying it aborts on GlusterFS FUSE mounts ("First cluster in emptied
    image is in use"). Committing the same overlay twice (crash recovery)
    copies the same data again, which is harmless.
    """
    if confine.image_format(fmt) != "qcow2":
        raise exception.PrivilegedArgumentRefused("only a qcow2 overlay can be committed")
    if runner.via_commands():
        legacy.qemu_img_commit(path)
        return
    with (
        _directory(path, "image") as (dirfd, directory, name),
        images.open_chain(dirfd, directory, name, "qcow2") as chain,
    ):
        if len(chain.layers) < 2:
            raise exception.PrivilegedArgumentRefused(
                f"{path!r} has no backing file to commit into"
            )
        _run(
            ["qemu-img", "commit", "-q", "-d", chain.spec()], chain.fds(), f"qemu-img commit {path}"
        )


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
        with images.open_chain(dirfd, directory, backing_file, backing_fmt):
            pass  # it exists and its chain is sound
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
        argv += ["-O", dst_fmt, chain.spec(), f"/proc/self/fd/{fd}"]
        _run(argv, (*chain.fds(), fd), f"qemu-img convert {src} {dst}")


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
    """Everything a chain operation reads first, in one round trip.

    ``{"info": text of <base>.info or None, "deleting": bool, "files": {name:
    0} for this volume's files only (names; sizes are not read), "chain":
    headers from the active image down (or None)}``. Nothing
    here is trusted by the daemon: the active name is only used to start the
    walk (if it is one of the volume's file names); the caller validates the
    .info text and every header exactly as if it had read them one by one.
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
        # Only this volume's files, names only: callers need no sizes.
        listing = files.scan_fd(dirfd, (base, f".{base}"), sizes=False)
        text = None
        if base + ".info" in listing or any(n.startswith(f".{base}.gen.") for n in listing):
            text = files.effective_info(dirfd, base, set(listing))
        active: str | None = base
        fmt = default_format
        if text is not None:
            try:
                data = json.loads(text)
                fmt = data.get("format", default_format)
                active = data.get("active")
                if images.volume_of(active) != images.volume_of(base):
                    active = None
            except (ValueError, AttributeError, TypeError):
                active = None
        chain = None
        if walk and active and active in listing:
            try:
                chain = image_chain.__wrapped__(  # type: ignore[attr-defined]
                    os.path.join(directory, active), [base] if fmt == "raw" else None
                )
            except (OSError, exception.RemoteFSAAError):
                chain = None  # the caller reads it again and reports the problem
    finally:
        os.close(dirfd)
    return {
        "info": text,
        "deleting": f".{base}.deleting" in listing,
        "files": listing,
        "chain": chain,
    }
