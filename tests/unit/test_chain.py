"""The chain bookkeeping (.info parsing, fencing, step order, recovery) on an in-memory share.

The functional tests run the same code on real images with qemu-img; here a
tiny model of a directory of images (name -> format, size, backing) makes
every branch quick to reach, including failures at each step.
"""

from __future__ import annotations

import json
import os

import pytest

from remotefs_aa import exception
from remotefs_aa.image import chain as ch
from remotefs_aa.privsep import images

GiB = ch.GiB
D = "/share"


class Boom(Exception):
    pass


class FakeIO:
    """Images as dicts; text files as strings; ``fail_at`` raises at a step."""

    def __init__(self) -> None:
        self.images: dict[str, dict] = {}
        self.texts: dict[str, str] = {}
        self.calls: list[str] = []
        self.fail_at: tuple[str, int] | None = None
        self.modes: dict[str, int] = {}
        #: Whole-directory reads: no operation on one volume may make any.
        self.listings = 0

    def _step(self, name: str) -> None:
        self.calls.append(name)
        if self.fail_at and self.fail_at[0] == name:
            n = self.fail_at[1] - 1
            self.fail_at = (name, n) if n else None
            if not n:
                raise Boom(name)

    def read_text(self, path):
        return self.texts.get(path)

    def replace_text_if(self, path, data, expected, durable=True, mode=0o640):
        self._step("replace_text_if")
        self.modes[path] = mode
        current = self.texts.get(path)
        if current != expected:
            return "" if current is None else current
        self.texts[path] = data
        return None

    def publish_info(self, directory, base, data, generation, expected, mode=0o640, durable=True):
        """The daemon's compare-and-swap: claim ``.<base>.gen.<N>`` exclusively, then .info."""
        self._step("replace_text_if")
        info, claim = f"{directory}/{base}.info", f"{directory}/.{base}.gen.{generation}"
        current = self.texts.get(info)
        if current != expected:
            return "" if current is None else current
        if claim in self.texts:
            return self.texts[claim]
        self.texts[claim] = data
        self.texts[info] = data
        self.modes[info] = mode
        return None

    def unlink(self, path):
        self._step("unlink")
        return self.images.pop(path, None) is not None or self.texts.pop(path, None) is not None

    def unlink_many(self, directory, names):
        removed = []
        for name in names:
            self._step("unlink")
            path = f"{directory}/{name}"
            if self.images.pop(path, None) is not None or self.texts.pop(path, None) is not None:
                removed.append(name)
        return removed

    def rename(self, src, dst, exclusive=False):
        self._step("rename")
        if exclusive and (dst in self.images or dst in self.texts):
            raise FileExistsError(dst)
        store = self.images if src in self.images else self.texts
        store[dst] = store.pop(src)

    def _names(self):
        return {os.path.basename(p): 1 for p in [*self.images, *self.texts]}

    def list_directory(self, path):
        self.listings += 1
        return self._names()

    def volume_state(self, directory, base, default_format, walk=True):
        """The daemon's answer: only this volume's names (the daemon looks them up)."""
        text = self.texts.get(f"{directory}/{base}.info")
        files = {n: 0 for n in self._names() if n.startswith((base, f".{base}"))}
        active, fmt = base, default_format
        if text is not None:
            try:
                data = json.loads(text)
                active, fmt = data.get("active"), data.get("format", default_format)
            except (ValueError, AttributeError):
                active = None
        chain = None
        if walk and isinstance(active, str) and active in files:
            chain = self.image_chain(f"{directory}/{active}", [base] if fmt == "raw" else None)
        return {
            "info": text,
            "deleting": f".{base}.deleting" in files,
            "files": files,
            "chain": chain,
        }

    def share_scan(self, directory, default_format):
        """The daemon's one pass: names grouped by volume, each .info and its active's size."""
        volumes = {}
        for name in sorted(self._names()):
            match = images.ANY_OF_VOLUME.match(name)  # grouped as the daemon groups them
            if match:
                volumes.setdefault(match["vol"], []).append(name)
        out = {}
        for vid, names in volumes.items():
            base = f"volume-{vid}"
            text = self.texts.get(f"{directory}/{base}.info")
            active = base
            try:
                active = json.loads(text).get("active") if text else base
            except (ValueError, AttributeError):
                active = None
            image = self.images.get(f"{directory}/{active}")
            out[vid] = {
                "info": text,
                "deleting": f".{base}.deleting" in names,
                "base": base in names,
                "size": image["size"] if image else None,
                "error": None,
                "files": names,
            }
        return {"volumes": out}

    def image_chain(self, path, raw=None):
        out = []
        while path in self.images:
            img = self.images[path]
            name = os.path.basename(path)
            is_raw = name in (raw or ())
            out.append(
                {
                    "filename": path,
                    "format": "raw" if is_raw else img["format"],
                    "virtual_size": img["size"],
                    "backing_file": None if is_raw else img["backing"],
                    "backing_format": img.get("backing_format"),
                    "data_file": img.get("data_file"),
                    "encrypted": False,
                }
            )
            if is_raw or not img["backing"]:
                break
            path = os.path.join(D, img["backing"])
        return out

    def create(self, path, fmt, size, backing, backing_fmt, mode):
        self._step("create")
        if path in self.images:
            raise FileExistsError(path)  # the daemon creates with O_EXCL
        self.modes[path] = mode
        self.images[path] = {
            "format": fmt,
            "size": size,
            "backing": backing,
            "backing_format": backing_fmt,
        }

    def truncate(self, path, size, mode, new=False):
        self._step("truncate")
        if new and path in self.images:
            raise FileExistsError(path)
        self.modes.setdefault(path, mode)
        self.images.setdefault(path, {"format": "raw", "backing": None})["size"] = size

    fallocate = truncate

    def commit(self, path):
        self._step("commit")

    def rebase_unsafe(self, path, backing, backing_fmt):
        self._step("rebase_unsafe")
        self.images[path]["backing"] = backing
        self.images[path]["backing_format"] = backing_fmt

    def resize(self, path, fmt, size, skip_backing=False):
        self._step("resize")
        self.images[path]["size"] = size

    def convert(self, src, src_fmt, dst, dst_fmt, sparse, mode):
        self._step("convert")
        if dst in self.images:
            raise FileExistsError(dst)
        self.modes[dst] = mode
        self.images[dst] = {"format": dst_fmt, "size": self.images[src]["size"], "backing": None}

    def check(self, path, fmt):
        return {"exit_code": 0}

    def qemu_info_chain(self, path, fmt):
        return [
            {
                "filename": link["filename"],
                "virtual_size": link["virtual_size"],
                "backing_file": link["backing_file"],
            }
            for link in self.image_chain(path, [os.path.basename(path)] if fmt == "raw" else None)
        ]

    def statvfs(self, path):
        return {"total": 100 * GiB, "free": 50 * GiB, "available": 50 * GiB}


