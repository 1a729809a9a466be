"""The directory image service and its hole-keeping copy (plain files, no root)."""

from __future__ import annotations

import io
import os

import pytest

from remotefs_aa import exception
from remotefs_aa.image.store import CHUNK, DirectoryImageService, copy_sparse


def _sample(tmp_path):
    """A 5-chunk file: data, a hole, data at the very end of a chunk, a trailing hole."""
    path = tmp_path / "src"
    with open(path, "wb") as f:
        f.write(b"a" * 100)
        f.seek(3 * CHUNK - 7)
        f.write(b"b" * 7)
        f.truncate(5 * CHUNK)
    return path


@pytest.mark.parametrize("as_stream", [False, True])
def test_copy_keeps_every_byte_and_the_holes(tmp_path, as_stream):
    src = _sample(tmp_path)
    data = src.read_bytes()
    dst = tmp_path / "dst"
    with open(dst, "wb") as out:
        source = io.BytesIO(data) if as_stream else open(src, "rb")
        with source:
            assert copy_sparse(source, out) == len(data)
    assert dst.read_bytes() == data
    assert os.stat(dst).st_blocks * 512 <= 2 * CHUNK + 4096  # the data chunks and the last byte


def test_service_round_trip_with_metadata(tmp_path):
    images = DirectoryImageService(str(tmp_path / "images"))
    src = _sample(tmp_path)
    with open(src, "rb") as f:
        shown = images.update(None, "disk.raw", {"id": "x", "disk_format": "raw"}, data=f)
    assert shown == {"id": "disk.raw", "size": 5 * CHUNK, "disk_format": "raw"}
    out = io.BytesIO()
    images.download(None, "disk.raw", out)
    assert out.getvalue() == src.read_bytes()
    bare = DirectoryImageService(str(tmp_path / "bare"), sidecars=False)
    with open(src, "rb") as f:
        assert bare.update(None, "disk", {"disk_format": "raw"}, data=f)["disk_format"] is None
    assert os.listdir(bare.directory) == ["disk"]


def test_stated_disk_format_overrides_the_sidecar(tmp_path):
    (tmp_path / "img").write_bytes(b"x")
    (tmp_path / "img.json").write_text('{"disk_format": "qcow2"}')
    assert DirectoryImageService(str(tmp_path)).show(None, "img")["disk_format"] == "qcow2"
    stated = DirectoryImageService(str(tmp_path), disk_format="raw")
    assert stated.show(None, "img")["disk_format"] == "raw"


@pytest.mark.parametrize("image_id", ["../etc/shadow", "a/b", "", ".hidden", "x.json"])
def test_ids_that_are_not_plain_names_are_refused(tmp_path, image_id):
    with pytest.raises(exception.ImageRefused, match="not a plain file name"):
        DirectoryImageService(str(tmp_path)).show(None, image_id)


def test_missing_image_and_broken_metadata_are_clear_errors(tmp_path):
    images = DirectoryImageService(str(tmp_path))
    with pytest.raises(exception.ImageRefused, match="no such image file"):
        images.show(None, "nothing")
    (tmp_path / "img").write_bytes(b"x")
    (tmp_path / "img.json").write_text("{not json")
    with pytest.raises(exception.ImageRefused, match="is not JSON"):
        images.show(None, "img")
