"""The entrypoints' commands in the legacy rootwrap modes (``rootwrap_daemon``, ``sudo_rootwrap``).

There the entrypoint bodies run in the *service's* process, which is not
root; each step becomes one command that oslo.rootwrap runs as root if a
generated filter (``rootwrap_filters.py``) matches its text. That is as far
as those modes can go: paths are checked by name in the service and used by
name again by the command, a command cannot be handed an open descriptor,
and a service that can run rootwrap can run any command a filter allows
with any matching path, checks or not. **These modes trust the service user
with root**; the service says so at start, and ``[privileged] mode =
privsep`` (the default) is the one that does not.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
from collections.abc import Collection

from remotefs_aa import exception
from remotefs_aa.privsep import confine, images, runner, settings

#: Logged once at start-up in the rootwrap modes.
WARNING = (
    "[privileged] mode = %s is a legacy mode that trusts the service user with root: "
    "rootwrap runs commands by path, so checks made here can be raced and bypassed. "
    "Use mode = privsep (the default) unless you must keep rootwrap"
)


def _cmd(argv: list[str], stdin: str | None = None) -> tuple[int, str, str]:
    return runner.run(argv, timeout=settings().command_timeout, stdin=stdin)


def _path(path: str, what: str = "path") -> str:
    return confine.resolve_inside(path, settings().allowed_paths, what)


def _image(path: str, what: str = "image") -> str:
    return _path(path, what)


def _give(target: str) -> None:
    """Hand a file root just made to the service (this process), as the daemon's are."""
    _cmd(["chown", "-h", f"{os.geteuid()}:{os.getegid()}", "--", target])


def make_directory(path: str, bits: int) -> None:
    _cmd(["mkdir", "-p", "-m", f"{bits:o}", "--", _path(path, "directory")])


def unlink(path: str) -> bool:
    target = _path(path)
    if os.path.isdir(target) and not os.path.islink(target):
        raise exception.PrivilegedArgumentRefused(f"{path!r} is a directory; not removed")
    _rc, out, _err = _cmd(["rm", "-fv", "--", target])
    return bool(out.strip())


def size_file(path: str, size: int, command: str, bits: int) -> None:
    target = _path(path)
    new = not os.path.exists(target)
    flag = "-s" if command == "truncate" else "-l"
    _cmd([command, flag, str(size), "--", target])
    if new:
        _cmd(["chmod", f"{bits:o}", "--", target])
        _give(target)


def write_file_atomic(path: str, data: str, bits: int, sync_dir: bool) -> None:
    target = _path(path)
    directory = os.path.dirname(target)
    tmp = os.path.join(directory, f".tmp-{secrets.token_hex(6)}")
    try:
        _cmd(["dd", f"of={tmp}", "conv=fsync", "status=none"], stdin=data)
        _cmd(["chmod", f"{bits:o}", "--", tmp])
        _give(tmp)
        _cmd(["mv", "-fT", "--", tmp, target])
    except BaseException:
        _cmd(["rm", "-f", "--", tmp])
        raise
    if sync_dir:
        _cmd(["sync", "--", directory])


def read_file(path: str, limit: int) -> str:
    target = _path(path)
    try:
        data = _cmd(["head", "-c", str(limit + 1), "--", target])[1].encode()
    except exception.PrivilegedCommandFailed as exc:
        if "No such file" in exc.stderr:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path) from None
        raise
    if len(data) > limit:
        raise exception.PrivilegedArgumentRefused(f"{path!r} is larger than {limit} bytes")
    return data.decode()


def rename(src: str, dst: str) -> None:
    source, target = _path(src, "source"), _path(dst, "destination")
    if os.path.dirname(source) != os.path.dirname(target):
        raise exception.PrivilegedArgumentRefused(
            f"rename {src!r} -> {dst!r} leaves its directory; only same-directory renames"
        )
    _cmd(["mv", "-fT", "--", source, target])