@pytest.fixture
def io():
    return FakeIO()


def _chain(io, vid="v1", size=1):
    return ch.Chain(io, D, vid, size, "raw")


def _with_snaps(io, n=2):
    c = _chain(io)
    c.create_base("raw", "thin")
    for i in range(n):
        c.create_snapshot(f"s{i + 1}")
    return c


def test_parse_info_accepts_cinder_files_and_ours():
    state = ch.parse_info("x", json.dumps({"active": "volume-v1.s1", "s1": "volume-v1.s1"}), "raw")
    assert state.generation == 0 and state.snapshots == {"s1": "volume-v1.s1"}
    assert state.format == "raw" and state.intent is None


@pytest.mark.parametrize(
    "text,reason",
    [
        ("{", "not JSON"),
        ("[]", "not a JSON object"),
        ("{}", "no 'active'"),
        ('{"active": "a", "generation": -1}', "not a count"),
        ('{"active": "a", "generation": true}', "not a count"),
        ('{"active": "a", "format": "vmdk"}', "not raw or qcow2"),
        ('{"active": "a", "intent": 3}', "not an operation record"),
        ('{"active": "a", "s1": 5}', "maps to 5"),
    ],
)
def test_parse_info_refuses_malformed_files(text, reason):
    with pytest.raises(exception.InvalidInfoFile, match=reason):
        ch.parse_info("/s/volume-v1.info", text, "raw")


def test_info_naming_foreign_files_is_refused(io):
    c = _with_snaps(io, 1)
    io.texts[c.info_path] = json.dumps({"active": "volume-v2", "s1": "volume-v1.s1"})
    with pytest.raises(exception.InvalidInfoFile, match="not a file of volume v1"):
        c.load()


def test_snapshot_bookkeeping_and_generations(io):
    c = _with_snaps(io, 3)
    state = c.load()
    assert state.active == "volume-v1.s3"
    assert state.snapshots == {"s1": "volume-v1.s1", "s2": "volume-v1.s2", "s3": "volume-v1.s3"}
    # one write for the base, one per snapshot (no intent needed to create one)
    assert state.generation == 4
    assert [link.name for link in c.trusted_chain(state)] == [
        "volume-v1.s3",
        "volume-v1.s2",
        "volume-v1.s1",
        "volume-v1",
    ]
    assert c.snapshot_image(state, "s2").name == "volume-v1.s1"


