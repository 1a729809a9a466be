"""Read the header of a qcow2 or raw image in Python, without running qemu-img.

Why: walking a snapshot chain with ``qemu-img info`` costs a process (tens of
milliseconds) per link, and every volume operation checks its chain before it
touches an image. The facts that check needs (format, virtual size, backing
file and its format, external data file, encryption) all sit in the first few
hundred bytes of a qcow2 file, so one ``read`` of at most 64 KiB and a few
``struct.unpack_from`` calls give them in microseconds
(``benchmarks/image_header.py`` measures both).

The header is *untrusted input*: a guest, or whoever can write to the share,
may have crafted it. So this module

* reports facts and never decides policy: an image with a backing file named
  ``/etc/shadow`` or an external data file is *reported* exactly as stored;
  refusing it is the caller's job (``image.chain.trusted_chain``);
* refuses (:class:`~remotefs_aa.exception.InvalidImage`, naming the field)
  anything it cannot read unambiguously: truncated headers, unknown versions,
  impossible cluster sizes, names that are too long, point outside the bytes
  read, are not UTF-8 or contain NUL, extensions that overrun, and the
  external-data-file feature without a name. What qemu would refuse to open
  we refuse too, so a check never passes on a header qemu reads differently.

It does not probe: anything that does not start with the qcow2 magic is
reported as raw (virtual size = file size). Whether a file *may* be parsed at
all (a raw volume whose guest wrote a qcow2 header must not be) is for the
caller to know from its own records.

Layout: docs/interop/qcow2.txt in QEMU; all numbers are big-endian.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass

from remotefs_aa import exception

#: First four bytes of every qcow2 image.
MAGIC = b"QFI\xfb"

#: Bytes read from the start of a file. The header, its extensions and the
#: backing file name all live in the first cluster, and real images keep them
#: in the first few hundred bytes; 64 KiB is the default cluster size, so one
#: read covers any image qemu-img creates with default options.
READ_LIMIT = 64 * 1024

#: qemu's limits (block/qcow2.h): clusters of 512 B to 2 MiB ...
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
#: ... backing file names up to 1023 bytes ...
MAX_BACKING_NAME = 1023
#: ... and backing formats that fit its 16-byte buffer with the NUL.
MAX_BACKING_FORMAT = 15

#: Header extension types we read; every other type is skipped, as qemu does.
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_DATA_FILE = 0x44415441

#: crypt_method values: none, legacy AES-CBC, LUKS.
CRYPT_METHODS = (0, 1, 2)

#: Incompatible feature bit 2: guest data lives in an external data file.
INCOMPAT_DATA_FILE = 1 << 2
#: Incompatible feature bit 4: extended L2 entries (32 subclusters per cluster).
INCOMPAT_EXTENDED_L2 = 1 << 4

_V2_LENGTH = 72
_V3_MIN_LENGTH = 104

# magic, version, backing_file_offset, backing_file_size, cluster_bits, size,
# crypt_method (bytes 0-35; the rest of the v2 header is not needed here).
_COMMON = struct.Struct(">4sIQIIQI")
# incompatible, compatible, autoclear features, refcount_order, header_length
# (bytes 72-103, version 3 only).
_V3 = struct.Struct(">QQQII")
# A header extension's type and data length.
_EXT = struct.Struct(">II")


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says, as stored; nothing here has been judged safe.

    ``backing_file`` and ``data_file`` are the names exactly as written in the
    header (often relative to the image's directory); resolving and confining
    them is the caller's job.
    """

    format: str
    """``"qcow2"`` or ``"raw"`` (anything without the qcow2 magic)."""
    virtual_size: int
    """Guest-visible size in bytes; for raw, the file size."""
    backing_file: str | None
    """Backing file name as stored, or None (no name, or an empty one: qemu
    then opens no backing file either)."""
    backing_format: str | None
    """From the backing-format header extension, None if absent (qemu would
    then probe the backing file's format, which callers should refuse)."""
    data_file: str | None
    """External data file name from its header extension, None if absent."""
    version: int | None
    """qcow2 version, 2 (compat=0.10) or 3 (compat=1.1); None for raw."""
    encrypted: bool
    """Whether crypt_method is non-zero (legacy AES or LUKS)."""
    cluster_size: int | None
    """qcow2 cluster size in bytes; None for raw."""
    incompatible_features: int
    """qcow2 v3 incompatible-feature bits (dirty, corrupt, data file, ...),
    reported for the caller to judge; 0 for v2 and raw."""


#: Signatures of the other formats qemu knows (offset, bytes): a file that
#: carries one is not taken for raw when no format was stated.
FOREIGN_MAGIC = {
    "vpc": (0, b"conectix"),
    "vmdk": (0, b"KDMV"),
    "vmdk descriptor": (0, b"# Disk DescriptorFile"),
    "vdi": (64, b"\x7f\x10\xda\xbe"),
    "vhdx": (0, b"vhdxfile"),
    "qed": (0, b"QED\x00"),
    "parallels": (0, b"WithoutFreeSpace"),
    "parallels ext": (0, b"WithouFreSpacExt"),
    "luks": (0, b"LUKS\xba\xbe"),
    "bochs": (0, b"Bochs Virtual HD Image"),
    "cloop": (0, b"#!/bin/sh\n#V2.0 Format"),
}


