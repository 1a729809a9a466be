"""The history checker's replay, on hand-written histories (no driver, no share).

Each test is a small timeline: which calls ran when, what they logged, and
what the model must then say about each region of each view. The functional
tests (tests/functional/test_concurrency.py) run the same checker on real
histories and real chains.
"""

from __future__ import annotations

import itertools
import logging
import threading

import pytest

from remotefs_aa import checker, history
from remotefs_aa.checker import EITHER, PARTIAL, PRESENT
from remotefs_aa.workload import REGION, pattern_of

V = "vol-1"
_seq = itertools.count(1)


def call(kind, start, end, ok=True, **fields):
    """One ``end`` record of the history."""
    record = {
        "event": "end",
        "host": "h",
        "pid": 1,
        "worker": 0,
        "seq": next(_seq),
        "kind": kind,
        "start": start,
        "end": end,
        "result": "ok" if ok else "error",
        "generation": None,
        "noop": False,
        "recovered": [],
        "swept": [],
        "lock_wait": None,
        "held_from": None,
        "held_until": None,
        **fields,
    }
    if not ok:
        record.setdefault("error", {"class": "X", "message": "failed"})
        record.setdefault("refusal", None)
    return record


def created(volume=V, start=0.0, end=1.0, **fields):
    fields.setdefault("published", [[volume, 1, "create"]])
    return call(
        "create_volume", start, end, new_volume=volume, size=1, share="s", worker=-1, **fields
    )


def write(region, start, end, ok=True, volume=V):
    return call("write", start, end, ok, volume=volume, region=region, pattern=pattern_of(region))


def snap(sid, gen, start, end, volume=V, **fields):
    fields.setdefault("published", [[volume, gen, f"snapshot {sid}"]])
    return call(
        "create_snapshot", start, end, volume=volume, snapshot=sid, generation=gen, size=1, **fields
    )


def delete(sid, gen, start, end, volume=V, **fields):
    """A snapshot delete as the chain publishes it: its intent, a claim, the delete."""
    fields.setdefault(
        "published",
        [
            [volume, gen - 2, f"intent delete_snapshot {sid}"],
            [volume, gen - 1, f"claim unlink of delete_snapshot {sid}"],
            [volume, gen, f"delete {sid}"],
        ],
    )
    return call(
        "delete_snapshot", start, end, volume=volume, snapshot=sid, generation=gen, size=1, **fields
    )


def revert(sid, gen, start, end, volume=V, **fields):
    """A revert as the chain publishes it: its intent, the claim of its rename, the revert."""
    fields.setdefault(
        "published",
        [
            [volume, gen - 2, f"intent revert {sid}"],
            [volume, gen - 1, f"claim rename of revert {sid}"],
            [volume, gen, f"revert {sid}"],
        ],
    )
    return call("revert_to_snapshot", start, end, volume=volume, snapshot=sid, size=1, **fields)


def model(records, finals):
    m = checker.Model(records, [])
    m.build(finals)
    return m


def test_writes_before_and_after_a_snapshot_are_exact():
    m = model(
        [created(), write(1, 2, 3), snap("s1", 2, 4, 5), write(2, 6, 7)],
        {V: 2},
    )
    lin = m.lineages[V]
    assert m.problems == [] and m.errors == []
    assert lin.snaps["s1"] == {1: (PRESENT, pattern_of(1))}
    assert lin.active == {1: (PRESENT, pattern_of(1)), 2: (PRESENT, pattern_of(2))}


def test_a_write_during_a_snapshot_create_is_either_in_that_snapshot_only():
    m = model(
        [created(), write(1, 3.5, 4.5), snap("s1", 2, 4, 5), snap("s2", 3, 6, 7)],
        {V: 3},
    )
    lin = m.lineages[V]
    assert m.problems == []
    assert lin.snaps["s1"] == {1: (EITHER, pattern_of(1))}
    # A create never loses a write: the next snapshot and the active image have it.
    assert lin.snaps["s2"] == {1: (PRESENT, pattern_of(1))}
    assert lin.active == {1: (PRESENT, pattern_of(1))}


