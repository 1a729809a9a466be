"""Every driver method takes exactly the locks of ARCHITECTURE.md's lock map.

The concurrency tests call the driver's decorated methods and would notice a
method that lost its ``synchronized`` (its chain changes then race), but not
one whose template names the wrong lock for a case they rarely hit. Here the
real local driver runs each method with a recording provider in place of
the configured one, and the names it took are compared with the map.
"""

from __future__ import annotations

import pytest

from remotefs_aa import coordination, service
from remotefs_aa.objects import Snapshot, Volume
from tests.functional import volumes as v
from tests.unit.fakes import MemoryProvider

pytestmark = pytest.mark.functional


@pytest.fixture
def recorded(tmp_path):
    driver = v.start_driver(v.write_config(str(tmp_path)))
    recorder = MemoryProvider()
    recorder.fair = True  # no "-turn" companion locks: the hand-off is tested elsewhere
    recorder.start()
    coordination.guard.set_provider(recorder)
    try:
        yield driver, recorder
    finally:
        coordination.guard.set_provider(None)
        recorder.stop()
        service.stop()


def _locks(recorder, call):
    """The lock names ``call`` took (without the prefix), checked released in reverse."""
    recorder.events.clear()
    call()
    taken = [n.removeprefix("remotefs_aa-") for n in recorder.acquired()]
    assert [n.removeprefix("remotefs_aa-") for n in recorder.released()] == taken[::-1]
    return taken


def _place(volume, update):
    volume.provider_location = update["provider_location"]


def test_every_method_takes_the_locks_of_the_lock_map(recorded):
    driver, rec = recorded
    vol = Volume(size=1)
    assert _locks(rec, lambda: _place(vol, driver.create_volume(vol))) == [vol.id]
    snap = Snapshot(vol)
    assert _locks(rec, lambda: driver.create_snapshot(snap)) == [vol.id]
    assert _locks(rec, lambda: driver.extend_volume(vol, 2)) == [vol.id]
    vol.size = 2
    assert _locks(rec, lambda: driver.revert_to_snapshot(None, vol, snap)) == [vol.id]

    # Both volumes, in sorted order (so {A, B} and {B, A} cannot deadlock).
    clone, copy = Volume(size=2), Volume(size=2)
    taken = _locks(rec, lambda: _place(clone, driver.create_cloned_volume(clone, vol)))
    assert taken == sorted([vol.id, clone.id])
    taken = _locks(rec, lambda: _place(copy, driver.create_volume_from_snapshot(copy, snap)))
    assert taken == sorted([vol.id, copy.id])

    images = v.image_store(driver)
    meta = {"id": "img", "disk_format": "raw"}
    assert _locks(rec, lambda: driver.copy_volume_to_image(None, clone, images, meta)) == [clone.id]
    assert _locks(rec, lambda: driver.copy_image_to_volume(None, copy, images, "img")) == [copy.id]
    # A lock-free read of the atomically written .info file.
    assert _locks(rec, lambda: driver.initialize_connection(vol, {})) == []

    assert _locks(rec, lambda: driver.delete_snapshot(snap)) == [vol.id]
    for volume in (vol, clone, copy):
        assert _locks(rec, lambda volume=volume: driver.delete_volume(volume)) == [volume.id]
