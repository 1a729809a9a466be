"""qemu-img subcommands the drivers need, with only the flags they need.

Every image path must lie under ``[privileged] allowed_paths``; a backing
file is a plain name in the overlay's own directory (relative, so any host
can open the chain). ``info`` and ``check`` parse images a tenant may have
crafted, so they run under address-space and CPU-time limits.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat

from remotefs_aa import exception
from remotefs_aa.privsep import confine, entrypoint, file_pctxt, runner, settings


def _image(path: str, what: str = "image") -> str:
    return confine.resolve_inside(path, settings().allowed_paths, what)


def _backing(image: str, backing_file: str) -> str:
    name = confine.backing_name(backing_file)
    target = os.path.join(os.path.dirname(image), name)
    confine.resolve_inside(target, settings().allowed_paths, "backing file")
    return name


@entrypoint(file_pctxt)
def qemu_img_create(
    path: str,
    fmt: str,
    size_bytes: int | None = None,
    backing_file: str | None = None,
    backing_fmt: str | None = None,
) -> None:
    """Create an image; with ``backing_file``, a qcow2 overlay on that file."""
    image = _image(path)
    argv = ["qemu-img", "create", "-q", "-f", confine.image_format(fmt)]
    if backing_file is not None:
        if fmt != "qcow2":
            raise exception.PrivilegedArgumentRefused("only qcow2 images can have a backing file")
        argv += ["-b", _backing(image, backing_file), "-F", confine.image_format(backing_fmt or "")]
        if size_bytes is not None:
            # The caller checked the chain (and gave the size): qemu-img need
            # not open every backing file again, which costs ms per link.
            argv.append("-u")
    elif size_bytes is None:
        raise exception.PrivilegedArgumentRefused("an image without a backing file needs a size")
    argv.append(image)
    if size_bytes is not None:
        argv.append(str(confine.positive_int(size_bytes, "size")))
    runner.run(argv, timeout=settings().command_timeout)


@entrypoint(file_pctxt)
def qemu_img_info(
    path: str, fmt: str | None = None, backing_chain: bool = False, force_share: bool = False
) -> dict | list:
    """``qemu-img info --output=json``: a dict, or a list with ``backing_chain``."""
    s = settings()
    argv = ["qemu-img", "info", "--output=json"]
    if fmt is not None:
        argv += ["-f", confine.image_format(fmt)]
    if backing_chain:
        argv.append("--backing-chain")
    if force_share:
        argv.append("-U")
    argv.append(_image(path))
    _rc, out, _err = runner.run(
        argv,
        timeout=s.command_timeout,
        max_memory_mib=s.info_max_memory,
        max_cpu_seconds=s.info_max_cpu,
    )
    return json.loads(out)


@entrypoint(file_pctxt)
def qemu_img_commit(path: str, fmt: str = "qcow2") -> None:
    """Merge the overlay at ``path`` into its backing file.

    ``-d``: the overlay is not emptied afterwards. It is deleted next anyway,
    and emptying it aborts on GlusterFS FUSE mounts ("First cluster in emptied
    image is in use"). Committing the same overlay twice (crash recovery)
    copies the same data again, which is harmless.
    """
    argv = ["qemu-img", "commit", "-q", "-d", "-f", confine.image_format(fmt), _image(path)]
    runner.run(argv, timeout=settings().command_timeout)


@entrypoint(file_pctxt)
def qemu_img_rebase(path: str, backing_file: str, backing_fmt: str, unsafe: bool = False) -> None:
    """Point the qcow2 overlay at ``path`` to another backing file."""
    image = _image(path)
    argv = ["qemu-img", "rebase", "-q", "-f", "qcow2"]
    if unsafe:
        argv.append("-u")
    argv += ["-b", _backing(image, backing_file), "-F", confine.image_format(backing_fmt), image]
    runner.run(argv, timeout=settings().command_timeout)


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
    image = _image(path)
    size = str(confine.positive_int(size_bytes, "size"))
    fmt = confine.image_format(fmt)
    if skip_backing and fmt == "qcow2" and not set(image) & {'"', "\\"}:
        # (A path that JSON would escape takes the plain form: the rootwrap
        # filter matches the spec literally.)
        spec = {"driver": "qcow2", "file": {"driver": "file", "filename": image}, "backing": None}
        argv = ["qemu-img", "resize", "-q", "-f", "qcow2", "json:" + json.dumps(spec), size]
    else:
        argv = ["qemu-img", "resize", "-q", "-f", fmt, image, size]
    runner.run(argv, timeout=settings().command_timeout)


@entrypoint(file_pctxt)
def qemu_img_convert(src: str, src_fmt: str, dst: str, dst_fmt: str, sparse: bool = True) -> None:
    """Copy an image (or a whole chain, flattened) into a new file."""
    argv = ["qemu-img", "convert", "-q", "-f", confine.image_format(src_fmt)]
    argv += ["-O", confine.image_format(dst_fmt)]
    if not sparse:
        argv += ["-S", "0"]
    argv += [_image(src, "source image"), _image(dst, "destination image")]
    runner.run(argv, timeout=settings().command_timeout)


@entrypoint(file_pctxt)
def qemu_img_check(path: str, fmt: str = "qcow2") -> dict:
    """``qemu-img check --output=json``; exit codes 2 and 3 (damage) return data too."""
    s = settings()
    argv = ["qemu-img", "check", "--output=json", "-f", confine.image_format(fmt), _image(path)]
    rc, out, _err = runner.run(
        argv,
        timeout=s.command_timeout,
        max_memory_mib=s.info_max_memory,
        max_cpu_seconds=s.info_max_cpu,
        ok_codes=(0, 2, 3),
    )
    result = json.loads(out) if out.strip() else {}
    result["exit_code"] = rc
    return result


#: Longer chains are refused: a loop or a hostile image, not a real volume.
MAX_CHAIN_DEPTH = 512


@entrypoint(file_pctxt)
def image_chain(path: str, raw: list[str] | None = None) -> list[dict]:
    """Headers of ``path`` and every backing file below it, top first.

    Read from the image headers in Python (no process per link: see
    benchmarks/image_header.py), each link confined like any path. Backing
    names are returned as stored; the caller decides whether to trust them,
    and the walk stops at a backing name that is not a plain file name in the
    same directory (the caller then refuses the chain). Files named in
    ``raw`` are raw by the caller's records and are never parsed: a guest may
    have written anything, a fake qcow2 header included, into a raw volume. In the rootwrap modes,
    where this process cannot read the images, one ``qemu-img info
    --backing-chain -U`` gives the same fields.
    """
    from remotefs_aa.image import qcow2

    top = _image(path)
    if runner.via_commands():
        from remotefs_aa.image.qemu import ImageInfo

        infos = qemu_img_info.__wrapped__(path, backing_chain=True, force_share=True)
        return [dataclasses.asdict(ImageInfo.from_json(info)) for info in infos]
    # The top was resolved and confined; every backing file must be a plain
    # name in the same directory, opened without following symlinks, so no
    # per-link realpath is needed.
    folder = os.path.dirname(top)
    chain: list[dict] = []
    seen: set[str] = set()
    current, follow = top, True
    while True:
        if current in seen or len(chain) >= MAX_CHAIN_DEPTH:
            raise exception.PrivilegedArgumentRefused(
                f"backing chain of {path!r} loops or is deeper than {MAX_CHAIN_DEPTH}"
            )
        seen.add(current)
        try:
            if os.path.basename(current) in (raw or ()):
                st = os.stat(current) if follow else os.lstat(current)
                if not stat.S_ISREG(st.st_mode):
                    return chain
                chain.append(
                    {
                        "filename": current,
                        "format": "raw",
                        "virtual_size": st.st_size,
                        "backing_file": None,
                        "backing_format": None,
                        "data_file": None,
                        "encrypted": False,
                    }
                )
                return chain
            header = qcow2.read_header(current, follow_symlinks=follow)
        except OSError:
            if not chain:
                raise
            return chain  # missing, or a symlink: the caller refuses the chain
        chain.append(
            {
                "filename": current,
                "format": header.format,
                "virtual_size": header.virtual_size,
                "backing_file": header.backing_file,
                "backing_format": header.backing_format,
                "data_file": header.data_file,
                "encrypted": header.encrypted,
            }
        )
        name = header.backing_file
        if not name:
            return chain
        try:
            current = os.path.join(folder, confine.backing_name(name))
        except exception.PrivilegedArgumentRefused:
            return chain
        follow = False


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
    argv = ["qemu-io", "-f", confine.image_format(fmt), "-c", command, _image(path)]
    runner.run(argv, timeout=settings().command_timeout)


@entrypoint(file_pctxt)
def pattern_matches(path: str, fmt: str, offset: int, length: int, pattern: int) -> bool:
    """Does the image read back ``pattern`` in every byte of the range? (read-only)."""
    command = f"read -P {_byte(pattern)} {_offset(offset)} {confine.positive_int(length, 'length')}"
    argv = ["qemu-io", "-r", "-U", "-f", confine.image_format(fmt), "-c", command, _image(path)]
    _rc, out, err = runner.run(argv, timeout=settings().command_timeout, ok_codes=(0, 1))
    if "verification failed" in out + err:
        return False
    if _rc != 0:
        raise exception.PrivilegedCommandFailed(" ".join(argv), _rc, err or out)
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
    walk (if it is a plain file name); the caller validates the .info text and
    every header exactly as if it had read them one by one.
    """
    from remotefs_aa.privsep import files

    folder = confine.resolve_inside(directory, settings().allowed_paths, "directory")
    name = confine.backing_name(base)
    if runner.via_commands():
        listing = files.list_directory.__wrapped__(folder)
    else:
        # Only this volume's files, names only: callers need no sizes.
        listing = files.scan(folder, (name, f".{name}"), sizes=False)
    text = None
    if name + ".info" in listing:
        try:
            text = files.read_file.__wrapped__(os.path.join(folder, name + ".info"))
        except FileNotFoundError:
            text = None
    active: str | None = name
    fmt = default_format
    if text is not None:
        try:
            data = json.loads(text)
            fmt = data.get("format", default_format)
            active = confine.backing_name(data.get("active"))
        except (ValueError, AttributeError, exception.PrivilegedArgumentRefused):
            active = None
    chain = None
    if walk and active and active in listing:
        try:
            chain = image_chain.__wrapped__(
                os.path.join(folder, active), [name] if fmt == "raw" else None
            )
        except (OSError, exception.RemoteFSAAError):
            chain = None  # the caller reads it again and reports the problem
    return {
        "info": text,
        "deleting": f".{name}.deleting" in listing,
        "files": listing,
        "chain": chain,
    }