def test_delete_middle_snapshot_commits_rebases_and_unlinks(io):
    c = _with_snaps(io, 3)
    io.calls.clear()
    c.delete_snapshot("s2")
    # Intent, then every destructive step claimed through the compare-and-swap first.
    claim = "replace_text_if"
    assert io.calls == [
        "replace_text_if", claim, "commit", claim, "rebase_unsafe", claim, "unlink",
        "replace_text_if",
    ]  # fmt: skip
    assert io.images[f"{D}/volume-v1.s3"]["backing"] == "volume-v1.s1"
    state = c.load()
    assert "s2" not in state.snapshots and state.active == "volume-v1.s3"
    assert c.verify()["problems"] == []


def test_deleting_a_missing_snapshot_changes_nothing_and_says_so(io):
    c = _with_snaps(io, 1)
    before = c.load()
    io.calls.clear()
    state = c.delete_snapshot("nosuch")
    assert state.not_found and io.calls == []  # idempotent: no write, no error
    assert c.load().generation == before.generation
    assert not c.delete_snapshot("s1").not_found


def test_delete_active_snapshot_makes_its_base_active(io):
    c = _with_snaps(io, 2)
    io.calls.clear()
    c.delete_snapshot("s2")
    claim = "replace_text_if"
    assert io.calls == ["replace_text_if", claim, "commit", claim, "unlink", "replace_text_if"]
    assert c.load().active == "volume-v1.s1"


@pytest.mark.parametrize("fail_at", ["commit", "rebase_unsafe", "unlink"])
def test_interrupted_delete_is_finished_by_the_next_operation(io, fail_at):
    c = _with_snaps(io, 3)
    io.fail_at = (fail_at, 1)
    with pytest.raises(Boom):
        c.delete_snapshot("s2")
    assert c.load().intent["op"] == "delete_snapshot"
    c.create_snapshot("s4")
    state = c.load()
    assert state.intent is None and "s2" not in state.snapshots
    assert c.verify()["problems"] == []


def test_interrupted_create_snapshot_is_swept_by_the_share_sweep(io):
    """The orphan is found by the periodic share sweep, not by the next operation.

    An operation reads only its own volume's names, so it cannot see an
    overlay nothing names; the sweep (one directory read per share) can.
    """
    c = _with_snaps(io, 1)
    io.fail_at = ("replace_text_if", 1)  # after the overlay exists, before publishing it
    with pytest.raises(Boom):
        c.create_snapshot("s2")
    assert f"{D}/volume-v1.s2" in io.images
    assert c.verify()["problems"] == ["orphan file volume-v1.s2"]
    c.create_snapshot("s3")
    assert f"{D}/volume-v1.s2" in io.images  # an operation does not list the share
    generation = c.load().generation
    assert c.sweep_orphans(["volume-v1.s2", "volume-v1.s3", "volume-v1"]) == ["volume-v1.s2"]
    assert f"{D}/volume-v1.s2" not in io.images and "s2" not in c.load().snapshots
    assert c.load().generation == generation + 1  # claimed before the removal
    assert c.verify()["problems"] == []
    assert c.sweep_orphans(["volume-v1.s3"]) == [] and c.load().generation == generation + 1


def test_a_lapsed_creator_of_a_swept_orphan_is_refused_at_its_publish(io):
    """The sweep publishes a generation before it removes an orphan: the creator loses."""
    c = _with_snaps(io, 1)
    lapsed = _chain(io)
    seen = lapsed.load()  # the lapsed holder read the chain, then made its overlay...
    io.create(f"{D}/volume-v1.s2", "qcow2", GiB, "volume-v1.s1", "qcow2", 0o660)
    assert c.sweep_orphans(["volume-v1.s2"]) == ["volume-v1.s2"]  # ... and froze meanwhile
    with pytest.raises(exception.StaleInfoGeneration):
        lapsed.save(seen, active="volume-v1.s2", snapshots={**seen.snapshots, "s2": "volume-v1.s2"})
    assert c.verify()["problems"] == []


def test_no_operation_on_a_volume_lists_the_share(io):
    """Create, snapshot create/delete, revert, extend, clone, delete: names only."""
    c = _chain(io)
    c.create_base("raw", "thin")
    c.create_snapshot("s1")
    c.create_snapshot("s2")
    c.delete_snapshot("s1")
    c.revert("s2")
    c.extend(2)
    _chain(io, "v2").create_from(f"{D}/volume-v1.s2", "qcow2", GiB, "raw", True)
    _chain(io, "v2").delete_volume()
    c.delete_volume()
    assert io.listings == 0
    assert io.images == {} and io.texts == {}