def test_a_write_during_a_delete_or_revert_may_be_lost():
    records = [
        created(),
        snap("s1", 2, 2, 3),
        write(1, 4.5, 5.5),
        delete("s1", 5, 5, 6),
        snap("s2", 6, 7, 8),
        write(2, 8.5, 9.5),
        revert("s2", 9, 9, 10),
    ]
    m = model(records, {V: 9})
    lin = m.lineages[V]
    assert m.problems == []
    assert lin.active[1] == (EITHER, pattern_of(1))
    assert lin.entries[9].effect == "revert" and lin.entries[7].effect == "intent"
    assert lin.active[2] == (EITHER, pattern_of(2))
    assert lin.snaps["s2"][1] == (EITHER, pattern_of(1)) and 2 not in lin.snaps["s2"]


def test_a_failed_write_may_have_left_any_part_of_its_data():
    m = model([created(), write(1, 2, 3, ok=False), snap("s1", 2, 4, 5)], {V: 2})
    assert m.lineages[V].active == {1: (PARTIAL, pattern_of(1))}


def test_a_revert_must_be_to_the_latest_snapshot():
    # s2 is created after s1; a revert to s1 cannot be right once s2 exists.
    records = [created(), snap("s1", 2, 2, 3), snap("s2", 3, 4, 5), revert("s1", 6, 6, 7)]
    m = model(records, {V: 6})
    assert any("but the latest snapshot at generation 6 was s2" in p for p in m.problems)


def test_a_successful_call_must_have_published_its_generation():
    quiet = revert("s1", 5, 4, 5, published=[])
    m = model([created(), snap("s1", 2, 2, 3), quiet], {V: 2})
    assert any("succeeded but logged no revert generation" in p for p in m.problems), m.problems


def test_a_failed_image_copy_after_its_claim_may_or_may_not_have_replaced_the_image():
    image = {"event": "note", "kind": "image", "regions": [7]}
    copy = call(
        "copy_image_to_volume", 4, 5, ok=False, volume=V, size=1, published=[[V, 2, "image"]]
    )
    m = model([image, created(), write(1, 2, 3), copy], {V: 2})
    assert m.problems == []
    assert m.lineages[V].active == {1: (EITHER, pattern_of(1)), 7: (EITHER, pattern_of(7))}
    ok = call("copy_image_to_volume", 4, 5, volume=V, size=1, published=[[V, 2, "image"]])
    m = model([image, created(), write(1, 2, 3), ok], {V: 2})
    assert m.lineages[V].active == {7: (PRESENT, pattern_of(7))}


def test_generations_nobody_wrote_or_wrote_twice_are_found():
    m = model([created(), snap("s1", 2, 2, 3), snap("s2", 4, 4, 5)], {V: 4})
    assert any("generations [3] were written by no call" in p for p in m.problems), m.problems
    m = model([created(), snap("s1", 2, 2, 3), snap("s2", 2, 4, 5)], {V: 2})
    assert any("written by both" in p for p in m.problems), m.problems


def test_generation_order_must_agree_with_real_time():
    # s2 finished before s1 started, yet logged the higher generation.
    m = model([created(), snap("s1", 2, 5, 6), snap("s2", 3, 2, 3)], {V: 3})
    assert any("contradicts real time" in p for p in m.problems), m.problems


def test_a_failed_delete_finished_by_the_next_operation():
    """Intent written by the failed call, the delete done by whoever recovered it."""
    refused = {"class": "PrivilegedCommandFailed", "message": "Failed to get write lock"}
    records = [
        created(),
        snap("s1", 2, 2, 3),
        write(5, 3.5, 4.5),  # the guest whose image lock made the commit fail
        call(
            "delete_snapshot",
            4,
            5,
            ok=False,
            volume=V,
            snapshot="s1",
            size=1,
            error=refused,
            refusal="image-in-use",
            published=[[V, 3, "intent delete_snapshot s1"]],
        ),
        delete(
            "s1",
            6,
            6,
            7,
            noop=True,
            recovered=[{"volume": V, "op": "delete_snapshot", "snapshot": "s1", "generation": 3}],
            published=[
                [V, 4, "claim commit of delete_snapshot s1"],
                [V, 5, "claim unlink of delete_snapshot s1"],
                [V, 6, "delete s1"],
            ],
        ),
        snap("s2", 7, 8, 9),
    ]
    m = model(records, {V: 7})
    lin = m.lineages[V]
    assert m.problems == [] and m.errors == []
    assert lin.entries[3].effect == "intent" and lin.entries[6].effect == "delete"
    assert not lin.entries[3].ok and lin.entries[6].ok
    assert list(lin.snaps) == ["s2"]