def list_directory(path: str) -> dict[str, int]:
    out = _cmd(["ls", "-lAn", "--time-style=long-iso", "--", _path(path, "directory")])[1]
    files: dict[str, int] = {}
    for line in out.splitlines():
        # mode links uid gid size date time name
        parts = line.split(maxsplit=7)
        if len(parts) == 8 and parts[0].startswith("-"):
            files[parts[7]] = int(parts[4])
    return files


def replace_file_if(
    path: str, data: str, expected: str | None, bits: int, durable: bool
) -> str | None:
    try:
        current: str | None = read_file(path, 1024 * 1024)
    except FileNotFoundError:
        current = None
    if current != expected:
        return "" if current is None else current
    write_file_atomic(path, data, bits, durable)
    return None


def unlink_many(directory: str, names: list[str]) -> list[str]:
    folder = _path(directory, "directory")
    removed = []
    for name in names:
        _rc, out, _err = _cmd(["rm", "-fv", "--", os.path.join(folder, name)])
        if out.strip():
            removed.append(name)
    return removed


def qemu_img_create(
    path: str,
    fmt: str,
    size_bytes: int | None,
    backing_file: str | None,
    backing_fmt: str | None,
    mode: int,
) -> None:
    image = _image(path)
    argv = ["qemu-img", "create", "-q", "-f", fmt]
    if backing_file is not None:
        if fmt != "qcow2":
            raise exception.PrivilegedArgumentRefused("only qcow2 images can have a backing file")
        argv += ["-b", _backing(image, backing_file), "-F", confine.image_format(backing_fmt or "")]
        if size_bytes is not None:
            argv.append("-u")
    elif size_bytes is None:
        raise exception.PrivilegedArgumentRefused("an image without a backing file needs a size")
    argv.append(image)
    if size_bytes is not None:
        argv.append(str(confine.positive_int(size_bytes, "size")))
    runner.run(argv, timeout=settings().command_timeout)
    _cmd(["chmod", f"{confine.file_mode(mode):o}", "--", image])
    _give(image)


def _backing(image: str, backing_file: str) -> str:
    name = confine.plain_name(backing_file, "backing file")
    confine.resolve_inside(os.path.join(os.path.dirname(image), name), settings().allowed_paths)
    return name


def qemu_img_info(path: str, fmt: str, backing_chain: bool) -> list[dict]:
    s = settings()
    argv = ["qemu-img", "info", "--output=json", "-f", fmt]
    if backing_chain:
        argv.append("--backing-chain")
    argv += ["-U", _image(path)]
    _rc, out, _err = runner.run(
        argv, timeout=s.command_timeout, max_memory_mib=s.info_max_memory,
        max_cpu_seconds=s.info_max_cpu,
    )  # fmt: skip
    data = json.loads(out)
    return data if isinstance(data, list) else [data]


def qemu_img_commit(path: str) -> None:
    runner.run(
        ["qemu-img", "commit", "-q", "-d", "-f", "qcow2", _image(path)],
        timeout=settings().command_timeout,
    )


def qemu_img_rebase(path: str, backing_file: str, backing_fmt: str) -> None:
    image = _image(path)
    argv = ["qemu-img", "rebase", "-q", "-f", "qcow2", "-u"]
    argv += ["-b", _backing(image, backing_file), "-F", backing_fmt, image]
    runner.run(argv, timeout=settings().command_timeout)


def qemu_img_resize(path: str, fmt: str, size: str, skip_backing: bool) -> None:
    image = _image(path)
    if skip_backing and fmt == "qcow2" and not set(image) & {'"', "\\"}:
        # (A path that JSON would escape takes the plain form: the rootwrap
        # filter matches the spec literally.)
        spec = {"driver": "qcow2", "file": {"driver": "file", "filename": image}, "backing": None}
        argv = ["qemu-img", "resize", "-q", "-f", "qcow2", "json:" + json.dumps(spec), size]
    else:
        argv = ["qemu-img", "resize", "-q", "-f", fmt, image, size]
    runner.run(argv, timeout=settings().command_timeout)


