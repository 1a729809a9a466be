"""The daemon's own chain check (privsep/images.py) on real qemu-img files (no root)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from remotefs_aa import exception
from remotefs_aa.privsep import images


def qimg(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


@pytest.fixture
def d(tmp_path):
    qimg("create", "-q", "-f", "raw", str(tmp_path / "volume-a"), "1M")
    qimg(
        "create", "-q", "-f", "qcow2", "-b", "volume-a", "-F", "raw", str(tmp_path / "volume-a.s1")
    )
    qimg(
        "create", "-q", "-f", "qcow2", "-b", "volume-a.s1", "-F", "qcow2",
        str(tmp_path / "volume-a.s2"),
    )  # fmt: skip
    return tmp_path


def _open(d, name, fmt="qcow2", **kw):
    dirfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return images.open_chain(dirfd, str(d), name, fmt, **kw)
    finally:
        os.close(dirfd)


def test_a_sound_chain_opens_with_every_format_named(d):
    with _open(d, "volume-a.s2") as chain:
        assert [(x.name, x.format) for x in chain.layers] == [
            ("volume-a.s2", "qcow2"), ("volume-a.s1", "qcow2"), ("volume-a", "raw"),
        ]  # fmt: skip
        spec = json.loads(chain.spec()[len("json:") :])
        fds = chain.fds()
        assert spec["file"]["filename"] == f"/proc/self/fd/{fds[0]}"
        assert spec["backing"]["driver"] == "qcow2"
        assert spec["backing"]["backing"] == {
            "driver": "raw", "file": {"driver": "file", "filename": f"/proc/self/fd/{fds[2]}"},
        }  # fmt: skip
        for fd in fds:
            os.fstat(fd)  # open
        cut = json.loads(chain.spec(0, 1)[len("json:") :])
        assert cut["backing"] is None  # qemu opens nothing below
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)  # closed with the chain


def test_max_depth_opens_only_the_top_but_checks_its_backing_name(d):
    with _open(d, "volume-a.s2", max_depth=1) as chain:
        assert [x.name for x in chain.layers] == ["volume-a.s2"]


def _overlay(d, name, backing, backing_fmt="raw", *extra):
    args = ["create", "-q", "-f", "qcow2", "-u", "-b", backing]
    if backing_fmt:
        args += ["-F", backing_fmt]
    qimg(*args, *extra, str(d / name), "1M")


@pytest.mark.parametrize(
    "backing,why",
    [
        ("/etc/shadow", "not a file of the same volume"),
        ("../volume-a", "not a file of the same volume"),
        ("volume-b", "not a file of the same volume"),
        ("volume-a.info", "not a file of the same volume"),
        ('json:{"driver":"raw","file":{"driver":"file","filename":"/etc/shadow"}}', "same volume"),
        ("nbd+unix:///x?socket=/run/x.sock", "not a file of the same volume"),
        (".volume-a.tmp", "not a file of the same volume"),
    ],
)
def test_backing_files_that_are_not_the_volumes_own_are_refused(d, backing, why):
    _overlay(d, "volume-a.bad", backing)
    with pytest.raises(exception.InvalidImage, match=why):
        _open(d, "volume-a.bad")


def test_a_hostile_second_link_is_refused(d):
    _overlay(d, "volume-a.mid", "/etc/passwd")
    _overlay(d, "volume-a.top", "volume-a.mid", "qcow2")
    with pytest.raises(exception.InvalidImage, match="volume-a.mid.*same volume"):
        _open(d, "volume-a.top")


def test_a_backing_file_without_a_format_is_refused(d):
    # qemu-img no longer writes such images; older ones (and hostile ones) exist.
    _overlay(d, "volume-a.nofmt", "volume-a")
    path = d / "volume-a.nofmt"
    data = bytearray(path.read_bytes()[:65536])
    at = data.find(bytes.fromhex("e2792aca"))
    data[at : at + 4] = bytes.fromhex("12345678")  # an extension qemu skips
    with open(path, "r+b") as f:
        f.write(data)
    with pytest.raises(exception.InvalidImage, match="must name its format"):
        _open(d, "volume-a.nofmt")


def test_a_raw_base_is_never_parsed(d):
    """A guest wrote a qcow2 header (backing /etc/shadow) into the raw base."""
    qimg(
        "create", "-q", "-f", "qcow2", "-u", "-b", "/etc/shadow", "-F", "raw", str(d / "fake"), "1M"
    )
    with open(d / "fake", "rb") as f, open(d / "volume-a", "r+b") as base:
        base.write(f.read())
    with _open(d, "volume-a.s1") as chain:
        assert chain.layers[-1].format == "raw" and chain.layers[-1].backing is None
    with _open(d, "volume-a.s1", raw=frozenset({"volume-a"})) as chain:
        assert chain.layers[-1].format == "raw"
    # Taken as qcow2 only if an overlay names it so; then its header is judged.
    _overlay(d, "volume-a.liar", "volume-a", "qcow2")
    with pytest.raises(exception.InvalidImage, match="/etc/shadow"):
        _open(d, "volume-a.liar")


def test_external_data_files_and_encryption_are_refused(d):
    qimg("create", "-q", "-f", "qcow2", "-o", f"data_file={d}/data", str(d / "volume-a.df"), "1M")
    with pytest.raises(exception.InvalidImage, match="external data file"):
        _open(d, "volume-a.df")
    qimg(
        "create", "-q", "-f", "qcow2", "--object", "secret,id=s0,data=pw",
        "-o", "encrypt.format=aes,encrypt.key-secret=s0", str(d / "volume-a.enc"), "1M",
    )  # fmt: skip
    with pytest.raises(exception.InvalidImage, match="encrypted"):
        _open(d, "volume-a.enc")


def test_links_loops_missing_files_and_other_types_are_refused(d):
    os.symlink("volume-a.s1", d / "volume-a.link")
    with pytest.raises(exception.InvalidImage, match="symbolic link"):
        _open(d, "volume-a.link")
    _overlay(d, "volume-a.l1", "volume-a.l2", "qcow2")
    _overlay(d, "volume-a.l2", "volume-a.l1", "qcow2")
    with pytest.raises(exception.InvalidImage, match="loops"):
        _open(d, "volume-a.l1")
    _overlay(d, "volume-a.orphan", "volume-a.gone", "qcow2")
    with pytest.raises(exception.InvalidImage, match="'volume-a.gone' is missing"):
        _open(d, "volume-a.orphan")
    os.mkfifo(d / "volume-a.fifo")
    with pytest.raises(exception.InvalidImage, match="not a regular file"):
        _open(d, "volume-a.fifo", "raw")
    with pytest.raises(exception.InvalidImage, match="no qcow2 magic"):
        _open(d, "volume-a", "qcow2")
    with pytest.raises(FileNotFoundError):
        _open(d, "volume-a.none")


def test_a_file_outside_any_volume_may_have_no_backing_file(d):
    _overlay(d, "image-x.1.2", "volume-a")
    with pytest.raises(exception.InvalidImage, match="same volume"):
        _open(d, "image-x.1.2")
    qimg("create", "-q", "-f", "qcow2", str(d / "image-y.1.2"), "1M")
    with _open(d, "image-y.1.2") as chain:
        assert len(chain.layers) == 1


def test_name_grammar():
    assert images.volume_of("volume-a") == "a"
    assert images.volume_of("volume-a.s1") == "a"
    assert images.volume_of(".volume-a.tmp") == "a"
    assert images.volume_of(".volume-a.s1.revert") == "a"
    for other in (
        "volume-a.info",
        "volume-a.tmp",
        "volume-a.b.c",
        ".volume-a",
        "volume-../x",
        "volume-a/b",
        "image-1.2.3",
        ".volume-a.deleting",
        "volume-a.s1.revert",
    ):
        assert images.volume_of(other) is None, other
    assert images.backing_allowed("abc", "volume-abc.s1")
    assert not images.backing_allowed("abc", "volume-abc.def.s1")
    assert not images.backing_allowed("abc", "volume-abcd")
    assert not images.backing_allowed(None, "volume-abc")
    assert images.is_id("6aa6c52b-a120-4397-8982-7c5ebaa1e4be")
    for bad in ("a.b", "a/b", "../x", "", "-a", "info", "x" * 129, None):
        assert not images.is_id(bad), bad


@pytest.mark.parametrize("name", ["volume-a.b\n", "volume-a\n", ".volume-a.tmp\n"])
def test_a_trailing_newline_names_no_file_of_the_volume(name):
    # '$' matches before a final newline: one file would have two spellings.
    assert not images.backing_allowed("a", name)
    assert images.volume_of(name) is None
    assert not images.is_id(name.removeprefix("volume-"))
