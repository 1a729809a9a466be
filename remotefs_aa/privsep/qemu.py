"""qemu-img subcommands the drivers need, with only the flags they need.

Every image path must lie under ``[privileged] allowed_paths``; a backing
file is a plain name in the overlay's own directory (relative, so any host
can open the chain). ``info`` and ``check`` parse images a tenant may have
crafted, so they run under address-space and CPU-time limits.
"""

from __future__ import annotations

import json
import os

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
    """Merge the overlay at ``path`` into its backing file."""
    argv = ["qemu-img", "commit", "-q", "-f", confine.image_format(fmt), _image(path)]
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
def qemu_img_resize(path: str, fmt: str, size_bytes: int) -> None:
    """Grow an image to ``size_bytes`` (shrinking is refused by qemu-img)."""
    argv = ["qemu-img", "resize", "-q", "-f", confine.image_format(fmt), _image(path)]
    runner.run(
        [*argv, str(confine.positive_int(size_bytes, "size"))], timeout=settings().command_timeout
    )


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