def test_refusals_need_a_cause():
    gone = {"class": "SnapshotNotFound", "message": "snapshot s9 is not in x.info"}
    base = [created(), snap("s1", 2, 2, 3)]
    bad = call(
        "revert_to_snapshot",
        4,
        5,
        ok=False,
        volume=V,
        snapshot="s1",
        size=1,
        error=gone,
        refusal="snapshot-gone",
    )
    m = model([*base, bad], {V: 2})
    assert any("no cause in the history" in p for p in m.problems), m.problems
    # Deleted by someone else meanwhile: a fair refusal.
    m = model([*base, delete("s1", 5, 3.9, 4.5), bad], {V: 5})
    assert m.problems == []


def test_an_unexpected_error_is_an_error_not_a_refusal():
    stale = {"class": "StaleInfoGeneration", "message": "generation 3, expected 2"}
    m = model([created(), call("create_snapshot", 2, 3, ok=False, volume=V, error=stale)], {V: 1})
    assert len(m.errors) == 1 and "StaleInfoGeneration" in m.errors[0]


def test_a_clone_copies_the_source_as_its_interval_allows():
    records = [
        created(),
        write(1, 2, 3),
        write(2, 4.5, 5.5),  # overlaps the clone's read
        call(
            "create_cloned_volume",
            5,
            6,
            volume=V,
            new_volume="vol-2",
            size=1,
            share="s",
            published=[["vol-2", 1, "create"]],
        ),
        write(3, 7, 8),  # after it
    ]
    m = model(records, {V: 1, "vol-2": 1})
    assert m.problems == []
    assert m.lineages["vol-2"].active == {
        1: (PRESENT, pattern_of(1)),
        2: (EITHER, pattern_of(2)),
    }


def test_the_lock_held_interval_narrows_a_call_that_waited():
    """A write while the create waited for its lock is before the snapshot, not during it."""
    waited = snap("s1", 2, 4, 10)
    waited["held_from"], waited["held_until"] = 9, 10
    m = model([created(), write(1, 5, 6), waited], {V: 2})
    assert m.lineages[V].snaps["s1"] == {1: (PRESENT, pattern_of(1))}


