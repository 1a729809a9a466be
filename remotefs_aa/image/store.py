"""A directory of image files that speaks the image-service calls the drivers use.

Cinder hands ``copy_image_to_volume`` / ``copy_volume_to_image`` its Glance
client; the drivers call only ``show``, ``download`` and ``update`` on it, so
any object with those three fits. This one keeps images as plain files in a
directory (``<id>`` holds the data, ``<id>.json`` its metadata), for the CLI
(``volume create --image``, ``volume export``) and for deployments without
an image service.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
from typing import Any, BinaryIO

from remotefs_aa import exception

_ID_RE = re.compile(r"^[A-Za-z0-9_+][A-Za-z0-9_.+-]*\Z")
CHUNK = 4 * 1024 * 1024


def _data_segments(src: BinaryIO) -> tuple[int, list[tuple[int, int]]] | None:
    """A real file's size and (start, end) of each allocated range; None if it cannot tell."""
    try:
        fd = src.fileno()
        size = os.fstat(fd).st_size
        segments: list[tuple[int, int]] = []
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole is left
                    break
                raise
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            segments.append((start, pos))
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None
    return size, segments


def copy_sparse(src: BinaryIO, dst: BinaryIO) -> int:
    """Copy ``src`` into the new, seekable file ``dst``, keeping holes; the length.

    A raw volume of a few GiB is mostly unallocated; copied byte by byte it
    would cost its full size in disk and in time. A real file is read range
    by range (SEEK_DATA / SEEK_HOLE); a stream is read whole, and in both
    cases chunks of zeros become holes.
    """
    found = _data_segments(src)
    size, ranges = found if found is not None else (None, [(0, None)])
    zero = bytes(CHUNK)
    pos = written = 0
    for start, stop in ranges:
        if stop is not None:
            src.seek(start)
        pos = start
        while stop is None or pos < stop:
            chunk = src.read(CHUNK if stop is None else min(CHUNK, stop - pos))
            if not chunk:
                break
            if chunk != zero[: len(chunk)]:
                dst.seek(pos)
                dst.write(chunk)
                written = pos + len(chunk)
            pos += len(chunk)
    total = size if size is not None else pos
    if written < total:
        # A trailing hole: the file must still end where the source does
        # (one zero byte there; truncate alone extends files, not streams).
        dst.seek(total - 1)
        dst.write(b"\0")
    return total


class DirectoryImageService:
    """Images as files in ``directory``; image ids are file names in it.

    ``sidecars=False`` (the CLI, on an operator's own files) writes no
    ``<id>.json`` on upload; one that exists is still read. ``disk_format``
    is what ``show`` states for every image, whatever a sidecar says (the
    CLI's ``--image-format``).
    """

    def __init__(
        self, directory: str, sidecars: bool = True, disk_format: str | None = None
    ) -> None:
        self.directory = os.path.abspath(directory)
        self.sidecars = sidecars
        self.disk_format = disk_format

    def _path(self, image_id: str) -> str:
        if (
            not isinstance(image_id, str)
            or not _ID_RE.match(image_id)
            or image_id.endswith(".json")
        ):
            raise exception.ImageRefused(
                image_id, "not a plain file name in the image directory " + self.directory
            )
        return os.path.join(self.directory, image_id)

    def show(self, context: Any, image_id: str) -> dict:
        """``{'id', 'size', 'disk_format'}``; disk_format None when no metadata was saved."""
        path = self._path(image_id)
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            raise exception.ImageRefused(image_id, f"no such image file {path}") from None
        meta: dict = {}
        try:
            with open(path + ".json") as f:
                meta = json.load(f)
        except FileNotFoundError:
            pass
        except ValueError as exc:
            raise exception.ImageRefused(image_id, f"{path}.json is not JSON: {exc}") from None
        shown = {"disk_format": None, **meta, "id": image_id, "size": size}
        if self.disk_format:
            shown["disk_format"] = self.disk_format
        return shown

    def download(self, context: Any, image_id: str, data: BinaryIO) -> None:
        """Copy the image's bytes into the open file ``data``."""
        with open(self._path(image_id), "rb") as src:
            copy_sparse(src, data)

    def update(self, context: Any, image_id: str, image_meta: dict, data: BinaryIO) -> dict:
        """Store ``data`` as image ``image_id`` (atomically: temp file, rename), with its meta."""
        path = self._path(image_id)
        os.makedirs(self.directory, exist_ok=True)
        tmp = os.path.join(self.directory, f".{image_id}.upload")
        try:
            with open(tmp, "wb") as out:
                copy_sparse(data, out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        if self.sidecars:
            meta = {k: v for k, v in image_meta.items() if k not in ("id", "size")}
            with open(path + ".json", "w") as f:
                json.dump(meta, f, indent=1, sort_keys=True)
        return self.show(context, image_id)
