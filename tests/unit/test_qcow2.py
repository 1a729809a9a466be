"""The pure-Python qcow2/raw header reader, checked against the real qemu-img.

Real images come from ``qemu-img create`` and every field is compared with
``qemu-img info --output=json``: the reader is only useful if it says what
qemu would. Malformed headers are made by patching the bytes of a real image,
so each case breaks exactly one field.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess

import pytest

from remotefs_aa import exception
from remotefs_aa.privsep import qcow2

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")

MiB = 1024 * 1024
Invalid = exception.InvalidImage


def qemu_img(*args: str, cwd=None) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True, cwd=cwd)


def create(path, fmt: str = "qcow2", size: str = "1M", *opts: str) -> str:
    # In the image's directory: qemu-img creates a relative data_file relative
    # to its working directory (backing names are relative to the image).
    qemu_img("create", "-q", "-f", fmt, *opts, str(path), size, cwd=os.path.dirname(path))
    return str(path)


def qemu_info(path) -> dict:
    out = subprocess.run(
        ["qemu-img", "info", "--output=json", "-U", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out)


def expected_from_qemu(info: dict) -> dict:
    """The ImageHeader fields, as qemu-img info reports them."""
    data = (info.get("format-specific") or {}).get("data") or {}
    qcow = info["format"] == "qcow2"
    incompatible = 0
    if qcow:
        incompatible |= int(bool(info.get("dirty-flag"))) << 0
        incompatible |= int(bool(data.get("corrupt"))) << 1
        incompatible |= int("data-file" in data) << 2
        incompatible |= int(data.get("compression-type", "zlib") != "zlib") << 3
        incompatible |= int(bool(data.get("extended-l2"))) << 4
    return {
        "format": info["format"],
        "virtual_size": info["virtual-size"],
        "backing_file": info.get("backing-filename"),
        "backing_format": info.get("backing-filename-format"),
        "data_file": data.get("data-file"),
        "version": {"1.1": 3, "0.10": 2}[data["compat"]] if qcow else None,
        "encrypted": bool(info.get("encrypted")),
        "cluster_size": info.get("cluster-size") if qcow else None,
        "incompatible_features": incompatible,
    }


def assert_same_as_qemu(path) -> qcow2.ImageHeader:
    header = qcow2.read_header(str(path))
    got = {f: getattr(header, f) for f in qcow2.ImageHeader.__dataclass_fields__}
    assert got == expected_from_qemu(qemu_info(path))
    return header


# --------------------------------------------------------------------------
# Real images: every field as qemu-img info reports it
# --------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["0", "1M", "1536K"])
def test_raw(tmp_path, size):
    header = assert_same_as_qemu(create(tmp_path / "base.raw", "raw", size))
    assert header.format == "raw"
    assert header.virtual_size == os.path.getsize(tmp_path / "base.raw")


@pytest.mark.parametrize(
    ("opts", "version"),
    [
        ((), 3),
        (("-o", "compat=0.10"), 2),
        (("-o", "cluster_size=512"), 3),
        (("-o", "cluster_size=2M,extended_l2=on"), 3),
        (("-o", "lazy_refcounts=on,refcount_bits=64"), 3),
    ],
)
def test_qcow2_without_backing(tmp_path, opts, version):
    header = assert_same_as_qemu(create(tmp_path / "img.qcow2", "qcow2", "1G", *opts))
    assert header.version == version
    assert header.backing_file is None


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_overlay_on_raw(tmp_path, compat):
    create(tmp_path / "base.raw", "raw", "1M")
    top = create(
        tmp_path / "top.qcow2",
        "qcow2",
        "2M",
        "-b",
        "base.raw",
        "-F",
        "raw",
        "-o",
        f"compat={compat}",
    )
    header = assert_same_as_qemu(top)
    assert (header.backing_file, header.backing_format) == ("base.raw", "raw")


def test_chain_of_overlays(tmp_path):
    create(tmp_path / "base.raw", "raw", "1M")
    below, fmt = "base.raw", "raw"
    for i in range(3):
        create(tmp_path / f"snap{i}", "qcow2", "1M", "-b", below, "-F", fmt)
        below, fmt = f"snap{i}", "qcow2"
    walked = []
    name: str | None = "snap2"
    while name:
        walked.append(name)
        name = assert_same_as_qemu(tmp_path / name).backing_file
    assert walked == ["snap2", "snap1", "snap0", "base.raw"]


def test_external_data_file(tmp_path):
    img = create(tmp_path / "img.qcow2", "qcow2", "1M", "-o", "data_file=data.raw")
    header = assert_same_as_qemu(img)
    assert header.data_file == "data.raw"
    assert (tmp_path / "data.raw").is_file()
    assert header.incompatible_features & qcow2.INCOMPAT_DATA_FILE


@pytest.mark.parametrize("raw", ["off", "on"])
def test_external_data_file_with_backing(tmp_path, raw):
    # qemu refuses a backing file with data_file_raw=on; the reader reports both.
    create(tmp_path / "base.raw", "raw", "1M")
    backing = ("-b", "base.raw", "-F", "raw") if raw == "off" else ()
    img = create(
        tmp_path / "img.qcow2",
        "qcow2",
        "1M",
        *backing,
        "-o",
        f"data_file=d.raw,data_file_raw={raw}",
    )
    header = assert_same_as_qemu(img)
    want_backing = "base.raw" if backing else None
    assert (header.backing_file, header.data_file) == (want_backing, "d.raw")


def test_encrypted_is_reported(tmp_path):
    # Legacy AES: LUKS would spend seconds on key derivation; the header field
    # (crypt_method) is what is being read either way.
    img = create(
        tmp_path / "enc.qcow2",
        "qcow2",
        "1M",
        "--object",
        "secret,id=sec0,data=123456",
        "-o",
        "encrypt.format=aes,encrypt.key-secret=sec0",
    )
    assert assert_same_as_qemu(img).encrypted is True


@pytest.mark.parametrize(
    ("backing", "fmt"),
    [
        ("/etc/shadow", "raw"),
        ("../other", "qcow2"),
        ("sub/dir/../../x", "raw"),
        ("bäse ✓.raw", "raw"),
        ("x" * qcow2.MAX_BACKING_NAME, "raw"),
    ],
)
def test_hostile_backing_names_are_reported_as_stored(tmp_path, backing, fmt):
    # Refusing them is the caller's policy; the reader must report them exactly.
    img = create(tmp_path / "img.qcow2")
    qemu_img("rebase", "-u", "-b", backing, "-F", fmt, img)
    header = assert_same_as_qemu(img)
    assert (header.backing_file, header.backing_format) == (backing, fmt)


def test_backing_without_format_extension(tmp_path):
    # An old image, made before qemu required -F: the format is absent, not guessed.
    create(tmp_path / "base.raw", "raw", "1M")
    img = create(tmp_path / "img.qcow2", "qcow2", "1M", "-b", "base.raw", "-F", "raw")
    with open(img, "r+b") as f:
        data = patch_ext_type(bytearray(f.read(4096)), qcow2.EXT_BACKING_FORMAT, 0x12345678)
        f.seek(0)
        f.write(data)
    header = assert_same_as_qemu(img)
    assert (header.backing_file, header.backing_format) == ("base.raw", None)


def test_qcow2_magic_deeper_in_a_raw_file_is_raw(tmp_path):
    path = tmp_path / "raw"
    path.write_bytes(b"\0" * 512 + qcow2.MAGIC + b"\0" * 508)
    assert qcow2.read_header(str(path)).format == "raw"
    path.write_bytes(qcow2.MAGIC[:3])
    assert qcow2.read_header(str(path)) == qcow2.parse_header(b"QFI", 3)
    assert qcow2.read_header(str(path)).virtual_size == 3


def test_read_header_is_one_read_of_at_most_64k(tmp_path, monkeypatch):
    img = create(tmp_path / "img.qcow2", "qcow2", "1G", "-o", "cluster_size=2M")
    calls = []
    real_pread = os.pread

    def spy(fd, n, offset):
        calls.append(n)
        return real_pread(fd, n, offset)

    monkeypatch.setattr(qcow2.os, "pread", spy)
    qcow2.read_header(img)
    assert calls == [qcow2.READ_LIMIT]


def test_a_header_reaching_past_4k_is_read_in_one_read(tmp_path, monkeypatch):
    data = bytearray(open(create(tmp_path / "img.qcow2", "qcow2", "1G"), "rb").read())
    data = with_backing(data, b"volume-x", 6000)  # the name beyond the first 4 KiB
    path = tmp_path / "far.qcow2"
    path.write_bytes(bytes(data))
    calls = []
    real_pread = os.pread
    monkeypatch.setattr(qcow2.os, "pread", lambda fd, n, o: calls.append(n) or real_pread(fd, n, o))
    header = qcow2.read_header(str(path))
    assert header.backing_file == "volume-x"
    assert header == qcow2.parse_header(bytes(data), len(data))
    assert calls == [qcow2.READ_LIMIT]


def test_feature_bits_are_reported_not_judged(tmp_path):
    data = bytearray(open(create(tmp_path / "img.qcow2"), "rb").read())
    struct.pack_into(">Q", data, 72, 0b11 | (1 << 40))  # dirty, corrupt, unknown
    assert qcow2.parse_header(bytes(data), len(data)).incompatible_features == 0b11 | (1 << 40)


def test_empty_backing_name_means_no_backing(tmp_path):
    data = bytearray(open(create(tmp_path / "img.qcow2"), "rb").read())
    data = with_backing(data, b"")
    assert qcow2.parse_header(bytes(data), len(data)).backing_file is None


def test_missing_file_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        qcow2.read_header(str(tmp_path / "nope"))


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_not_a_regular_file_is_refused_without_blocking(tmp_path, kind):
    path = tmp_path / kind
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    with pytest.raises(Invalid, match="not a regular file"):
        qcow2.read_header(str(path))


# --------------------------------------------------------------------------
# Malformed headers: refused, with the field named
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def v3(tmp_path_factory) -> bytes:
    """A real v3 overlay header (64 KiB clusters, backing-format extension, name)."""
    d = tmp_path_factory.mktemp("v3")
    create(d / "base", "raw", "1M")
    top = create(d / "top", "qcow2", "1M", "-b", "base", "-F", "raw")
    with open(top, "rb") as f:
        return f.read(qcow2.READ_LIMIT)


@pytest.fixture(scope="module")
def v2(tmp_path_factory) -> bytes:
    d = tmp_path_factory.mktemp("v2")
    img = create(d / "img", "qcow2", "1M", "-o", "compat=0.10")
    with open(img, "rb") as f:
        return f.read(qcow2.READ_LIMIT)


def with_backing(data: bytearray, name: bytes, offset: int = 1024) -> bytearray:
    """Write ``name`` at ``offset`` and point the header at it."""
    data = bytearray(data)
    data[offset : offset + len(name)] = name
    struct.pack_into(">QI", data, 8, offset, len(name))
    return data


def find_ext(data: bytes | bytearray, ext_type: int) -> int:
    """Offset of the header extension of ``ext_type`` (v3 header)."""
    offset = struct.unpack_from(">I", data, 100)[0]
    while True:
        t, length = struct.unpack_from(">II", data, offset)
        if t == ext_type:
            return offset
        assert t != 0, f"no extension 0x{ext_type:08x}"
        offset += 8 + ((length + 7) & ~7)


def patch_ext_type(data: bytearray, old: int, new: int) -> bytearray:
    data = bytearray(data)
    struct.pack_into(">I", data, find_ext(data, old), new)
    return data


def refused(data: bytes | bytearray, match: str) -> None:
    with pytest.raises(Invalid, match=match) as caught:
        qcow2.parse_header(bytes(data), len(data), "/share/volume-1")
    assert caught.value.path == "/share/volume-1"


def test_the_fixture_headers_parse(v3, v2):
    assert qcow2.parse_header(v3, len(v3)).backing_file == "base"
    assert qcow2.parse_header(v2, len(v2)).version == 2


@pytest.mark.parametrize("keep", [4, 40, 71])
def test_truncated_header(v3, keep):
    refused(v3[:keep], r"header truncated: \d+ bytes")


def test_truncated_v3_header(v3):
    refused(v3[:100], "v3 header truncated")


@pytest.mark.parametrize("version", [0, 1, 4, 0xFFFFFFFF])
def test_bad_version(v3, version):
    data = bytearray(v3)
    struct.pack_into(">I", data, 4, version)
    refused(data, f"unsupported qcow2 version {version}")


@pytest.mark.parametrize("bits", [0, 8, 22, 63])
def test_bad_cluster_bits(v3, bits):
    data = bytearray(v3)
    struct.pack_into(">I", data, 20, bits)
    refused(data, f"cluster_bits {bits} outside 9..21")


def test_unknown_crypt_method(v3):
    data = bytearray(v3)
    struct.pack_into(">I", data, 32, 3)
    refused(data, "crypt_method 3")


@pytest.mark.parametrize(
    ("length", "match"),
    [(100, "header_length 100 is below"), (131072, "header_length 131072 exceeds the cluster")],
)
def test_bad_header_length(v3, length, match):
    data = bytearray(v3)
    struct.pack_into(">I", data, 100, length)
    refused(data, match)


def test_header_length_past_the_bytes_read(v3):
    data = bytearray(v3[:512])
    struct.pack_into(">I", data, 100, 1024)
    refused(data, "header truncated: header_length 1024, 512 bytes read")


def test_backing_offset_past_eof(v3):
    data = bytearray(v3[:2048])
    struct.pack_into(">Q", data, 8, 4096)
    refused(data, r"backing_file_offset 4096, backing_file_size 4\) lies outside the 2048 bytes")


def test_backing_offset_past_the_first_cluster(v3):
    data = bytearray(v3)
    struct.pack_into(">Q", data, 8, 1 << 40)
    refused(data, "backing_file_offset 1099511627776.*runs past the first cluster")


def test_backing_name_past_the_first_64k(tmp_path):
    # 2 MiB clusters allow the name further out than the 64 KiB we read.
    img = create(tmp_path / "img", "qcow2", "1M", "-o", "cluster_size=2M")
    with open(img, "r+b") as f:
        f.seek(8)
        f.write(struct.pack(">QI", 70000, 4))
        f.seek(70000)
        f.write(b"base")
    with pytest.raises(Invalid, match="lies outside the 65536 bytes read"):
        qcow2.read_header(img)


@pytest.mark.parametrize("size", [1024, 4096, 0xFFFFFFFF])
def test_huge_backing_size(v3, size):
    data = bytearray(v3)
    struct.pack_into(">I", data, 16, size)
    refused(data, f"backing_file_size {size} exceeds the maximum of 1023")


def test_backing_offset_inside_the_header(v3):
    data = bytearray(v3)
    struct.pack_into(">QI", data, 8, 8, 4)
    refused(data, "backing_file_offset 8 points inside the 112-byte header")


@pytest.mark.parametrize(
    ("name", "match"),
    [(b"base\x00.raw", "backing file name contains a NUL"), (b"b\xffse", "not valid UTF-8")],
)
def test_bad_backing_name(v3, name, match):
    refused(with_backing(bytearray(v3), name), match)


def test_extension_overruns_the_extension_area(v3):
    data = bytearray(v3)
    ext = find_ext(data, qcow2.EXT_BACKING_FORMAT)
    struct.pack_into(">I", data, ext + 4, 0xFFFF)
    refused(data, "header extension 0xe2792aca at offset 112 with length 65535 runs past")


def test_extension_overruns_the_bytes_read(v2):
    # No backing file: the area runs to the end of the cluster, past the data.
    data = bytearray(v2[:200])
    struct.pack_into(">II", data, 72, 0x12345678, 1000)
    refused(data, "header extension 0x12345678 at offset 72 with length 1000 runs past the 200")


def test_extensions_without_end_marker(v3):
    data = bytearray(v3[:120])
    struct.pack_into(">Q", data, 8, 0)  # no backing file: area runs to the cluster end
    refused(data[:116], "header extensions run past the 116 bytes read")


def test_backing_format_too_long(v3):
    data = bytearray(v3)
    ext = find_ext(data, qcow2.EXT_BACKING_FORMAT)
    struct.pack_into(">I", data, ext + 4, 16)
    refused(data, "backing format extension is 16 bytes")


def test_duplicate_extension(v2):
    data = bytearray(v2)
    ext = struct.pack(">II", qcow2.EXT_BACKING_FORMAT, 3) + b"raw\0\0\0\0\0"
    data[72 : 72 + 2 * len(ext)] = ext + ext
    refused(data, "extension 0xe2792aca appears twice")


def test_data_file_bit_without_a_name(v3):
    data = bytearray(v3)
    struct.pack_into(">Q", data, 72, qcow2.INCOMPAT_DATA_FILE)
    refused(data, "external data file.*no data_file name")


@pytest.mark.parametrize(
    ("name", "match"),
    [(b"", "data_file name extension is empty"), (b"d\x00", "data_file name contains a NUL")],
)
def test_bad_data_file_name(v2, name, match):
    data = bytearray(v2)
    struct.pack_into(">II", data, 72, qcow2.EXT_DATA_FILE, len(name))
    data[80 : 80 + len(name)] = name
    refused(data, match)


def test_message_names_the_image(tmp_path, v3):
    path = tmp_path / "volume-1"
    path.write_bytes(v3[:50])
    with pytest.raises(Invalid) as caught:
        qcow2.read_header(str(path))
    assert str(path) in str(caught.value)
    assert "header truncated" in caught.value.reason
