"""Rebuilding a .info file from the images (volume repair), on the in-memory share."""

from __future__ import annotations

import json

import pytest

from remotefs_aa import exception
from remotefs_aa.image import chain as ch
from remotefs_aa.image import repair
from tests.unit.test_chain import D, FakeIO


@pytest.fixture
def io():
    return FakeIO()


def _volume(io, snaps=("s-c", "s-a", "s-b")):
    c = ch.Chain(io, D, "v1", 1, "raw")
    c.create_base("raw", "thin")
    for sid in snaps:
        c.create_snapshot(sid)
    return ch.Chain(io, D, "v1", 0, "raw")  # as repair builds it: size unknown


def test_a_truncated_info_file_is_rebuilt_from_the_headers(io):
    c = _volume(io)
    good = c.load()
    io.texts[c.info_path] = truncated = io.texts[c.info_path][:25]
    with pytest.raises(exception.InvalidInfoFile):
        c.load()
    found = repair.plan(c)
    assert found.problems == [] and found.needed
    assert found.chain == ["volume-v1.s-b", "volume-v1.s-a", "volume-v1.s-c", "volume-v1"]
    assert '+ "active": "volume-v1.s-b",\n' in found.diff()
    assert io.texts[c.info_path] == truncated  # planning wrote nothing
    repair.apply(c, found)
    fixed = c.load()
    assert (fixed.active, fixed.snapshots, fixed.format) == (
        good.active,
        good.snapshots,
        good.format,
    )
    assert c.verify(deep=False)["problems"] == []
    again = repair.plan(c)
    assert not again.needed and "already matches" in again.notes[0]


def test_a_missing_info_file_is_rebuilt_and_the_generation_kept_when_readable(io):
    c = _volume(io, ("s1",))
    text = io.texts.pop(c.info_path)
    found = repair.plan(c)
    assert found.current is None and json.loads(found.proposed)["s1"] == "volume-v1.s1"
    repair.apply(c, found)
    io.texts[c.info_path] = text.replace('"format"', '"formt"')  # parses, wrong key set
    found = repair.plan(c)
    # Above the file's generation and above every claim (the repair's own, 3): the
    # compare-and-swap refuses a generation whose claim exists.
    claims = [n for n in io.list_directory(D) if n.startswith(".volume-v1.gen.")]
    assert (
        json.loads(found.proposed)["generation"]
        == max(json.loads(text)["generation"], *(int(n.rsplit(".", 1)[1]) for n in claims)) + 1
    )
    repair.apply(c, found)


def test_two_tops_are_refused_not_guessed(io):
    """An interrupted snapshot delete after the rebase: its merged overlay is a second top."""
    c = _volume(io, ("s1", "s2"))
    io.images[f"{D}/volume-v1.s2"]["backing"] = "volume-v1"  # H rebased onto B; F still there
    io.texts[c.info_path] = "{"
    found = repair.plan(c)
    assert "several overlays have nothing on top of them" in found.problems[0]
    assert not found.needed
    with pytest.raises(exception.InvalidInfoFile):
        repair.apply(c, found)


def test_a_recorded_intent_or_a_deletion_is_left_to_the_operations(io):
    c = _volume(io, ("s1", "s2"))
    io.fail_at = ("commit", 1)
    with pytest.raises(Exception, match="commit"):
        c.delete_snapshot("s1")
    assert "records an interrupted delete_snapshot" in repair.plan(c).problems[0]
    io.texts[f"{D}/.volume-v1.deleting"] = io.texts.pop(c.info_path)
    assert "is being deleted" in repair.plan(c).problems[0]


def test_a_chain_that_leaves_the_volume_is_refused(io):
    c = _volume(io, ("s1",))
    io.images[f"{D}/volume-v1.s1"]["backing"] = "volume-v2"
    io.texts[c.info_path] = "{"
    found = repair.plan(c)
    assert found.problems and not found.needed


def test_the_write_is_a_compare_and_swap_against_what_was_planned(io):
    c = _volume(io, ("s1",))
    io.texts[c.info_path] = "{"
    found = repair.plan(c)
    io.texts[c.info_path] = "{ "  # someone else wrote meanwhile
    with pytest.raises(exception.StaleInfoGeneration):
        repair.apply(c, found)
    assert io.texts[c.info_path] == "{ "