def test_a_leftover_temp_file_of_a_dead_create_is_replaced(io):
    io.truncate(f"{D}/.volume-v1.tmp", 5, 0o600)
    io.images[f"{D}/.volume-v1.tmp"]["stale"] = True
    c = _chain(io)
    c.create_base("raw", "thin")
    assert "stale" not in io.images[f"{D}/volume-v1"]
    assert f"{D}/.volume-v1.tmp" not in io.images


def test_interrupted_revert_is_redone(io):
    c = _with_snaps(io, 2)
    io.fail_at = ("rename", 1)
    with pytest.raises(Boom):
        c.revert("s2")
    c.load_recovered()
    assert c.load().intent is None
    assert c.verify()["problems"] == []


def test_interrupted_revert_finished_by_a_holder_with_an_older_size_keeps_its_size(io):
    """The finishing holder's size can lag an extend (Cinder records it later)."""
    c = _chain(io, size=2)
    c.create_base("raw", "thin")
    c.create_snapshot("s1")
    io.fail_at = ("rename", 1)
    with pytest.raises(Boom):
        c.revert("s1")
    _chain(io, size=1).load_recovered()
    assert c.load().intent is None
    assert io.images[f"{D}/volume-v1.s1"]["size"] == 2 * GiB


def test_revert_only_to_latest(io):
    c = _with_snaps(io, 2)
    with pytest.raises(exception.InvalidSnapshot, match="latest snapshot .*, s2; s1 is older"):
        c.revert("s1")


def test_fencing_refuses_a_writer_with_a_stale_read(io):
    c = _with_snaps(io, 1)
    stale = c.load()
    c.create_snapshot("s2")  # someone else moved on
    with pytest.raises(
        exception.StaleInfoGeneration, match="generation 2 when read and is now at 3"
    ):
        c.save(stale, intent={"op": "delete_snapshot"})


def test_hostile_backing_names_are_refused(io):
    c = _with_snaps(io, 1)
    for backing in ("/etc/shadow", "../x", "volume-v2", "volume-v1.unknown"):
        io.images[f"{D}/volume-v1.s1"]["backing"] = backing
        with pytest.raises(exception.InvalidImage, match="backing file"):
            c.trusted_chain(c.load())


def test_missing_link_and_oversize_are_refused(io):
    c = _with_snaps(io, 2)
    io.images[f"{D}/volume-v1.s1"]["size"] = 2 * GiB
    with pytest.raises(exception.InvalidImage, match="exceeds"):
        c.trusted_chain(c.load())
    io.images[f"{D}/volume-v1.s1"]["size"] = GiB
    del io.images[f"{D}/volume-v1.s1"]
    with pytest.raises(exception.InvalidImage, match="missing"):
        c.trusted_chain(c.load())


def test_delete_volume_removes_everything_and_is_resumable(io):
    c = _with_snaps(io, 3)
    io.images[f"{D}/.volume-v1.tmp"] = {"format": "raw", "size": 1, "backing": None}
    io.fail_at = ("unlink", 2)
    with pytest.raises(Boom):
        c.delete_volume()
    with pytest.raises(exception.VolumeNotFound, match="deletion is now finished"):
        c.create_snapshot("s9")
    assert io.images == {} and io.texts == {}


def test_create_base_refuses_existing_volume_and_cleans_temp(io):
    c = _chain(io)
    c.create_base("raw", "thin")
    with pytest.raises(exception.VolumeExists):
        c.create_base("raw", "thin")
    io.fail_at = ("convert", 1)
    other = _chain(io, "v2")
    with pytest.raises(Boom):
        other.create_from(f"{D}/volume-v1", "raw", GiB, "raw", True)
    assert f"{D}/.volume-v2.tmp" not in io.images


def test_privileged_io_hands_back_lists_as_lists():
    # oslo.privsep's wire format (msgpack, use_list=False) turns the daemon's
    # lists into tuples; the share sweep then failed adding an orphan's list
    # to the removed temp files (TypeError), found by the fault tests.
    class Files:
        @staticmethod
        def unlink_many(directory, names):
            return tuple(names)

    io = ch.PrivilegedIO()
    io.files = Files()
    removed = io.unlink_many("/d", [".volume-a.tmp"])
    assert removed == [".volume-a.tmp"]
