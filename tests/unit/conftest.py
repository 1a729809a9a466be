"""Fixtures shared by the unit tests."""

from __future__ import annotations

import pytest

from remotefs_aa import coordination
from tests.unit.fakes import MemoryProvider


@pytest.fixture
def memory_locks():
    """An in-memory lock provider, set as the running one (the driver's locks go to it)."""
    prov = MemoryProvider()
    prov.start()
    coordination.guard.set_provider(prov)
    yield prov
    coordination.guard.set_provider(None)
    prov.stop()
