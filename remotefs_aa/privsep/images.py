"""The daemon's own check of every image it hands to qemu-img, by descriptor.

The service checks a chain before it asks for anything (``image.chain``);
that is the first line, and it runs as a user we do not trust with root. The
check that counts runs here, in the daemon, on descriptors the daemon opened
itself:

* the directory is opened beneath an allowed base without following a
  symlink (``confine.open_beneath``), and every image in it by name with
  ``O_NOFOLLOW``; each must be a regular file;
* the top's format is the caller's (raw or qcow2: nothing is probed), every
  lower layer's is the one its overlay's header names; a qcow2 layer is
  parsed by our own reader (``qcow2.py``) and refused if encrypted, if it
  uses an external data file, or if it names a backing file without a
  backing format (qemu would probe it);
* a backing file must be one plain name of the *same volume's* files in the
  same directory (``volume-<id>`` or ``volume-<id>.<snapshot id>``), never a
  path, a ``json:`` spec, another volume's file or anything seen before;
* qemu-img is then given a ``json:`` spec naming every layer by
  ``/proc/self/fd/N`` with its format, so it opens exactly the inodes that
  were checked and resolves no name itself.

A service that swaps a file for a symlink after the check changes nothing:
the descriptors are already open. Time spent here is counted
(:func:`checks`) so the benchmark can show what the checks cost per operation.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import stat
import threading
import time
from typing import Any

from remotefs_aa import exception
from remotefs_aa.privsep import qcow2

#: Volume and snapshot ids: Cinder's UUIDs fit, and so do short names; never a
#: dot (it separates a volume's id from a snapshot's in file names) or a slash.
ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}"
#: Names a snapshot id may not take: they are the volume's own bookkeeping files.
RESERVED_SUFFIXES = frozenset({"info", "tmp", "deleting", "revert"})
_ID = re.compile(rf"^{ID_PATTERN}\Z")
# volume-<id> and volume-<id>.<snap> (a volume's images), and the hidden names
# of its unfinished work: .volume-<id>.tmp and .volume-<id>.<snap>.revert.
_VISIBLE = re.compile(rf"^volume-(?P<vol>{ID_PATTERN})(?:\.(?P<snap>{ID_PATTERN}))?\Z")
_HIDDEN = re.compile(
    rf"^\.volume-(?P<vol>{ID_PATTERN})(?:\.tmp|\.(?P<snap>{ID_PATTERN})\.revert)\Z"
)
#: Any name of volume ``vol``: its images (``volume-<id>[.<snap>]``, the
#: ``.info``) and its hidden bookkeeping (``.volume-<id>.<anything>``); what a
#: share scan groups by volume.
ANY_OF_VOLUME = re.compile(rf"^\.?volume-(?P<vol>{ID_PATTERN})(?:\.|\Z)")

#: Longer chains are refused: a loop or a hostile image, not a real volume.
MAX_CHAIN_DEPTH = 512

FORMATS = ("raw", "qcow2")
_IMAGE_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_NOFOLLOW | os.O_CLOEXEC

_stats_lock = threading.Lock()
_stats = {"calls": 0, "ns": 0, "layers": 0}


def is_id(value: object) -> bool:
    """Whether ``value`` is a volume or snapshot id the file names can carry."""
    return isinstance(value, str) and bool(_ID.match(value)) and value not in RESERVED_SUFFIXES


def volume_of(name: object) -> str | None:
    """The volume id an image file name belongs to, or None (not a volume's image)."""
    if not isinstance(name, str):
        return None
    match = _VISIBLE.match(name) or _HIDDEN.match(name)
    if not match or match["snap"] in RESERVED_SUFFIXES:
        return None
    return match["vol"]


def backing_allowed(volume_id: str | None, name: object) -> bool:
    """Whether ``name`` may be a backing file of an image of volume ``volume_id``."""
    if volume_id is None or not isinstance(name, str):
        return False
    match = _VISIBLE.match(name)
    return bool(match and match["vol"] == volume_id and match["snap"] not in RESERVED_SUFFIXES)


@dataclasses.dataclass
class Layer:
    """One image of a checked chain, open."""

    name: str
    fd: int
    format: str
    virtual_size: int
    backing: str | None
    cluster_size: int | None
    #: The smallest unit qemu allocates in this qcow2 layer: its cluster, or a
    #: 32nd of it with extended L2 entries (subclusters); None for raw.
    allocation_unit: int | None = None


class OpenChain:
    """The checked, open layers of one image, top first; a context manager."""

    def __init__(self, directory: str, layers: list[Layer]) -> None:
        self.directory = directory
        self.layers = layers

    def __enter__(self) -> OpenChain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for layer in self.layers:
            if layer.fd >= 0:
                os.close(layer.fd)
                layer.fd = -1

    @property
    def top(self) -> Layer:
        return self.layers[0]

    def fds(self, start: int = 0, depth: int | None = None) -> tuple[int, ...]:
        end = None if depth is None else start + depth
        return tuple(layer.fd for layer in self.layers[start:end])

    def node(self, start: int = 0, depth: int | None = None) -> dict[str, Any]:
        """The blockdev options of layers ``start`` .. (``depth`` of them; below: none)."""
        end = len(self.layers) if depth is None else min(len(self.layers), start + depth)
        spec: dict[str, Any] | None = None
        for i in range(end - 1, start - 1, -1):
            layer = self.layers[i]
            node: dict[str, Any] = {
                "driver": layer.format,
                "file": {"driver": "file", "filename": f"/proc/self/fd/{layer.fd}"},
            }
            if layer.format == "qcow2":
                # None cuts the chain here: qemu then opens nothing the header names.
                node["backing"] = spec
            spec = node
        assert spec is not None
        return spec

    def spec(self, start: int = 0, depth: int | None = None) -> str:
        """``json:`` + :meth:`node`: a filename qemu-img takes instead of a path.

        Read-only users add qemu's ``-U`` / ``-r`` flags as usual.
        """
        return "json:" + json.dumps(self.node(start, depth), separators=(",", ":"))


def open_image(dirfd: int, directory: str, name: str) -> int:
    """Open ``name`` in the directory ``dirfd`` without following a link; regular files only."""
    return _open_image(dirfd, directory, name)[0]


def _open_image(dirfd: int, directory: str, name: str) -> tuple[int, os.stat_result]:
    """:func:`open_image` and the file's stat (one fstat per layer in a chain walk)."""
    try:
        fd = os.open(name, _IMAGE_FLAGS, dir_fd=dirfd)
    except OSError as exc:
        if exc.errno == 40:  # ELOOP
            raise exception.InvalidImage(
                os.path.join(directory, name), "it is a symbolic link; links are never followed"
            ) from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise exception.InvalidImage(
            os.path.join(directory, name), f"not a regular file ({stat.filemode(st.st_mode)})"
        )
    return fd, st


def open_chain(
    dirfd: int,
    directory: str,
    name: str,
    fmt: str,
    max_depth: int | None = None,
    raw: frozenset[str] = frozenset(),
) -> OpenChain:
    """Open and check ``name`` (format ``fmt``) and every backing file below it.

    ``max_depth``: open at most that many layers (the rest of the chain is
    neither opened nor handed to qemu-img). ``raw``: names taken as raw
    whatever a header says (the caller's records: a guest may have written a
    qcow2 header into a raw volume). Raises InvalidImage naming the file and
    the reason; FileNotFoundError if the top is missing.
    """
    started = time.perf_counter_ns()
    if fmt not in FORMATS:
        raise exception.PrivilegedArgumentRefused(f"image format {fmt!r} is not one of raw, qcow2")
    volume_id = volume_of(name)
    layers: list[Layer] = []
    seen: set[str] = set()
    current, current_fmt = name, fmt
    try:
        while True:
            path = os.path.join(directory, current)
            if len(layers) >= MAX_CHAIN_DEPTH:
                raise exception.InvalidImage(path, f"the chain is deeper than {MAX_CHAIN_DEPTH}")
            seen.add(current)
            try:
                fd, st = _open_image(dirfd, directory, current)
            except FileNotFoundError:
                if not layers:
                    raise
                raise exception.InvalidImage(
                    os.path.join(directory, layers[-1].name),
                    f"its backing file {current!r} is missing",
                ) from None
            if current in raw:
                current_fmt = "raw"
            layer = Layer(current, fd, current_fmt, st.st_size, None, None)
            layers.append(layer)
            if current_fmt == "raw":
                break  # raw is raw: whatever a guest wrote there is never parsed
            header = qcow2.read_header_fd(fd, path, st)
            if header.format != "qcow2":
                raise exception.InvalidImage(path, "it is not a qcow2 image (no qcow2 magic)")
            if header.encrypted:
                raise exception.InvalidImage(path, "it is encrypted")
            if header.data_file is not None:
                raise exception.InvalidImage(
                    path, f"it uses an external data file {header.data_file!r}"
                )
            layer.virtual_size = header.virtual_size
            layer.cluster_size = header.cluster_size
            extended = header.incompatible_features & qcow2.INCOMPAT_EXTENDED_L2
            layer.allocation_unit = header.cluster_size // (32 if extended else 1)
            layer.backing = header.backing_file
            if header.backing_file is None:
                break
            if not backing_allowed(volume_id, header.backing_file):
                raise exception.InvalidImage(
                    path,
                    f"backing file {header.backing_file!r} is not a file of the same volume "
                    f"in the same directory",
                )
            if header.backing_file in seen:
                raise exception.InvalidImage(path, "the backing chain loops")
            if header.backing_format not in FORMATS:
                raise exception.InvalidImage(
                    path,
                    f"backing format {header.backing_format!r}: a backing file must name "
                    f"its format (raw or qcow2), or qemu would guess it",
                )
            if max_depth is not None and len(layers) >= max_depth:
                break
            current, current_fmt = header.backing_file, header.backing_format
    except BaseException:
        OpenChain(directory, layers).close()
        raise
    finally:
        with _stats_lock:
            _stats["calls"] += 1
            _stats["ns"] += time.perf_counter_ns() - started
            _stats["layers"] += len(layers)
    return OpenChain(directory, layers)


def checks() -> dict[str, int]:
    """How many chain checks this process ran, the layers and the time they took (ns)."""
    with _stats_lock:
        return dict(_stats)
