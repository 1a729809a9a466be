"""Typed results of ``qemu-img info``, the authority our header reader is checked against.

The chain code reads headers in Python (``qcow2.py``, one round trip per
chain, ~25x cheaper than one ``qemu-img info --backing-chain``; see
benchmarks/image_header.py). Where it matters most, in ``Chain.verify``, the
answer is cross-checked with qemu-img itself, run with ``-U`` (no lock needed
on images a VM may hold open) and under the privileged helper's resource
limits.
"""

from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    """One image as qemu-img sees it."""

    filename: str
    format: str
    virtual_size: int
    actual_size: int | None
    backing_file: str | None
    backing_format: str | None
    data_file: str | None
    encrypted: bool

    @classmethod
    def from_json(cls, data: dict) -> ImageInfo:
        specific = (data.get("format-specific") or {}).get("data") or {}
        return cls(
            filename=data.get("filename", ""),
            format=data.get("format", ""),
            virtual_size=int(data.get("virtual-size", 0)),
            actual_size=data.get("actual-size"),
            backing_file=data.get("backing-filename"),
            backing_format=data.get("backing-filename-format"),
            data_file=specific.get("data-file"),
            encrypted=bool(data.get("encrypted")),
        )

    @property
    def name(self) -> str:
        return os.path.basename(self.filename)


def info(path: str, fmt: str, backing_chain: bool = False) -> list[ImageInfo]:
    """``qemu-img info -U -f FMT`` of ``path`` (and every layer below) through the helper.

    The format is always given: qemu-img never guesses one.
    """
    from remotefs_aa.privsep import qemu

    raw = qemu.qemu_img_info(path, fmt, backing_chain=backing_chain)
    return [ImageInfo.from_json(item) for item in raw]