def foreign_format(data: bytes) -> str | None:
    """The name of another image format whose signature ``data`` starts with, or None."""
    for name, (offset, magic) in FOREIGN_MAGIC.items():
        if data[offset : offset + len(magic)] == magic:
            return name.split()[0]
    return None


def _refuse(path: str, reason: str) -> exception.InvalidImage:
    return exception.InvalidImage(path, reason)


def _name(raw: bytes, what: str, path: str) -> str:
    """Decode a name from the header, refusing what would be read ambiguously.

    A NUL would end the name for qemu (C strings) but not for Python, and
    bytes that are not UTF-8 have no single spelling to compare with; either
    way our answer could differ from what qemu opens, so neither is allowed.
    """
    if b"\x00" in raw:
        raise _refuse(path, f"{what} contains a NUL byte")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _refuse(
            path, f"{what} is not valid UTF-8 ({exc.reason} at byte {exc.start})"
        ) from None


def parse_header(data: bytes, file_size: int, path: str = "<image>") -> ImageHeader:
    """Parse the first bytes of an image file (at most :data:`READ_LIMIT` are used).

    ``data`` must start at offset 0 of the file; ``file_size`` is the file's
    size (the virtual size of a raw image); ``path`` only names the image in
    errors. Raises :class:`~remotefs_aa.exception.InvalidImage` if the data
    start with the qcow2 magic but cannot be read unambiguously (see the
    module docstring); never raises for a backing file or data file as such.
    """
    data = data[:READ_LIMIT]
    n = len(data)
    if data[:4] != MAGIC:
        return ImageHeader(
            format="raw",
            virtual_size=file_size,
            backing_file=None,
            backing_format=None,
            data_file=None,
            version=None,
            encrypted=False,
            cluster_size=None,
            incompatible_features=0,
        )

    if n < _V2_LENGTH:
        raise _refuse(path, f"qcow2 header truncated: {n} bytes, a header is at least {_V2_LENGTH}")
    (
        _magic,
        version,
        backing_offset,
        backing_size,
        cluster_bits,
        virtual_size,
        crypt_method,
    ) = _COMMON.unpack_from(data)

    if version not in (2, 3):
        raise _refuse(path, f"unsupported qcow2 version {version} (only 2 and 3 exist)")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise _refuse(
            path,
            f"qcow2 cluster_bits {cluster_bits} outside "
            f"{MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS} (512 B to 2 MiB clusters)",
        )
    cluster_size = 1 << cluster_bits
    if crypt_method not in CRYPT_METHODS:
        raise _refuse(path, f"unknown qcow2 crypt_method {crypt_method}")

    if version == 2:
        incompatible = 0
        header_length = _V2_LENGTH
    else:
        if n < _V3_MIN_LENGTH:
            raise _refuse(
                path,
                f"qcow2 v3 header truncated: {n} bytes, a v3 header is at least {_V3_MIN_LENGTH}",
            )
        incompatible, _compat, _autoclear, _refcount_order, header_length = _V3.unpack_from(
            data, _V2_LENGTH
        )
        if header_length < _V3_MIN_LENGTH:
            raise _refuse(
                path, f"qcow2 header_length {header_length} is below the v3 minimum of 104"
            )
        if header_length > cluster_size:
            raise _refuse(
                path, f"qcow2 header_length {header_length} exceeds the cluster size {cluster_size}"
            )
        if header_length > n:
            raise _refuse(
                path, f"qcow2 header truncated: header_length {header_length}, {n} bytes read"
            )

    backing_file = _backing_name(
        data, backing_offset, backing_size, header_length, cluster_size, path
    )

    # Extensions run from the end of the header to the backing name (or to the
    # end of the first cluster), as qemu reads them.
    ext_end = backing_offset if backing_offset else cluster_size
    backing_format, data_file = _extensions(data, header_length, ext_end, path)

    if incompatible & INCOMPAT_DATA_FILE and data_file is None:
        raise _refuse(
            path,
            "qcow2 incompatible feature bit 2 (external data file) is set but the header "
            "has no data_file name extension",
        )

    return ImageHeader(
        format="qcow2",
        virtual_size=virtual_size,
        backing_file=backing_file,
        backing_format=backing_format,
        data_file=data_file,
        version=version,
        encrypted=crypt_method != 0,
        cluster_size=cluster_size,
        incompatible_features=incompatible,
    )