def qemu_img_convert(
    src: str, src_fmt: str, dst: str, dst_fmt: str, sparse: bool, mode: int
) -> None:
    target = _image(dst, "destination image")
    argv = ["qemu-img", "convert", "-q", "-f", src_fmt, "-O", dst_fmt]
    if not sparse:
        argv += ["-S", "0"]
    argv += [_image(src, "source image"), target]
    runner.run(argv, timeout=settings().command_timeout)
    _cmd(["chmod", f"{confine.file_mode(mode):o}", "--", target])
    _give(target)


def qemu_img_check(path: str, fmt: str) -> dict:
    s = settings()
    argv = ["qemu-img", "check", "--output=json", "-f", fmt, _image(path)]
    rc, out, _err = runner.run(
        argv, timeout=s.command_timeout, max_memory_mib=s.info_max_memory,
        max_cpu_seconds=s.info_max_cpu, ok_codes=(0, 2, 3),
    )  # fmt: skip
    result = json.loads(out) if out.strip() else {}
    result["exit_code"] = rc
    return result


def image_chain(path: str, fmt: str) -> list[dict]:
    """The header fields ``qemu.image_chain`` reports, from one ``qemu-img info``."""
    return [
        {
            "filename": info.get("filename", ""),
            "format": info.get("format", ""),
            "virtual_size": int(info.get("virtual-size", 0)),
            "backing_file": info.get("backing-filename"),
            "backing_format": info.get("backing-filename-format"),
            "data_file": ((info.get("format-specific") or {}).get("data") or {}).get("data-file"),
            "encrypted": bool(info.get("encrypted")),
        }
        for info in qemu_img_info(path, fmt, backing_chain=True)
    ]


def qemu_io(path: str, fmt: str, command: str, read_only: bool) -> tuple[int, str, str]:
    flags = ["-r", "-U"] if read_only else []
    argv = ["qemu-io", *flags, "-f", fmt, "-c", command, _image(path)]
    return runner.run(argv, timeout=settings().command_timeout, ok_codes=(0, 1))


def volume_state(directory: str, base: str, default_format: str, walk: bool) -> dict:
    folder = _path(directory, "directory")
    listing = {
        n: 0 for n in list_directory(folder) if n.startswith(base) or n.startswith(f".{base}")
    }
    return {
        "info": _read_info(folder, base, listing),
        "deleting": f".{base}.deleting" in listing,
        "files": listing,
        "chain": None,  # the caller walks it (one qemu-img info)
    }


def _read_info(folder: str, base: str, names: Collection[str]) -> str | None:
    """``<base>.info``'s text, if the listing ``names`` has it and it is still there."""
    if base + ".info" not in names:
        return None
    try:
        return read_file(os.path.join(folder, base + ".info"), 1024 * 1024)
    except FileNotFoundError:
        return None


def share_scan(directory: str, default_format: str) -> dict:
    """The rootwrap modes' share scan: one listing, then each volume's .info and active image."""
    folder = _path(directory, "directory")
    grouped: dict[str, list[str]] = {}
    for name in list_directory(folder):
        match = images.ANY_OF_VOLUME.match(name)
        if match:
            grouped.setdefault(match["vol"], []).append(name)
    volumes = {}
    for vid, names in grouped.items():
        base = f"volume-{vid}"
        text = _read_info(folder, base, names)
        size, active, fmt = None, base, default_format
        if text is not None:
            try:
                data = json.loads(text)
                active = str(data.get("active"))
                if data.get("format") in images.FORMATS:
                    fmt = data["format"]
            except (ValueError, AttributeError):
                active = ""
        # As the daemon's own scan: only one of the volume's image names, never
        # a hidden file (a temp copy holding a tenant's bytes) the .info names.
        if active in names and images.backing_allowed(vid, active):
            top_fmt = fmt if active == base else "qcow2"
            try:
                size = image_chain(os.path.join(folder, active), top_fmt)[0]["virtual_size"]
            except exception.RemoteFSAAError:
                size = None
        volumes[vid] = {
            "info": text,
            "deleting": f".{base}.deleting" in names,
            "base": base in names,
            "size": size,
            "error": None,
            "files": sorted(names),
        }
    return {"volumes": volumes}
