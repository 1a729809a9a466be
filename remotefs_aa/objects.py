"""Volume and snapshot objects with Cinder's attribute names.

The drivers read only these attributes, so Cinder's own versioned objects fit
wherever these do; these exist for the CLI, the demo and the tests.
"""

from __future__ import annotations

import dataclasses
import uuid


@dataclasses.dataclass
class Volume:
    """A volume: ``id``, ``size`` in GiB, and the share it lives on."""

    id: str = dataclasses.field(default_factory=lambda: str(uuid.uuid4()))
    size: int = 1
    provider_location: str | None = None
    status: str = "creating"
    display_name: str | None = None
    #: Why the volume could not be read, when a listing found it unreadable
    #: (status ``error``); drivers never read it.
    error: str | None = None

    @property
    def name_id(self) -> str:
        """The id the files are named by; Cinder's differs from ``id`` after a migration."""
        return self.id

    @property
    def name(self) -> str:
        """The base file's name, as in Cinder (``volume_name_template`` % ``name_id``)."""
        return f"volume-{self.name_id}"


@dataclasses.dataclass
class Snapshot:
    """A snapshot of ``volume``."""

    volume: Volume
    id: str = dataclasses.field(default_factory=lambda: str(uuid.uuid4()))
    status: str = "creating"
    display_name: str | None = None

    @property
    def volume_id(self) -> str:
        return self.volume.id

    @property
    def volume_size(self) -> int:
        return self.volume.size

    @property
    def name(self) -> str:
        return f"snapshot-{self.id}"