def test_compare_bytes_reads_every_byte_of_a_sparse_file(tmp_path):
    path = str(tmp_path / "flat.raw")
    with open(path, "wb") as f:
        f.truncate(64 * REGION)
        for region, byte in ((1, pattern_of(1)), (3, pattern_of(3)), (7, 0x55)):
            f.seek(region * REGION)
            f.write(bytes([byte]) * REGION)
        f.seek(9 * REGION)
        f.write(bytes([pattern_of(9)]) * (REGION // 2))
    expected = {
        1: (PRESENT, pattern_of(1)),
        2: (PRESENT, pattern_of(2)),  # missing
        3: (EITHER, pattern_of(3)),
        4: (EITHER, pattern_of(4)),  # absent: fine
        9: (EITHER, pattern_of(9)),  # half: a write lands whole or not at all
    }
    problems, counts = checker.compare_bytes(path, expected, 64 * REGION)
    assert any(p.startswith("region 2 reads 0 of") for p in problems), problems
    assert any(p.startswith("region 7 holds byte 0x55; expected zeros") for p in problems)
    assert any(p.startswith("region 9 holds 32768 of") for p in problems)
    assert len(problems) == 3, problems
    assert counts == {"regions": 2, "ambiguous": 3, "bytes": 64 * REGION}


def test_capture_takes_the_driver_records_of_this_call_in_this_thread(tmp_path):
    driver_log = logging.getLogger("remotefs_aa.drivers.remotefs")
    chain_log = logging.getLogger("remotefs_aa.image.chain")
    guard_log = logging.getLogger("remotefs_aa.coordination.guard")
    with history.capturing() as capture:
        rec = history.Recorder(str(tmp_path / "h" / "x.jsonl"), capture, worker=3, host="h1")

        def body():
            guard_log.debug("%s: acquired locks %s, waited %.3f s", "f", ["l"], 0.25)
            chain_log.warning(
                "volume %s: finishing interrupted %s (intent %s, generation %d)",
                V,
                "delete_snapshot",
                {"op": "delete_snapshot", "snapshot": "s0"},
                7,
            )
            # Another thread's record must not land in this call's facts.
            other = threading.Thread(
                target=driver_log.info, args=("snapshot %s ... generation %d", "x", 99)
            )
            other.start()
            other.join()
            chain_log.debug("volume %s: published generation %d (%s)", V, 9, "snapshot s1")
            driver_log.info(
                "snapshot %s of volume %s: created (active %s, generation %d)", "s1", V, "a", 9
            )
            guard_log.debug("%s: released locks %s, held %.3f s", "f", ["l"], 0.01)
            return {"provider_location": "share-1"}

        done = rec.call("create_snapshot", body, fields={"volume": V, "snapshot": "s1"})
        rec.call("delete_snapshot", lambda: 1 / 0, fields={"volume": V})
        rec.close()
    r = done.record
    assert done.ok and r["generation"] == 9 and r["lock_wait"] == 0.25 and r["share"] == "share-1"
    assert r["recovered"] == [
        {"volume": V, "op": "delete_snapshot", "snapshot": "s0", "generation": 7}
    ]
    assert r["published"] == [[V, 9, "snapshot s1"]]
    assert r["start"] <= r["held_from"] <= r["held_until"] <= r["end"]
    ended, unfinished = history.load(str(tmp_path / "h"))
    assert [e["kind"] for e in ended] == ["create_snapshot", "delete_snapshot"] and not unfinished
    assert ended[1]["error"]["class"] == "ZeroDivisionError" and ended[1]["refusal"] is None
    # The capture is gone: the loggers are as they were.
    assert driver_log.propagate and not driver_log.handlers


def test_a_call_that_never_ended_is_reported(tmp_path):
    directory = tmp_path / "h"
    rec = history.Recorder(str(directory / "x.jsonl"), None, worker=0, host="h1")
    rec.call("write", lambda: None, fields={"volume": V})
    with open(rec.path, "a") as f:
        f.write('{"event": "start", "host": "h1", "pid": 5, "seq": 9, "kind": "create_snapshot"}\n')
        f.write('{"event": "end", "host": "h1", "pid"')  # cut short by a kill
    rec.close()
    ended, unfinished = history.load(str(directory))
    assert len(ended) == 1 and [u["seq"] for u in unfinished] == [9]
    assert "never ended" in checker.Model(ended, unfinished).problems[0]


@pytest.mark.parametrize(
    ("cls", "message", "reason"),
    [
        ("SnapshotNotFound", "snapshot s is not in x", "snapshot-gone"),
        ("InvalidSnapshot", "can only be reverted to its latest snapshot", "not-latest"),
        ("InvalidImage", "x: virtual size 2 exceeds the volume size 1", "stale-size"),
        ("InvalidImage", "x: the image is missing (named by the .info file)", "volume-gone"),
        ("PrivilegedCommandFailed", 'Failed to get "write" lock', "image-in-use"),
        ("StaleInfoGeneration", "generation 3", None),
        ("InvalidImage", "x: the chain walk went astray", None),
    ],
)
def test_refusal_classes(cls, message, reason):
    assert history.refusal(cls, message) == reason


def test_files_of_matches_by_grammar_not_prefix():
    names = ["volume-a", "volume-a.s1", "volume-a.info", ".volume-a.tmp", "volume-ab", "x"]
    assert checker.files_of("a", names) == [
        ".volume-a.tmp",
        "volume-a",
        "volume-a.info",
        "volume-a.s1",
    ]


def test_finishing_the_intent_of_a_call_still_running_is_found():
    """Without a lock, a snapshot create finds a running delete's intent and "recovers" it."""
    records = [
        created(),
        snap("s1", 2, 2, 3),
        delete("s1", 5, 4, 6),
        snap(
            "s2",
            6,
            4.5,
            5.5,
            recovered=[{"volume": V, "op": "delete_snapshot", "snapshot": "s1", "generation": 3}],
        ),
    ]
    m = model(records, {V: 6})
    assert any("while delete_snapshot on" in p and "still running" in p for p in m.problems)
