"""A volume's snapshot chain: its ``.info`` file, fenced writes, and every chain change.

Layout on the share (Cinder's)::

    volume-<id>              the base image (raw or qcow2)
    volume-<id>.<snap id>    a qcow2 overlay created when <snap id> was taken
    volume-<id>.info         {"active": <top file>, "<snap id>": <file>, ...}

``info[<snap id>]`` names the overlay created when the snapshot was taken, so the
snapshot's data is that overlay's *backing* file. We add three keys Cinder
ignores: ``generation`` (bumped on every write), ``format`` (of the base, so a
raw volume whose guest wrote a qcow2 header is never probed as qcow2) and
``intent`` (a multi-step change in progress that destroys data: deleting a
snapshot merges it away, reverting discards the active image).

Every write is a compare-and-swap (``files.publish_info``): it succeeds only
if the file still holds exactly what this writer read, so a service whose lock
lapsed cannot overwrite newer state (StaleInfoGeneration). Writes are atomic
(temp file, fsync, exclusive claim, rename, fsync of the directory). Every
operation reads its own volume's names only (never a listing of the share).

Crash consistency: a change of more than one step first records its intent,
then runs steps that are each safe to repeat, and clears the intent in the
same write that publishes the result. The next operation on the volume (under
the same lock) finds the intent and finishes or rolls back. Step orders:

create_snapshot S
    1. qemu-img create N (backing = active; its size given, so -u: the chain
       was just checked)   2. write {active: N, S: N}.
    No intent: until step 2, N is a file nothing refers to. Recovery: the
    periodic share sweep (``sweep_orphans``, from one directory read) removes
    such orphans under the volume's lock, publishing a generation first.
delete_snapshot S, F = info[S], B = backing(F), H = the overlay on F (if any)
    1. intent {delete_snapshot, F, B, H}   2. qemu-img commit F (into B)
    3. if H: qemu-img rebase -u H onto B   4. unlink F
    5. write without S (active = B if F was active), no intent.
    Recovery: finish. Committing again is harmless (it copies F's data into
    B again: B already holds it); rebase only if H still points at F.
revert_to_snapshot S (only the latest, like Cinder), F = info[S] = active
    1. intent {revert, F, T}   2. qemu-img create T (backing = backing(F))
    3. rename T over F   4. write, no intent.
    Recovery: finish (unlink T if present and redo 2-4): reverting twice is
    the same as reverting once.
delete_volume
    1. rename .info to .volume-<id>.deleting (the intent; a fenced writer now
       finds no .info and refuses)   2. unlink every file, top first
    3. unlink the marker.   Recovery: finish (any operation that finds the
       marker instead of an .info file does).
create_volume / clone / create from snapshot
    Written to a hidden temp file ``.volume-<id>.tmp`` (exclusively: a
    leftover is replaced), renamed into place without replacing a base,
    then the first .info file is published. A crash leaves only the temp
    file, which the next create or delete of that id, or the share sweep,
    removes. No step lists the share.
copy image to volume (no snapshots)
    Converted into ``.volume-<id>.tmp``, renamed over the base, .info
    rewritten (new generation). A crash leaves the old base and the temp file.
extend
    One ``qemu-img resize`` (or truncate / fallocate) of the active image;
    the backing chain stays closed when the checked headers show the backing
    file is no longer than the top (nothing can show through the new area).

Before any image is used, its headers are checked (``trusted_chain``): raw or
qcow2 only, no external data file, no encryption, virtual size at most the
volume's size, and every backing file one of this volume's own files, in
chain order, down to the base. Nothing is deleted when a check fails.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Callable
from typing import Any, Protocol

from remotefs_aa import exception
from remotefs_aa.privsep import images
from remotefs_aa.privsep.files import KEEP_CLAIMS, claim_name, info_tmp_name

LOG = logging.getLogger(__name__)


GiB = 1024**3
FORMATS = ("raw", "qcow2")
_RESERVED = frozenset({"active", "generation", "format", "intent", *images.RESERVED_SUFFIXES})


class ImageIO(Protocol):
    """The privileged operations a chain needs (``remotefs_aa.privsep`` in production)."""

    def read_text(self, path: str) -> str | None: ...
    def replace_text_if(
        self, path: str, data: str, expected: str | None, durable: bool = True, mode: int = 0o640
    ) -> str | None: ...
    def publish_info(
        self,
        directory: str,
        base: str,
        data: str,
        generation: int,
        expected: str | None,
        mode: int = 0o640,
        durable: bool = True,
    ) -> str | None: ...
    def unlink(self, path: str) -> bool: ...
    def unlink_many(self, directory: str, names: list[str]) -> list[str]: ...
    def rename(self, src: str, dst: str, exclusive: bool = False) -> None: ...
    def list_directory(self, path: str) -> dict[str, int]: ...
    def volume_state(
        self, directory: str, base: str, default_format: str, walk: bool = True
    ) -> dict: ...
    def share_scan(self, directory: str, default_format: str) -> dict: ...
    def image_chain(self, path: str, raw: list[str] | None = None) -> list[dict]: ...
    def create(
        self,
        path: str,
        fmt: str,
        size: int | None,
        backing: str | None,
        backing_fmt: str | None,
        mode: int,
    ) -> None: ...
    def truncate(self, path: str, size: int, mode: int, new: bool = False) -> None: ...
    def fallocate(self, path: str, size: int, mode: int, new: bool = False) -> None: ...
    def commit(self, path: str) -> None: ...
    def rebase_unsafe(self, path: str, backing: str, backing_fmt: str) -> None: ...
    def resize(self, path: str, fmt: str, size: int, skip_backing: bool = False) -> None: ...
    def convert(
        self, src: str, src_fmt: str, dst: str, dst_fmt: str, sparse: bool, mode: int
    ) -> None: ...
    def check(self, path: str, fmt: str) -> dict: ...
    def qemu_info_chain(self, path: str, fmt: str) -> list[dict]: ...
    def statvfs(self, path: str) -> dict: ...


class PrivilegedIO:
    """ImageIO through the privileged daemon (or in-process, in ``direct`` mode)."""

    def __init__(self) -> None:
        from remotefs_aa.privsep import files, qemu

        self.files = files
        self.qemu = qemu

    def read_text(self, path: str) -> str | None:
        try:
            return self.files.read_file(path)
        except FileNotFoundError:
            return None

    def replace_text_if(
        self, path: str, data: str, expected: str | None, durable: bool = True, mode: int = 0o640
    ) -> str | None:
        return self.files.replace_file_if(path, data, expected, mode=mode, durable=durable)

    def publish_info(
        self,
        directory: str,
        base: str,
        data: str,
        generation: int,
        expected: str | None,
        mode: int = 0o640,
        durable: bool = True,
    ) -> str | None:
        return self.files.publish_info(directory, base, data, generation, expected, mode, durable)

    def unlink(self, path: str) -> bool:
        return self.files.unlink(path)

    def unlink_many(self, directory: str, names: list[str]) -> list[str]:
        # oslo.privsep's wire format returns lists as tuples (msgpack use_list=False).
        return list(self.files.unlink_many(directory, names))

    def rename(self, src: str, dst: str, exclusive: bool = False) -> None:
        self.files.rename(src, dst, exclusive)

    def list_directory(self, path: str) -> dict[str, int]:
        return self.files.list_directory(path)

    def volume_state(
        self, directory: str, base: str, default_format: str, walk: bool = True
    ) -> dict:
        return self.qemu.volume_state(directory, base, default_format, walk)

    def share_scan(self, directory: str, default_format: str) -> dict:
        return self.qemu.share_scan(directory, default_format)

    def image_chain(self, path: str, raw: list[str] | None = None) -> list[dict]:
        return self.qemu.image_chain(path, raw)

    def create(
        self,
        path: str,
        fmt: str,
        size: int | None,
        backing: str | None,
        backing_fmt: str | None,
        mode: int,
    ) -> None:
        self.qemu.qemu_img_create(path, fmt, size, backing, backing_fmt, mode)

    def truncate(self, path: str, size: int, mode: int, new: bool = False) -> None:
        self.files.truncate(path, size, mode, new)

    def fallocate(self, path: str, size: int, mode: int, new: bool = False) -> None:
        self.files.fallocate(path, size, mode, new)

    def commit(self, path: str) -> None:
        self.qemu.qemu_img_commit(path, "qcow2")

    def rebase_unsafe(self, path: str, backing: str, backing_fmt: str) -> None:
        self.qemu.qemu_img_rebase(path, backing, backing_fmt, unsafe=True)

    def resize(self, path: str, fmt: str, size: int, skip_backing: bool = False) -> None:
        self.qemu.qemu_img_resize(path, fmt, size, skip_backing)

    def convert(
        self, src: str, src_fmt: str, dst: str, dst_fmt: str, sparse: bool, mode: int
    ) -> None:
        self.qemu.qemu_img_convert(src, src_fmt, dst, dst_fmt, sparse, mode)

    def check(self, path: str, fmt: str) -> dict:
        return self.qemu.qemu_img_check(path, fmt)

    def qemu_info_chain(self, path: str, fmt: str) -> list[dict]:
        from remotefs_aa.image.qemu import ImageInfo

        infos = self.qemu.qemu_img_info(path, fmt, backing_chain=True)
        return [dataclasses.asdict(ImageInfo.from_json(i)) for i in infos]

    def statvfs(self, path: str) -> dict:
        return self.files.statvfs(path)


class _Bodies:
    """A privsep entrypoint module whose functions run here, as this process's user.

    Each step still runs fenced (``local``): refused once the operation's lease
    ran out, its child ended when the deadline passes, exactly as the daemon
    would do it.
    """

    def __init__(self, module: Any) -> None:
        self._module = module

    def __getattr__(self, name: str) -> Any:
        func = getattr(self._module, name)
        return getattr(func, "local", getattr(func, "__wrapped__", func))


class InProcessIO(PrivilegedIO):
    """ImageIO without the root daemon: the same checked code, as the service's user.

    For ``nas_secure_file_operations``: volume files on such a share belong to
    the service, so nothing needs root. Paths are still confined to
    ``[privileged] allowed_paths``.
    """

    def __init__(self, conf: Any) -> None:
        super().__init__()
        from remotefs_aa import privsep

        # The bodies read their limits (allowed_paths ...) from here.
        privsep.use(conf)
        self.files = _Bodies(self.files)
        self.qemu = _Bodies(self.qemu)


@dataclasses.dataclass
class ChainState:
    """One read of a ``.info`` file (or the implied state when there is none)."""

    active: str
    snapshots: dict[str, str]
    generation: int
    format: str
    intent: dict | None = None
    #: The file's exact text as read; None when the file does not exist.
    raw: str | None = None
    #: Set by delete_snapshot when the snapshot was not there (nothing changed),
    #: so callers can say so; never written to the file.
    not_found: bool = False

    def render(self) -> str:
        """The JSON text, Cinder's keys first, with the next generation."""
        body: dict[str, Any] = {"active": self.active}
        body.update(sorted(self.snapshots.items()))
        body["generation"] = self.generation
        body["format"] = self.format
        if self.intent:
            body["intent"] = self.intent
        return json.dumps(body, indent=1) + "\n"