def _backing_name(
    data: bytes, offset: int, size: int, header_length: int, cluster_size: int, path: str
) -> str | None:
    """The backing file name, or None; refuse one we cannot read in full."""
    if offset == 0:
        return None
    if size > MAX_BACKING_NAME:
        raise _refuse(
            path, f"qcow2 backing_file_size {size} exceeds the maximum of {MAX_BACKING_NAME}"
        )
    if offset < header_length:
        raise _refuse(
            path,
            f"qcow2 backing_file_offset {offset} points inside the {header_length}-byte header",
        )
    end = offset + size
    if end > cluster_size:
        # qemu refuses this too: the name must lie in the first cluster.
        raise _refuse(
            path,
            f"qcow2 backing file name (backing_file_offset {offset}, backing_file_size "
            f"{size}) runs past the first cluster ({cluster_size} bytes)",
        )
    if end > len(data):
        raise _refuse(
            path,
            f"qcow2 backing file name (backing_file_offset {offset}, backing_file_size "
            f"{size}) lies outside the {len(data)} bytes read",
        )
    name = _name(data[offset:end], "qcow2 backing file name", path)
    return name or None


def _extensions(data: bytes, offset: int, end: int, path: str) -> tuple[str | None, str | None]:
    """Walk the header extensions; return (backing format, data file name)."""
    n = len(data)
    backing_format: str | None = None
    data_file: str | None = None
    seen: set[int] = set()
    while offset < end:
        if offset + _EXT.size > n:
            raise _refuse(
                path,
                f"qcow2 header extensions run past the {n} bytes read (offset {offset}) "
                "without an end marker",
            )
        ext_type, length = _EXT.unpack_from(data, offset)
        offset += _EXT.size
        if ext_type == EXT_END:
            break
        if offset > end or length > end - offset:
            raise _refuse(
                path,
                f"qcow2 header extension 0x{ext_type:08x} at offset {offset - _EXT.size} "
                f"with length {length} runs past the extension area (ends at {end})",
            )
        if offset + length > n:
            raise _refuse(
                path,
                f"qcow2 header extension 0x{ext_type:08x} at offset {offset - _EXT.size} "
                f"with length {length} runs past the {n} bytes read",
            )
        if ext_type in (EXT_BACKING_FORMAT, EXT_DATA_FILE):
            if ext_type in seen:
                # qemu would silently use the last one; two answers is one too many.
                raise _refuse(path, f"qcow2 header extension 0x{ext_type:08x} appears twice")
            seen.add(ext_type)
            raw = data[offset : offset + length]
            if ext_type == EXT_BACKING_FORMAT:
                if length > MAX_BACKING_FORMAT:
                    raise _refuse(
                        path,
                        f"qcow2 backing format extension is {length} bytes "
                        f"(at most {MAX_BACKING_FORMAT})",
                    )
                backing_format = _name(raw, "qcow2 backing format", path) or None
            else:
                data_file = _name(raw, "qcow2 data_file name", path)
                if not data_file:
                    raise _refuse(path, "qcow2 data_file name extension is empty")
        # Data is padded to a multiple of 8 bytes.
        offset += (length + 7) & ~7
    return backing_format, data_file


def read_header(path: str, follow_symlinks: bool = True) -> ImageHeader:
    """Read and parse the header of the image file at ``path``.

    The file is opened non-blocking (a FIFO named by a hostile backing file
    must not hang us); see :func:`read_header_fd`. OSError (missing file, no
    permission, ``ELOOP`` for a symlink when ``follow_symlinks`` is False)
    propagates as is; InvalidImage means the file is there but its header is
    not acceptable.
    """
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    fd = os.open(path, flags)
    try:
        return read_header_fd(fd, path)
    finally:
        os.close(fd)


def read_header_fd(fd: int, path: str = "<image>", st: os.stat_result | None = None) -> ImageHeader:
    """Parse the header of the open file ``fd`` (``path`` only names it in errors).

    One ``fstat`` and one ``pread`` of at most :data:`READ_LIMIT` bytes from
    offset 0; the descriptor's offset is not moved, so the caller may hand it
    on. It must be a regular file: a device must not feed us. ``st``: the
    descriptor's fstat, if the caller just made it.
    """
    st = st if st is not None else os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise _refuse(path, f"not a regular file (mode {stat.filemode(st.st_mode)})")
    # One read, whatever the header needs. Reading 4 KiB first (64 KiB only
    # for a header reaching further) saved 0.1 ms of an 8-layer walk on
    # GlusterFS, under 0.5 % of a snapshot delete there, and 3 ms of a
    # 128-layer walk (benchmarks/README.md, image_header.py): not worth a
    # second read path.
    return parse_header(_pread_full(fd, min(READ_LIMIT, st.st_size)), st.st_size, path)


def _pread_full(fd: int, want: int) -> bytes:
    """``want`` bytes from offset 0 (fewer only at the end of the file)."""
    data = os.pread(fd, want, 0)
    # A regular file returns short reads only at EOF, or rarely (signals,
    # some network file systems); finish the read then.
    while len(data) < want:
        more = os.pread(fd, want - len(data), len(data))
        if not more:
            break
        data += more
    return data