@dataclasses.dataclass(frozen=True)
class Link:
    """One file of a trusted chain."""

    name: str
    format: str
    virtual_size: int
    backing: str | None


def parse_info(path: str, text: str, default_format: str) -> ChainState:
    """Validate and parse a ``.info`` file's text; InvalidInfoFile on anything odd."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise exception.InvalidInfoFile(path, f"not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise exception.InvalidInfoFile(path, "not a JSON object")
    active = data.get("active")
    if not isinstance(active, str) or not active:
        raise exception.InvalidInfoFile(path, "no 'active' file name")
    generation = data.get("generation", 0)
    if isinstance(generation, bool) or not isinstance(generation, int) or generation < 0:
        raise exception.InvalidInfoFile(path, f"generation {generation!r} is not a count")
    fmt = data.get("format", default_format)
    if fmt not in FORMATS:
        raise exception.InvalidInfoFile(path, f"format {fmt!r} is not raw or qcow2")
    intent = data.get("intent")
    if intent is not None and (not isinstance(intent, dict) or "op" not in intent):
        raise exception.InvalidInfoFile(path, f"intent {intent!r} is not an operation record")
    snapshots = {}
    for key, value in data.items():
        if key in _RESERVED:
            continue
        if not isinstance(value, str) or not value:
            raise exception.InvalidInfoFile(path, f"snapshot {key!r} maps to {value!r}")
        snapshots[key] = value
    return ChainState(active, snapshots, generation, fmt, intent, text)


ID_RULE = (
    "1 to 128 letters, digits, '-' and '_', starting with a letter or digit "
    "(Cinder's UUIDs fit); no '.', '/' or spaces"
)


def check_volume_id(volume_id: object) -> str:
    """A volume id that can name files (``volume-<id>``); InvalidVolume otherwise.

    Checked before anything is made or locked: an id like ``../x`` would
    name another volume's file, and ``abc.def`` would look like a snapshot
    of volume ``abc``.
    """
    if not images.is_id(volume_id):
        raise exception.InvalidVolume(f"volume id {volume_id!r} cannot name a file: use {ID_RULE}")
    return volume_id  # type: ignore[return-value]


class Chain:
    """The chain of one volume in one directory; call its methods under the volume's lock."""

    def __init__(
        self,
        io: ImageIO,
        directory: str,
        volume_id: str,
        size_gib: int,
        default_format: str = "raw",
        mode: int = 0o660,
    ) -> None:
        check_volume_id(volume_id)
        self.io = io
        #: Mode of every image file of the volume (base, overlays, clones, the
        #: file a revert makes); the .info file gets it without "other" bits.
        self.mode = mode
        self.info_mode = mode & 0o660
        self.directory = directory
        self.volume_id = volume_id
        self.size_bytes = int(size_gib) * GiB
        self.default_format = default_format
        self.base = f"volume-{volume_id}"
        self.info_path = self.path(self.base + ".info")
        self.tmp_name = f".{self.base}.tmp"
        #: The .info file is renamed to this when deletion starts (the intent).
        self.deleting_path = self.path(f".{self.base}.deleting")
        self._seen: tuple[ChainState, dict[str, int], list[dict] | None] | None = None

    def __repr__(self) -> str:
        return f"Chain({self.base} in {self.directory})"

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def _own(self, name: object) -> bool:
        """The base or one of its overlays (``volume-<id>.<snapshot id>``), by exact grammar."""
        return images.backing_allowed(self.volume_id, name)

    def overlay_name(self, snapshot_id: str) -> str:
        if not images.is_id(snapshot_id) or snapshot_id in _RESERVED:
            raise exception.InvalidSnapshot(
                f"snapshot id {snapshot_id!r} cannot name a file: use {ID_RULE}"
            )
        return f"{self.base}.{snapshot_id}"

    # -- reading -------------------------------------------------------------

    def load(self, walk: bool = True) -> ChainState:
        """Read the .info file (or imply one: only the base exists).

        One round trip for the .info text, the volume's own names looked up
        (never a listing of the share: see ``qemu.volume_state``) and
        (``walk``) the headers from the active image down; all checked here
        as usual.
        """
        seen = self.io.volume_state(self.directory, self.base, self.default_format, walk)
        text = seen["info"]
        if seen["deleting"]:
            # The deletion's marker wins over whatever .info or claims remain.
            state = ChainState(self.base, {}, 0, self.default_format, {"op": "delete_volume"})
        elif text is None:
            state = ChainState(self.base, {}, 0, self.default_format)
        else:
            state = parse_info(self.info_path, text, self.default_format)
            for name in (state.active, *state.snapshots.values()):
                if not self._own(name):
                    raise exception.InvalidInfoFile(
                        self.info_path, f"{name!r} is not a file of volume {self.volume_id}"
                    )
            for snap, name in state.snapshots.items():
                if name == self.base:
                    raise exception.InvalidInfoFile(
                        self.info_path,
                        f"snapshot {snap} names the volume's base {name!r}; a snapshot's "
                        f"file is the overlay created when it was taken",
                    )
        self._seen = (state, seen["files"], seen["chain"])
        return state

    def _found(self, state: ChainState) -> dict[str, int]:
        """The volume's names ``load`` looked up and found, if ``state`` is what it returned."""
        if self._seen and self._seen[0] is state:
            return dict(self._seen[1])
        return self.io.volume_state(self.directory, self.base, self.default_format, walk=False)[
            "files"
        ]

    def trusted_chain(
        self, state: ChainState, top: str | None = None, share_size: bool = False
    ) -> list[Link]:
        """Headers of ``top`` (default: active) down to the base, each one checked.

        The backing names must be this volume's own files, known to the .info
        file (or the base), so an overlay pointing at another volume, at
        ``/etc/shadow`` or at ``../x`` is refused before qemu-img opens it.

        No image may be larger than the size the caller gave. With
        ``share_size`` (for an operation whose result does not depend on the
        size, such as a snapshot delete) an active image larger than that is
        taken as the volume's size instead: under Active-Active the caller's
        size can lag behind an extend another host finished just before this
        one took the lock (Cinder records the new size only after the
        extending host released it). Images below the active must still fit.
        """
        top = top or state.active
        known = {self.base, state.active, *state.snapshots.values()}
        try:
            if self._seen and self._seen[0] is state and top == state.active and self._seen[2]:
                headers = self._seen[2]
            else:
                headers = self.io.image_chain(
                    self.path(top), [self.base] if state.format == "raw" else None
                )
        except FileNotFoundError:
            if state.raw is None and top == self.base:
                # No .info, no marker and no base: nothing of the volume is
                # here (deleted, by this host or another, or never created).
                raise exception.VolumeNotFound(
                    f"volume {self.volume_id} is not on share {self.directory} "
                    f"(no {self.base} and no {self.base}.info): it was deleted, or "
                    f"never created here"
                ) from None
            raise exception.InvalidImage(
                self.path(top), "the image is missing (named by the .info file)"
            ) from None
        limit = self.size_bytes
        if share_size and headers and limit and headers[0]["virtual_size"] > limit:
            limit = headers[0]["virtual_size"]
            LOG.info(
                "volume %s: its active image %s is %d bytes, larger than the %d bytes the "
                "caller gave (an extend finished meanwhile); the share's size holds",
                self.volume_id,
                top,
                limit,
                self.size_bytes,
            )
        links: list[Link] = []
        expected = top
        for header in headers:
            name = os.path.basename(header["filename"])
            if name != expected:
                raise exception.InvalidImage(self.path(expected), "the chain walk went astray")
            is_base = name == self.base
            fmt = state.format if is_base else header["format"]
            if not is_base and fmt != "qcow2":
                raise exception.InvalidImage(self.path(name), f"overlay format is {fmt!r}")
            if header.get("data_file"):
                raise exception.InvalidImage(
                    self.path(name), f"it uses an external data file {header['data_file']!r}"
                )
            if header.get("encrypted"):
                raise exception.InvalidImage(self.path(name), "it is encrypted")
            if header["virtual_size"] > limit and limit:
                raise exception.InvalidImage(
                    self.path(name),
                    f"virtual size {header['virtual_size']} exceeds the volume size {limit}",
                )
            backing = None if (is_base and fmt == "raw") else header.get("backing_file")
            if is_base and backing:
                raise exception.InvalidImage(
                    self.path(name), f"the base has a backing file {backing!r}"
                )
            if backing is not None:
                if backing not in known or not self._own(backing) or backing == name:
                    raise exception.InvalidImage(
                        self.path(name),
                        f"backing file {backing!r} is not one of volume {self.volume_id}'s "
                        f"own files",
                    )
                want_fmt = state.format if backing == self.base else "qcow2"
                if header.get("backing_format") not in (None, want_fmt):
                    raise exception.InvalidImage(
                        self.path(name),
                        f"backing format {header.get('backing_format')!r}, expected {want_fmt}",
                    )
            links.append(Link(name, fmt, header["virtual_size"], backing))
            if backing is None:
                break
            expected = backing
        else:
            raise exception.InvalidImage(
                self.path(expected), "a backing file in the chain is missing"
            )
        if links[-1].name != self.base:
            raise exception.InvalidImage(
                self.path(links[-1].name), f"the chain does not end at {self.base}"
            )
        return links

    # -- writing -------------------------------------------------------------

    def save(
        self, state: ChainState, durable: bool = True, label: str = "", **changes: Any
    ) -> ChainState:
        """Publish ``state`` with ``changes`` as the next generation; the new state.

        An atomic compare-and-swap on the share (``files.publish_info``: the
        claim of generation N+1 is created exclusively, so of all writers that
        read N exactly one wins), durable before it returns (a change reported
        as done, or an intent announcing a destructive step, survives a power
        cut). ``durable=False`` for claims only: one lost in a power cut sends
        recovery back to an earlier step, which is safe to repeat. A writer
        that lost raises StaleInfoGeneration and changes nothing more.
        """
        new = dataclasses.replace(state, **changes)
        new.snapshots = dict(new.snapshots)
        new.generation = state.generation + 1
        text = new.render()
        current = self.io.publish_info(
            self.directory, self.base, text, new.generation, state.raw, self.info_mode, durable
        )
        if current is not None:
            found: int | None = None
            try:
                found = json.loads(current).get("generation") if current else None
            except (ValueError, AttributeError):
                found = None
            raise exception.StaleInfoGeneration(self.info_path, state.generation, found)
        new.raw = text
        # One line per generation, naming what it is: the workload's history
        # credits every generation of a chain to the call that wrote it.
        LOG.debug(
            "volume %s: published generation %d (%s)",
            self.volume_id,
            new.generation,
            label or ("intent " + str(new.intent.get("op")) if new.intent else "change"),
        )
        return new

    # -- recovery ------------------------------------------------------------

    def recover(self, state: ChainState) -> ChainState:
        """Finish or roll back the change an earlier, interrupted operation recorded."""
        intent = state.intent
        if not intent:
            return state
        op = intent.get("op")
        LOG.warning(
            "volume %s: finishing interrupted %s (intent %s, generation %d)",
            self.volume_id,
            op,
            intent,
            state.generation,
        )
        handler: Callable[[ChainState, dict], ChainState] | None = {
            "delete_snapshot": self._recover_delete_snapshot,
            "revert": self._recover_revert,
            "delete_volume": self._recover_delete_volume,
        }.get(op)
        if handler is None:
            raise exception.InvalidInfoFile(self.info_path, f"unknown intent {op!r}")
        return handler(state, intent)

    def load_recovered(self) -> ChainState:
        """``load`` plus ``recover``: what every locked operation starts with.

        A temp file of the next generation's ``.info`` is a publisher's that
        died before its claim (a live one would hold the lock we hold, or be
        fenced: it links its claim from its descriptor, so removing the name
        makes it lose); it would make this operation's publish lose, so it goes.
        """
        state = self.load()
        tmp = info_tmp_name(self.base, state.generation + 1)
        if tmp in self._found(state):
            LOG.warning(
                "volume %s: removing %s left by an interrupted publish", self.volume_id, tmp
            )
            self.io.unlink(self.path(tmp))
        return self.recover(state)

    def _recover_delete_snapshot(self, state: ChainState, intent: dict) -> ChainState:
        return self._finish_delete_snapshot(state, intent, recovering=True)

    def _recover_revert(self, state: ChainState, intent: dict) -> ChainState:
        self.io.unlink(self.path(intent["tmp"]))
        return self._finish_revert(state, intent)

    def _recover_delete_volume(self, state: ChainState, intent: dict) -> ChainState:
        if state.raw is not None:
            # Interrupted between its claim and its marker: take that step
            # now, so the .info file goes last, as the marker, like any
            # other finished deletion's.
            self.io.rename(self.info_path, self.deleting_path)
        # The .info file is the marker now: its text names the files to remove.
        text = self.io.read_text(self.deleting_path)
        try:
            marked = parse_info(self.deleting_path, text or "", self.default_format)
        except exception.InvalidInfoFile:
            marked = state  # names the base and the bookkeeping; the share sweep the rest
        self._delete_files(marked)
        raise exception.VolumeNotFound(
            f"volume {self.volume_id} was being deleted by an interrupted operation; "
            f"the deletion is now finished"
        )

    def _checked_name(self, name: str) -> str:
        if not isinstance(name, str) or not self._own(name):
            raise exception.InvalidInfoFile(self.info_path, f"intent names {name!r}")
        return name

    # -- operations (caller holds the volume's lock) -------------------------

    def create_base(self, fmt: str, provisioning: str) -> ChainState:
        """A new volume file: raw sparse, raw thick (fallocate) or qcow2."""
        if fmt not in FORMATS:
            raise exception.InvalidImage(self.path(self.base), f"format {fmt!r}")
        tmp = self.path(self.tmp_name)

        def make() -> None:
            if fmt == "qcow2":
                self.io.create(tmp, "qcow2", self.size_bytes, None, None, self.mode)
            elif provisioning == "thick":
                self.io.fallocate(tmp, self.size_bytes, self.mode, new=True)
            else:
                self.io.truncate(tmp, self.size_bytes, self.mode, new=True)

        try:
            self._make_tmp(make)
            return self._publish_tmp(fmt)
        except BaseException:
            self.io.unlink(tmp)
            raise

    def create_from(
        self, src: str, src_fmt: str, src_size: int, fmt: str, sparse: bool
    ) -> ChainState:
        """A new volume as a flat copy of ``src`` (a checked image of another chain)."""
        tmp = self.path(self.tmp_name)
        try:
            self._make_tmp(lambda: self.io.convert(src, src_fmt, tmp, fmt, sparse, self.mode))
            if src_size < self.size_bytes:
                self._grow(tmp, fmt, not sparse)
            return self._publish_tmp(fmt)
        except BaseException:
            self.io.unlink(tmp)
            raise

    def replace_base(self, src: str, src_fmt: str, src_size: int, sparse: bool) -> ChainState:
        """The base's content replaced by a flat copy of ``src`` (copy_image_to_volume).

        Only while the volume has no snapshot: an overlay would sit on data
        that changed under it. Steps: convert into the hidden temp file, grow
        it to the volume's size, rename it over the base, write the .info
        file (a new generation: fences a writer whose lock lapsed). A crash
        leaves the temp file, which the next import, create or delete of the
        volume removes; the base is either the old one or the new one.
        """
        state = self.load_recovered()
        if state.snapshots or state.active != self.base:
            raise exception.VolumeBusy(
                f"volume {self.volume_id} has snapshots; an image can only be copied "
                f"into a volume without any (delete them first). Nothing was changed."
            )
        tmp = self.path(self.tmp_name)
        try:
            self._make_tmp(
                lambda: self.io.convert(src, src_fmt, tmp, state.format, sparse, self.mode)
            )
            if src_size < self.size_bytes:
                self._grow(tmp, state.format, not sparse)
            # Claimed before the base is replaced: a holder whose lock lapsed
            # stops here with the old base intact (and its temp file removed).
            state = self.save(state, durable=False, label="image")
            self.io.rename(tmp, self.path(self.base))
        except BaseException:
            self.io.unlink(tmp)
            raise
        return state

    def _make_tmp(self, make: Callable[[], None]) -> None:
        """Make the hidden temp file exclusively; a leftover of a crashed create is replaced.

        The daemon creates it with O_EXCL, so no listing is needed to find a
        leftover: under this volume's lock, an existing temp file is a dead
        create's (the periodic sweep would remove it too).
        """
        try:
            make()
        except FileExistsError:
            LOG.warning(
                "volume %s: removing %s left by an interrupted create",
                self.volume_id,
                self.tmp_name,
            )
            self.io.unlink(self.path(self.tmp_name))
            make()

    def _publish_tmp(self, fmt: str) -> ChainState:
        """Rename the temp file to the base, never over one; then the first ``.info``.

        Both steps are exclusive (a rename that does not replace, a publish
        that expects no ``.info`` and no deletion marker), which is how a new
        id is checked: by the steps themselves, not by a listing of the share.
        """
        try:
            self.io.rename(self.path(self.tmp_name), self.path(self.base), exclusive=True)
        except FileExistsError:
            raise exception.VolumeExists(
                f"volume {self.volume_id} already has files in {self.directory}; "
                f"nothing was overwritten (delete it first)"
            ) from None
        try:
            return self.save(ChainState(self.base, {}, 0, fmt), label="create")
        except exception.StaleInfoGeneration:
            self.io.unlink(self.path(self.base))  # ours: the rename above made it
            raise exception.VolumeExists(
                f"volume {self.volume_id} already has an .info file (or is being deleted) "
                f"in {self.directory}; nothing was overwritten (delete it first)"
            ) from None

    def _grow(self, path: str, fmt: str, thick: bool, skip_backing: bool = False) -> None:
        if fmt == "qcow2":
            self.io.resize(path, "qcow2", self.size_bytes, skip_backing)
        elif thick:
            self.io.fallocate(path, self.size_bytes, self.mode)
        else:
            self.io.truncate(path, self.size_bytes, self.mode)

    def create_snapshot(self, snapshot_id: str) -> ChainState:
        state = self.load_recovered()
        new = self.overlay_name(snapshot_id)
        if snapshot_id in state.snapshots:
            raise exception.InvalidSnapshot(
                f"snapshot {snapshot_id} of volume {self.volume_id} already exists"
            )
        # No intent record: until the .info write below, the new overlay is a
        # file nothing refers to. A crash leaves it as an orphan, which the
        # periodic share sweep removes (``sweep_orphans``).
        top = self.trusted_chain(state)[0]

        def make() -> None:
            self.io.create(
                self.path(new), "qcow2", self.size_bytes, top.name, top.format, self.mode
            )

        try:
            make()
        except FileExistsError:
            # An orphan of this very snapshot id (a create that died or whose
            # lock lapsed). Claimed first, so its creator's publish is refused.
            state = self.save(state, durable=False, label=f"claim orphan {snapshot_id}")
            self.io.unlink(self.path(new))
            make()
        snapshots = {**state.snapshots, snapshot_id: new}
        return self.save(state, label=f"snapshot {snapshot_id}", active=new, snapshots=snapshots)

    def sweep_orphans(self, candidates: list[str]) -> list[str]:
        """Remove those of ``candidates`` that are overlays the .info file does not name.

        For the periodic share sweep, which found them in its one directory
        read; call under the volume's lock. They are what an interrupted
        snapshot create leaves. The removal is claimed first (a new
        generation), so a holder whose lock lapsed while it created one of
        them is refused at its own publish instead of publishing a chain that
        names a missing file. A volume with an intent pending is left to its
        next operation, which finishes that first. Returns the names removed.
        """
        state = self.load(walk=False)
        if state.intent or state.raw is None:
            return []
        named = {self.base, state.active, *state.snapshots.values()}
        orphans = [n for n in candidates if self._own(n) and n not in named]
        if not orphans:
            return []
        self.save(state, durable=False, label="claim sweep of orphans")
        removed = self.io.unlink_many(self.directory, orphans)
        for name in removed:
            LOG.warning(
                "volume %s: removed orphan %s (an interrupted snapshot create)",
                self.volume_id,
                name,
            )
        return removed

    def snapshot_image(self, state: ChainState, snapshot_id: str) -> Link:
        """The image holding ``snapshot_id``'s data: the backing of its overlay."""
        overlay = self._snapshot_file(state, snapshot_id)
        links = self.trusted_chain(state)
        names = [link.name for link in links]
        if overlay not in names:
            raise exception.InvalidInfoFile(
                self.info_path, f"snapshot {snapshot_id}'s file {overlay} is not in the chain"
            )
        return links[names.index(overlay) + 1]

    def _snapshot_file(self, state: ChainState, snapshot_id: str) -> str:
        try:
            return state.snapshots[snapshot_id]
        except KeyError:
            raise exception.SnapshotNotFound(
                f"snapshot {snapshot_id} is not in {self.info_path}"
            ) from None

    def delete_snapshot(self, snapshot_id: str) -> ChainState:
        state = self.load_recovered()
        if snapshot_id not in state.snapshots:
            # Deleting what is gone succeeds, as in Cinder.
            LOG.info("snapshot %s of volume %s: already gone", snapshot_id, self.volume_id)
            return dataclasses.replace(state, not_found=True)
        target = state.snapshots[snapshot_id]
        links = self.trusted_chain(state, share_size=True)
        names = [link.name for link in links]
        if target not in names:
            raise exception.InvalidInfoFile(
                self.info_path, f"snapshot {snapshot_id}'s file {target} is not in the chain"
            )
        i = names.index(target)
        base = links[i + 1]
        higher = links[i - 1].name if i > 0 else None
        intent = {
            "op": "delete_snapshot",
            "snapshot": snapshot_id,
            "file": target,
            "base": base.name,
            "base_format": base.format,
            "higher": higher,
        }
        state = self.save(state, label=f"intent delete_snapshot {snapshot_id}", intent=intent)
        return self._finish_delete_snapshot(state, intent)

    def _finish_delete_snapshot(
        self, state: ChainState, intent: dict, recovering: bool = False
    ) -> ChainState:
        target = self._checked_name(intent["file"])
        base = self._checked_name(intent["base"])
        higher = intent.get("higher")
        higher = self._checked_name(higher) if higher else None
        present, needed = True, True
        if recovering:
            # Which steps ran before the crash? F gone: all but the .info
            # write. H already on B: commit and rebase are done.
            present = target in self._found(state)
            if present and higher:
                needed = self.io.image_chain(self.path(higher))[0].get("backing_file") == target
        if present:
            if needed:
                state = self._claim(state, intent, "commit")
                self.io.commit(self.path(target))
                if higher:
                    state = self._claim(state, intent, "rebase")
                    self.io.rebase_unsafe(self.path(higher), base, intent["base_format"])
            state = self._claim(state, intent, "unlink")
            self.io.unlink(self.path(target))
        snapshots = {k: v for k, v in state.snapshots.items() if k != intent["snapshot"]}
        active = base if state.active == target else state.active
        return self.save(
            state,
            label=f"delete {intent['snapshot']}",
            active=active,
            snapshots=snapshots,
            intent=None,
        )

    def _claim(self, state: ChainState, intent: dict, step: str) -> ChainState:
        """Claim the next destructive step through the compare-and-swap, then do it.

        A holder whose lock lapsed meanwhile finds a newer generation and stops
        here (StaleInfoGeneration) before it touches any data; the intent names
        the step, so a crash right after the claim is finished by the next
        holder from that step on.
        """
        return self.save(
            state,
            durable=False,
            label=f"claim {step} of {intent['op']} {intent.get('snapshot', '')}".rstrip(),
            intent={**intent, "step": step},
        )

    def revert(self, snapshot_id: str) -> ChainState:
        state = self.load_recovered()
        overlay = self._snapshot_file(state, snapshot_id)
        if overlay != state.active:
            latest = next((s for s, f in state.snapshots.items() if f == state.active), None)
            raise exception.InvalidSnapshot(
                f"volume {self.volume_id} can only be reverted to its latest snapshot "
                f"(as in Cinder), {latest}; {snapshot_id} is older. Delete newer snapshots first."
            )
        links = self.trusted_chain(state)
        intent = {
            "op": "revert",
            "snapshot": snapshot_id,
            "file": overlay,
            "backing": links[1].name,
            "backing_format": links[1].format,
            "tmp": f".{overlay}.revert",
            # The holder that finishes an interrupted revert may have been
            # handed an older size: the new overlay keeps the one checked here.
            "size": self.size_bytes,
        }
        state = self.save(state, label=f"intent revert {snapshot_id}", intent=intent)
        return self._finish_revert(state, intent)

    def _finish_revert(self, state: ChainState, intent: dict) -> ChainState:
        overlay = self._checked_name(intent["file"])
        tmp = self.path(f".{overlay}.revert")
        backing = self._checked_name(intent["backing"])
        size = intent.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            size = self.size_bytes  # an intent written before the size was recorded
        self.io.create(tmp, "qcow2", size, backing, intent["backing_format"], self.mode)
        state = self._claim(state, intent, "rename")
        self.io.rename(tmp, self.path(overlay))
        return self.save(state, label=f"revert {intent['snapshot']}", intent=None)

    def extend(self, new_size_gib: int, thick: bool = False) -> ChainState:
        state = self.load_recovered()
        new_size = int(new_size_gib) * GiB
        self.size_bytes = max(self.size_bytes, new_size)
        links = self.trusted_chain(state)
        top = links[0]
        if new_size < top.virtual_size:
            raise exception.VolumeError(
                f"volume {self.volume_id} is {top.virtual_size} bytes; cannot shrink to {new_size}"
            )
        # qemu-img opens the backing chain only to see whether the backing
        # file is longer than the top (then the new area must be zeroed, or
        # the backing file's data would show through). The checked headers
        # already say; when it is not, the chain is left closed.
        skip = len(links) > 1 and links[1].virtual_size <= top.virtual_size
        # The claim (a new generation, nothing else changed) fences a holder
        # whose lock lapsed; a crash after it changes nothing to recover.
        state = self.save(state, durable=False, label="claim extend")
        self._grow(self.path(top.name), top.format, thick, skip_backing=skip)
        return state

    def delete_volume(self) -> None:
        """Remove every file of the volume, then the .info file; missing files are fine."""
        state = self.load(walk=False)  # InvalidInfoFile: never delete what we cannot read
        if state.raw is not None and not state.intent:
            # Claimed through the compare-and-swap first (a holder whose lock
            # lapsed stops here); then the marker: once .info is renamed away,
            # every reader sees a volume being deleted.
            # Not durable: if a power cut loses it, the deletion either happened
            # (its marker says so) or not.
            state = self.save(
                state, durable=False, label="claim delete_volume", intent={"op": "delete_volume"}
            )
        if state.raw is not None:
            self.io.rename(self.info_path, self.deleting_path)
        self._delete_files(state)

    def _delete_files(self, state: ChainState) -> None:
        """Every file of the volume, by name, top of the chain first, the marker last.

        Named, not listed: the images the .info file names, the files its
        intent names, the hidden temp files of a create and of the next
        publish, and the generation claims the compare-and-swap keeps. What
        only a listing could find (an orphan overlay of a crashed snapshot
        create, a claim a crashed publish failed to prune) is the periodic
        share sweep's. Missing names are skipped by the daemon.
        """
        marker = os.path.basename(self.deleting_path)
        names = [state.active, *sorted(state.snapshots.values(), reverse=True)]
        if state.intent:
            names += [
                v
                for k, v in state.intent.items()
                if k in ("file", "higher", "tmp") and isinstance(v, str)
            ]
        names += [
            self.tmp_name,
            self.base + ".info",
            info_tmp_name(self.base, state.generation + 1),
        ]
        first = max(1, state.generation - KEEP_CLAIMS + 1)
        names += [claim_name(self.base, g) for g in range(first, state.generation + 2)]
        order: list[str] = []
        for name in [*names, self.base, marker]:
            if name not in order and (
                name == marker or self._own(name) or name.startswith(f".{self.base}.")
            ):
                order.append(name)
        self.io.unlink_many(self.directory, order)

    # -- verification (tests, demo, operators) -------------------------------

    def verify(self, deep: bool = True) -> dict:
        """Check the chain end to end; a report, with ``problems`` empty when intact.

        .info parses with no intent pending, every file it names exists and
        forms one trusted chain, no file of this volume lies outside the
        chain, and (``deep``) ``qemu-img check`` passes on every qcow2 link.
        """
        problems: list[str] = []
        report: dict[str, Any] = {"volume_id": self.volume_id, "problems": problems}
        try:
            state = self.load()
        except exception.VolumeError as exc:
            problems.append(str(exc))
            return report
        report["generation"] = state.generation
        report["snapshots"] = dict(state.snapshots)
        if state.intent:
            problems.append(f"intent pending: {state.intent}")
        try:
            links = self.trusted_chain(state)
        except exception.VolumeError as exc:
            problems.append(str(exc))
            return report
        report["chain"] = [link.name for link in links]
        chain_names = set(report["chain"])
        for snap, name in state.snapshots.items():
            if name not in chain_names:
                problems.append(f"snapshot {snap}: {name} is not in the chain")
        # A listing here: verification looks for what no name leads to.
        files = self.io.list_directory(self.directory)
        claims = re.compile(rf"^\.{re.escape(self.base)}\.gen\.[0-9]+\Z")
        for name in files:
            if claims.match(name):
                continue  # the compare-and-swap's generation claims (a bounded few)
            if (self._own(name) or name.startswith(f".{self.base}.")) and (name not in chain_names):
                problems.append(f"orphan file {name}")
        if deep:
            for link in links:
                if link.format == "qcow2":
                    result = self.io.check(self.path(link.name), "qcow2")
                    if result.get("exit_code") or result.get("corruptions"):
                        problems.append(f"qemu-img check {link.name}: {result}")
            # qemu-img is the authority: its view of the chain must match ours.
            theirs = self.io.qemu_info_chain(self.path(links[0].name), links[0].format)
            ours = [(link.name, link.virtual_size, link.backing) for link in links]
            seen = [
                (os.path.basename(i["filename"]), i["virtual_size"], i["backing_file"])
                for i in theirs
            ]
            if seen != ours:
                problems.append(f"qemu-img sees the chain as {seen}, the headers as {ours}")
        return report
