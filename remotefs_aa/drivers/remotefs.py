"""The base RemoteFS driver: volumes as files on shares, snapshots as qcow2 overlays.

Subclasses say what a share is and how it becomes a local directory (the local
driver: it already is one; NFS and GlusterFS: a mount through the privileged
daemon). Everything else is here, once:

* every chain change goes through :mod:`remotefs_aa.image.chain` (fenced,
  atomic .info writes; recorded intents; checked headers);
* every operation takes its locks through ``coordination.synchronized``, by
  the lock map of doc/architecture.md: the volume for create / delete /
  extend / revert and for its snapshots; source and new volume for clones and
  for volumes made from a snapshot. A lock names the chain by the id in its
  file names (``name_id``: Cinder's ``id`` unless the volume was migrated),
  so every operation on one set of files takes the same lock;
* files are named as Cinder names them: ``volume.name`` (``volume-<name_id>``)
  for the base, ``<volume.name>.<snapshot.id>`` for overlays;
* every privileged step goes through ``remotefs_aa.privsep``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import threading
import time
from typing import Any

from oslo_config import cfg

from remotefs_aa import coordination, exception, opts
from remotefs_aa.coordination import synchronized
from remotefs_aa.drivers import presence
from remotefs_aa.drivers.base import ModelUpdate, VolumeDriver
from remotefs_aa.image.chain import Chain, GiB, ImageIO, PrivilegedIO, parse_info
from remotefs_aa.image.qemu import ImageInfo
from remotefs_aa.objects import Volume

LOG = logging.getLogger(__name__)

VERSION = VolumeDriver.VERSION
_LEFTOVER = re.compile(
    r"^\.volume-(?P<vol>[A-Za-z0-9][A-Za-z0-9_-]{0,127})\.(?:tmp|info\.tmp-[0-9a-f]+)\Z"
)


class RemoteFSDriver(VolumeDriver):
    """Shared logic of every file-based driver; subclasses provide the shares."""

    #: The entry-point name; also the connection type, the protocol in stats
    #: and the prefix of the driver's options (``<name>_sparsed_volumes``, ...,
    #: Cinder-style).
    driver_name = "remotefs"

    @property
    def driver_volume_type(self) -> str:  # type: ignore[override]
        return self.driver_name

    @property
    def storage_protocol(self) -> str:
        return self.driver_name

    #: The config section of the driver's options: [DEFAULT] standalone, the
    #: backend's own section under Cinder.
    option_section = "DEFAULT"

    def option(self, name: str) -> Any:
        """The driver's own option ``<driver_name>_<name>``."""
        return self.conf[f"{self.driver_name}_{name}"]

    def where(self, name: str) -> str:
        """Option ``name`` as an operator finds it: ``[section] name``."""
        return f"[{self.option_section}] {name}"

    def __init__(
        self, conf: cfg.ConfigOpts, host: str | None = None, io: ImageIO | None = None
    ) -> None:
        super().__init__(conf, host)
        self.io: ImageIO = io or PrivilegedIO()
        self._shares: list[str] = []
        self._provisioned: dict[str, dict[str, int]] = {}
        self._scanned_at: dict[str, float] = {}
        self._stats_lock = threading.Lock()
        self._daemon_paths: list[str] | None = None
        self._presence: presence.Presence | None = None
        #: Per share, leftovers of interrupted work the last sweep had to keep.
        self._leftovers: dict[str, list[str]] = {}

    # -- what subclasses provide ---------------------------------------------

    def load_shares(self) -> list[str]:
        """The configured shares, validated; raise InvalidConfig naming a bad one."""
        raise NotImplementedError

    def ensure_share_ready(self, share: str) -> None:
        """Make ``share`` usable here (mount it, create it)."""
        raise NotImplementedError

    def share_path(self, share: str) -> str:
        """The local directory holding ``share``'s files."""
        raise NotImplementedError

    def share_options(self, share: str) -> str | None:
        """Mount options reported in connection info."""
        return None

    # -- set-up --------------------------------------------------------------

    @property
    def volume_format(self) -> str:
        return "qcow2" if self.option("qcow2_volumes") else "raw"

    @property
    def thick(self) -> bool:
        return not self.option("sparsed_volumes") and self.volume_format == "raw"

    @property
    def shares(self) -> list[str]:
        return list(self._shares)

    def do_setup(self, context: Any = None) -> None:
        self._shares = self.load_shares()
        if not self._shares:
            raise exception.InvalidConfig(self.driver_name + " shares", [], "no share configured")
        for share in self._shares:
            # Checked before the share is created or mounted, so the refusal is
            # this configuration error, not the daemon refusing a directory (the
            # same mistake gives the same exit code whether the directory exists).
            self._check_share_allowed(share)
            self.ensure_share_ready(share)
        self._presence = presence.Presence(self.host, self.io)
        try:
            for share in self._shares:
                self._presence.join(share, self.share_path(share))
                # One read of the share: the provisioned figures to count
                # from, and the leftovers of interrupted work swept.
                self._leftovers[share] = self.sweep_leftovers(share, self._rescan(share))["kept"]
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Leave the shares: this service's records there and its presence lock."""
        if self._presence is not None:
            self._presence.leave()
            self._presence = None

    def sweep_leftovers(self, share: str, scan: dict | None = None) -> dict[str, list[str]]:
        """Remove what interrupted work left on ``share``, from one read of the share.

        ``.volume-<id>.tmp`` (a create, clone, or image copy that died),
        ``.volume-<id>.info.tmp-*`` (an ``.info`` publish that died before its
        claim), overlays the volume's ``.info`` does not name (a snapshot
        create that died: removed by ``Chain.sweep_orphans``, which publishes
        a generation first so a holder whose lock lapsed is refused), and the
        files of a volume that has neither base nor ``.info`` nor deletion
        marker left (what only a listing finds after a deletion: an orphan
        overlay, a claim a crashed publish did not prune). Operations read
        only their own volume's names, so this sweep is where a listing
        happens: ``scan`` (``share_scan``; read here if not given). Each
        volume is handled under its lock, taken without waiting: a volume
        that is busy may be another host's work in progress and is kept. A
        revert's ``.volume-<id>.<snap>.revert`` is the next operation's to
        finish (its intent says so) and is left to it. Returns ``{"removed":
        [...], "kept": [...]}``.
        """
        path = self.share_path(share)
        scan = scan if scan is not None else self.io.share_scan(path, self.volume_format)
        result: dict[str, list[str]] = {"removed": [], "kept": []}
        for vid, seen in sorted(scan["volumes"].items()):
            leftovers = [n for n in seen["files"] if _LEFTOVER.match(n)]
            gone = not (seen["base"] or seen["info"] is not None or seen["deleting"])
            orphans = self._orphans(vid, seen) if not gone else []
            if gone:
                leftovers = [n for n in seen["files"] if not n.endswith(".revert")]
            if not (leftovers or orphans):
                continue
            try:
                with coordination.locked(vid, blocking=False, purpose=f"sweep of {share}"):
                    removed = self.io.unlink_many(path, leftovers) if leftovers else []
                    if orphans:
                        chain = Chain(
                            self.io, path, vid, 0, self.volume_format, self.file_mode(share)
                        )
                        removed += chain.sweep_orphans(orphans)
            except exception.LockBusy:
                result["kept"] += [*leftovers, *orphans]
                continue
            except exception.VolumeError as exc:
                LOG.warning("volume %s on %s: leftovers kept: %s", vid, share, exc)
                result["kept"] += [*leftovers, *orphans]
                continue
            for name in removed:
                LOG.warning(
                    "volume %s: removed %s on %s, left by an interrupted operation",
                    vid,
                    name,
                    share,
                )
            result["removed"] += removed
        return result

    @staticmethod
    def _orphans(volume_id: str, seen: dict) -> list[str]:
        """Overlays of the volume (as the scan saw it) that its ``.info`` does not name."""
        if seen["info"] is None or seen["deleting"]:
            return []
        try:
            data = json.loads(seen["info"])
            named = {v for v in data.values() if isinstance(v, str)}
        except (ValueError, AttributeError):
            return []  # never delete what we cannot read
        if data.get("intent"):
            return []  # the next operation on the volume finishes that first
        base = f"volume-{volume_id}"
        return [
            n
            for n in seen["files"]
            if n.startswith(base + ".") and n != base + ".info" and n not in named
        ]

    def check_for_setup_error(self) -> None:
        for share in self._shares:
            self.io.list_directory(self._check_share_allowed(share))

    def _check_share_allowed(self, share: str) -> str:
        """The share's real path; InvalidConfig if it lies outside ``allowed_paths``."""
        path = os.path.realpath(self.share_path(share))
        if not self.daemon_may_act_in(path):
            raise exception.InvalidConfig(
                "[privileged] allowed_paths",
                self.allowed_paths_text(),
                f"share {share} ({path}) lies outside it; the privileged daemon "
                f"would refuse every file operation there. Add its directory",
            )
        return path

    # -- helpers -------------------------------------------------------------

    def daemon_may_act_in(self, directory: str) -> bool:
        """Whether files in ``directory`` lie under ``[privileged] allowed_paths``.

        The privileged daemon refuses every path outside them, so a share,
        mount base or conversion directory elsewhere is a configuration error
        to report at once, not a refusal on the first operation. Both lists
        count: the service's, and the one the daemon read as root from the
        same config files, which can differ (under Cinder, an unset
        ``state_path`` is Cinder's default in the service but ours in the
        daemon, which does not know Cinder's options).
        """
        real = os.path.realpath(directory)
        return all(
            any(
                real == base or real.startswith(base.rstrip("/") + "/")
                for base in (os.path.realpath(p) for p in paths if p)
            )
            for paths in (self.conf.privileged.allowed_paths, self.daemon_allowed_paths())
        )

    def daemon_allowed_paths(self) -> list[str]:
        """``[privileged] allowed_paths`` as the privileged daemon enforces it (asked once)."""
        if self._daemon_paths is None:
            files = getattr(self.io, "files", None)
            info = files.daemon_info() if files is not None else {}
            self._daemon_paths = list(
                info.get("allowed_paths") or self.conf.privileged.allowed_paths
            )
        return self._daemon_paths

    def allowed_paths_text(self) -> str:
        """``allowed_paths`` for an error message, with the daemon's if it differs."""
        ours = [p for p in self.conf.privileged.allowed_paths if p]
        theirs = self.daemon_allowed_paths()
        if [os.path.realpath(p) for p in ours] == [os.path.realpath(p) for p in theirs]:
            return str(ours)
        return (
            f"{ours} here, {theirs} in the privileged daemon (which reads the same "
            f"config files as root, without the caller's defaults: set state_path or "
            f"[privileged] allowed_paths there explicitly)"
        )

    @staticmethod
    def chain_id(volume: Any) -> str:
        """The id in ``volume``'s file names, from ``volume.name`` as Cinder names files.

        Cinder's ``volume.name`` is ``volume_name_template % name_id``; after a
        migration ``name_id`` is not ``id``. The privileged daemon accepts only
        ``volume-<id>[.<snapshot id>]`` names, so any other template is refused.
        """
        name = getattr(volume, "name", None) or f"volume-{volume.id}"
        if not isinstance(name, str) or not name.startswith("volume-"):
            raise exception.InvalidVolume(
                f"volume {volume.id} is named {name!r}; remotefs_aa names files "
                f"volume-<id> (Cinder's default volume_name_template 'volume-%s'), "
                f"which its privileged daemon checks"
            )
        return name[len("volume-") :]

    def _share_of(self, volume: Any) -> str:
        share = getattr(volume, "provider_location", None)
        if not share:
            raise exception.VolumeNotFound(
                f"volume {volume.id} has no provider_location: it was never created on a share"
            )
        return share

    def chain(self, volume: Any, share: str | None = None) -> Chain:
        """The snapshot chain of ``volume`` (on its share, or on ``share``)."""
        share = share or self._share_of(volume)
        return Chain(
            self.io_for(share),
            self.share_path(share),
            self.chain_id(volume),
            volume.size,
            self.volume_format,
            self.file_mode(share),
        )

    def io_for(self, share: str) -> ImageIO:
        """How file operations on ``share`` run (the privileged daemon by default)."""
        return self.io

    def file_mode(self, share: str) -> int:
        """Mode of every file a volume gets on ``share`` (its .info file: without "other").

        0660: the service's user and group (a compute host's qemu in that
        group) read and write; nobody else. The mounted drivers follow
        Cinder's ``nas_secure_file_permissions``.
        """
        return 0o660

    def local_path(self, volume: Any) -> str:
        """The volume's base file, as Cinder's ``local_path``."""
        return os.path.join(self.share_path(self._share_of(volume)), volume.name)

    # -- volumes -------------------------------------------------------------

    @synchronized("{volume.name_id}")
    def create_volume(self, volume: Any) -> ModelUpdate:
        share = self.choose_share(volume)
        started = time.monotonic()
        chain = self.chain(volume, share)
        chain.create_base(self.volume_format, "thick" if self.thick else "thin")
        self._account(share, chain.volume_id, volume.size * GiB)
        LOG.info(
            "volume %s: created on %s (%s%s, %d GiB) in %.0f ms",
            volume.id,
            share,
            self.volume_format,
            ", thick" if self.thick else "",
            volume.size,
            (time.monotonic() - started) * 1000,
        )
        return {"provider_location": share}

    @synchronized("{volume.name_id}")
    def delete_volume(self, volume: Any) -> None:
        """Remove every file of the volume; a volume never (fully) created is fine.

        Without ``provider_location`` (a create that failed or whose service
        died before it returned) the shares are searched for the volume's own
        files, such as a half-written temp file, so nothing is left behind.
        """
        share = getattr(volume, "provider_location", None)
        shares = [share] if share else self._shares_holding(volume)
        if not shares:
            LOG.info("volume %s: no file on any share, nothing to delete", volume.id)
            return
        for found in shares:
            chain = self.chain(volume, found)
            chain.delete_volume()
            self._account(found, chain.volume_id, None)
            LOG.info("volume %s: deleted from %s", volume.id, found)

    def _shares_holding(self, volume: Any) -> list[str]:
        """The shares holding a file of ``volume``'s chain (its base, .info or leftovers)."""
        base = f"volume-{self.chain_id(volume)}"
        found = []
        for share in self._shares:
            names = self.io.list_directory(self.share_path(share))
            if any(n == base or n.startswith((base + ".", f".{base}.")) for n in names):
                found.append(share)
        return found

    def choose_share(self, volume: Any) -> str:
        """The share for a new volume: the scheduler's pool if it names one, else by room.

        Cinder's scheduler picks a pool (``volume.host`` = ``host@backend#pool``,
        a pool per share) with the capacities this driver reported; it is
        honoured when it still fits, so the scheduler's accounting holds.
        """
        pool = str(getattr(volume, "host", "") or "").partition("#")[2]
        if pool in self._shares and self._fits(pool, volume.size):
            return pool
        return self.find_share(volume.size)

    def clean_volume_file_locks(self, volume_id: str) -> None:
        """Cinder's hook after a volume is gone: remove its lock files (file-based providers).

        Cinder's manager calls it after delete_volume succeeds, as our CLI does;
        without it the lock directory keeps a file for every volume id ever used.
        """
        coordination.clean(volume_id)

    @synchronized("{volume.name_id}", "{src_vref.name_id}")
    def create_cloned_volume(self, volume: Any, src_vref: Any) -> ModelUpdate:
        src = self.chain(src_vref)
        state = src.load_recovered()
        top = src.trusted_chain(state)[0]
        return self._create_from(
            volume, src.path(top.name), top.format, top.virtual_size, f"clone of {src_vref.id}"
        )

    @synchronized("{snapshot.volume.name_id}", "{volume.name_id}")
    def create_volume_from_snapshot(self, volume: Any, snapshot: Any) -> ModelUpdate:
        src = self.chain(snapshot.volume)
        state = src.load_recovered()
        image = src.snapshot_image(state, snapshot.id)
        return self._create_from(
            volume,
            src.path(image.name),
            image.format,
            image.virtual_size,
            f"from snapshot {snapshot.id}",
        )

    def _create_from(
        self, volume: Any, src: str, src_fmt: str, src_size: int, what: str
    ) -> ModelUpdate:
        """A new volume holding ``src``'s data, grown to its own size (never shrunk).

        A volume smaller than its source is refused before anything is made:
        copying would make it the source's size while its owner is told the
        smaller one (and a shrink would cut data off).
        """
        if src_size > int(volume.size) * GiB:
            raise exception.InvalidVolume(
                f"volume {volume.id} of {volume.size} GiB cannot be created as {what}: "
                f"the source holds {src_size} bytes ({math.ceil(src_size / GiB)} GiB); "
                f"create it at least that large. Nothing was created."
            )
        share = self.choose_share(volume)
        started = time.monotonic()
        chain = self.chain(volume, share)
        chain.create_from(src, src_fmt, src_size, self.volume_format, not self.thick)
        self._account(share, chain.volume_id, volume.size * GiB)
        LOG.info(
            "volume %s: created on %s as %s in %.0f ms",
            volume.id,
            share,
            what,
            (time.monotonic() - started) * 1000,
        )
        return {"provider_location": share}

    @synchronized("{volume.name_id}")
    def extend_volume(self, volume: Any, new_size: int) -> None:
        share = self._share_of(volume)
        chain = self.chain(volume)
        chain.extend(new_size, thick=self.thick)
        self._account(share, chain.volume_id, new_size * GiB)
        LOG.info("volume %s: extended to %d GiB", volume.id, new_size)

    # -- snapshots -----------------------------------------------------------

    @synchronized("{snapshot.volume.name_id}")
    def create_snapshot(self, snapshot: Any) -> ModelUpdate:
        state = self.chain(snapshot.volume).create_snapshot(snapshot.id)
        LOG.info(
            "snapshot %s of volume %s: created (active %s, generation %d)",
            snapshot.id,
            snapshot.volume_id,
            state.active,
            state.generation,
        )
        return None

    @synchronized("{snapshot.volume.name_id}")
    def delete_snapshot(self, snapshot: Any) -> bool:
        """Merge the snapshot away; False when it was not there (still a success, as in Cinder).

        Cinder ignores the return value; the CLI reports it, so an operator who
        mistyped a snapshot id is told instead of reading "deleted".
        """
        state = self.chain(snapshot.volume).delete_snapshot(snapshot.id)
        if state.not_found:
            return False
        LOG.info(
            "snapshot %s of volume %s: deleted (active %s, generation %d)",
            snapshot.id,
            snapshot.volume_id,
            state.active,
            state.generation,
        )
        return True

    @synchronized("{volume.name_id}")
    def revert_to_snapshot(self, context: Any, volume: Any, snapshot: Any) -> None:
        self.chain(volume).revert(snapshot.id)
        LOG.info("volume %s: reverted to snapshot %s", volume.id, snapshot.id)

    # -- images and attachment -------------------------------------------------

    def copy_image_to_volume(
        self,
        context: Any,
        volume: Any,
        image_service: Any,
        image_id: str,
        disable_sparse: bool = False,
    ) -> None:
        """Fill ``volume`` (which has no snapshot yet) with image ``image_id``.

        The download runs without the volume's lock (it can be long), as this
        process, into ``image_conversion_dir``. The file is then checked like
        any image a tenant may have crafted (``qemu-img info`` under the
        helper's limits: raw or qcow2, the format the image service states,
        no backing or external data file, not encrypted, no larger than the
        volume), and converted, under the lock, in place of the volume's base:
        sparse unless the volume is thick or ``disable_sparse`` (Cinder's
        keyword) asks for every block to be allocated.
        """
        meta = image_service.show(context, image_id)
        path = self.conversion_file(f"image-{volume.id}")
        started = time.monotonic()
        try:
            source = self.fetch_image(context, image_service, image_id, path)
            downloaded = time.monotonic()
            info = self._checked_image(source, image_id, meta, volume)
            self._import_image(volume, source, info, not (self.thick or disable_sparse))
        finally:
            self.remove_conversion_file(path)
        LOG.info(
            "volume %s: image %s (%s, %d MiB virtual) copied in: download %.1f s, convert %.1f s",
            volume.id,
            image_id,
            info.format,
            info.virtual_size // 2**20,
            downloaded - started,
            time.monotonic() - downloaded,
        )

    def _checked_image(self, path: str, image_id: str, meta: dict, volume: Any) -> ImageInfo:
        from remotefs_aa.image import qemu
        from remotefs_aa.privsep import qcow2

        stated = meta.get("disk_format")
        try:
            # Our own header reader says what the file is; qemu-img is then
            # told the format (it never probes), and it must be the stated one.
            found = qcow2.read_header(path, follow_symlinks=False).format
            with open(path, "rb") as f:
                other = qcow2.foreign_format(f.read(128))
        except (OSError, exception.InvalidImage) as exc:
            raise exception.ImageRefused(image_id, f"its header cannot be read ({exc})") from None
        problems = []
        if stated and stated not in ("raw", "qcow2"):
            problems.append(f"its format is {stated!r}; only raw and qcow2 are accepted")
        elif other and stated != "raw":
            problems.append(f"its format is {other!r}; only raw and qcow2 are accepted")
        elif stated and stated != found:
            problems.append(
                f"the image service says disk_format {stated!r} but the file is "
                f"{found!r} (a mismatch is how a hostile image gets read as "
                f"another format)"
            )
        if problems:
            raise exception.ImageRefused(image_id, "; ".join(problems))
        try:
            info = qemu.info(path, found)[0]
        except (exception.PrivilegedCommandFailed, exception.InvalidImage) as exc:
            raise exception.ImageRefused(image_id, f"qemu-img cannot read it ({exc})") from None
        if info.backing_file:
            problems.append(f"it has a backing file ({info.backing_file!r})")
        if info.data_file:
            problems.append(f"it has an external data file ({info.data_file!r})")
        if info.encrypted:
            problems.append("it is encrypted")
        if info.virtual_size > volume.size * GiB:
            problems.append(
                f"its virtual size, {info.virtual_size} bytes, exceeds volume {volume.id}'s "
                f"{volume.size} GiB; create a larger volume"
            )
        if problems:
            raise exception.ImageRefused(image_id, "; ".join(problems))
        return info

    def fetch_image(self, context: Any, image_service: Any, image_id: str, path: str) -> str:
        """Download image ``image_id`` into the new file ``path`` (as this process).

        Returns the file to import: ``path`` here; under Cinder, the copy its
        create flow already downloaded, when there is one.
        """
        with open(path, "wb") as f:
            image_service.download(context, image_id, data=f)
        return path

    @synchronized("{volume.name_id}")
    def _import_image(self, volume: Any, path: str, info: ImageInfo, sparse: bool) -> None:
        chain = self.chain(volume)
        chain.replace_base(path, info.format, info.virtual_size, sparse)

    def copy_volume_to_image(
        self, context: Any, volume: Any, image_service: Any, image_meta: dict
    ) -> None:
        """Upload the volume's current data (its chain, flattened) as an image.

        The copy is made under the volume's lock, into ``image_conversion_dir``
        (``disk_format`` raw, the default, or qcow2); the upload runs after
        the lock is released, so snapshots of the volume need not wait for it.
        """
        fmt = image_meta.get("disk_format") or "raw"
        if fmt not in ("raw", "qcow2"):
            raise exception.VolumeError(
                f"cannot upload volume {volume.id} as {fmt!r}: disk_format must be raw or qcow2"
            )
        path = self.conversion_file(f"upload-{volume.id}")
        started = time.monotonic()
        try:
            self._export_image(volume, path, fmt)
            converted = time.monotonic()
            with open(path, "rb") as f:
                # Only what the upload sets: Glance refuses to be told read-only
                # fields (id, status, ...) that image_meta also carries.
                meta = {
                    "disk_format": fmt,
                    "container_format": image_meta.get("container_format") or "bare",
                }
                image_service.update(context, image_meta["id"], meta, data=f)
        finally:
            self.remove_conversion_file(path)
        LOG.info(
            "volume %s: uploaded as image %s (%s): convert %.1f s, upload %.1f s",
            volume.id,
            image_meta["id"],
            fmt,
            converted - started,
            time.monotonic() - converted,
        )

    @synchronized("{volume.name_id}")
    def _export_image(self, volume: Any, path: str, fmt: str) -> None:
        share = self._share_of(volume)
        chain = self.chain(volume)
        top = chain.trusted_chain(chain.load_recovered())[0]
        # The daemon creates the file as the service's user, for this process to upload.
        self.io_for(share).convert(chain.path(top.name), top.format, path, fmt, True, 0o600)

    def conversion_file(self, name: str) -> str:
        """A fresh file name in ``image_conversion_dir`` (created as this process)."""
        directory = os.path.realpath(self.conf.image_conversion_dir)
        if not self.daemon_may_act_in(directory):
            raise exception.InvalidConfig(
                "[DEFAULT] image_conversion_dir",
                self.conf.image_conversion_dir,
                f"must lie inside [privileged] allowed_paths ({self.allowed_paths_text()}): "
                f"qemu-img runs there as root",
            )
        try:
            os.makedirs(directory, 0o750, exist_ok=True)
        except OSError as exc:
            raise exception.InvalidConfig(
                "[DEFAULT] image_conversion_dir", directory, f"cannot be created: {exc}"
            ) from None
        path = os.path.join(directory, f"{name}.{os.getpid()}.{time.monotonic_ns()}")
        return path

    @staticmethod
    def remove_conversion_file(path: str) -> None:
        # The directory is this process's own, so it may unlink whatever the
        # daemon wrote there.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def initialize_connection(self, volume: Any, connector: dict) -> dict:
        """os-brick connection info, from a lock-free read of the atomically written .info.

        ``name`` is the *active* image (the newest overlay once snapshots
        exist) and ``format`` its format, which the hypervisor needs to open it.
        """
        share = self._share_of(volume)
        chain = self.chain(volume)
        state = chain.load()
        fmt = state.format if state.active == chain.base else "qcow2"
        return self._connection(share, state.active, fmt)

    def initialize_connection_snapshot(self, snapshot: Any, connector: dict, **kwargs: Any) -> dict:
        """Connection info for the image holding ``snapshot``'s data (for backups)."""
        volume = snapshot.volume
        share = self._share_of(volume)
        chain = self.chain(volume)
        link = chain.snapshot_image(chain.load(), snapshot.id)
        return self._connection(share, link.name, link.format)

    def _connection(self, share: str, name: str, fmt: str) -> dict:
        return {
            "driver_volume_type": self.driver_volume_type,
            "data": {
                "export": share,
                "name": name,
                "options": self.share_options(share),
                "format": fmt,
            },
        }

    # -- capacity --------------------------------------------------------------

    def _account(self, share: str, volume_id: str, size: int | None) -> None:
        # Keyed by the chain's id, as the rescan of the share's files is.
        with self._stats_lock:
            volumes = self._provisioned.setdefault(share, {})
            if size is None:
                volumes.pop(volume_id, None)
            else:
                volumes[volume_id] = size

    def _provisioned_bytes(self, share: str) -> int:
        """Provisioned size of ``share``: the figures counted since its last rescan.

        Never a rescan here (this runs inside every create and clone, through
        ``find_share``): each operation adjusts its own volume's figure
        (``_account``), and ``get_volume_stats`` rescans (``_rescan``), so
        other hosts' volumes are counted from the next periodic refresh on.
        Only a share never scanned yet (no ``do_setup``) is scanned here once.
        """
        with self._stats_lock:
            scanned = share in self._scanned_at
        if not scanned:
            self._rescan(share)
        with self._stats_lock:
            return sum(self._provisioned.get(share, {}).values())

    def _rescan(self, share: str) -> dict:
        """Recount ``share``'s provisioned bytes from one ``share_scan``; the scan.

        One directory read for the whole share plus one header read per volume
        (its active image: an extend grows only the top of a chain, so the top
        says the volume's size; a raw base that is its own top, by its size),
        instead of a read of the directory per volume.
        """
        scan = self.io.share_scan(self.share_path(share), self.volume_format)
        sizes = {}
        for vid, seen in scan["volumes"].items():
            if seen["base"] and not seen["deleting"] and seen["size"] is not None:
                sizes[vid] = seen["size"]
        with self._stats_lock:
            self._provisioned[share] = sizes
            self._scanned_at[share] = time.monotonic()
        return scan

    def share_capacity(self, share: str) -> dict:
        """Capacity of one share, in bytes, with what it may still take."""
        st = self.io.statvfs(self.share_path(share))
        total, available = st["total"], st["available"]
        provisioned = self._provisioned_bytes(share)
        reserved = total * self.conf.reserved_percentage / 100.0
        ratio = opts.effective_over_subscription_ratio(
            self.conf.max_over_subscription_ratio, total, available, provisioned
        )
        return {
            "share": share,
            "total": total,
            "free": available,
            "provisioned": provisioned,
            "reserved": reserved,
            "max_over_subscription_ratio": ratio,
            # New volumes fit while provisioned + new <= (total - reserved) * ratio
            # (thin) and, thick, while the space is really there.
            "thin_headroom": (total - reserved) * ratio - provisioned,
            "thick_headroom": available - reserved,
        }

    def _headroom(self, share: str, size_gib: int) -> float | None:
        """How much room ``share`` has left (bytes), or None if ``size_gib`` does not fit."""
        cap = self.share_capacity(share)
        key = "thick_headroom" if self.thick else "thin_headroom"
        fits = cap[key] >= size_gib * GiB and cap["thick_headroom"] > 0
        return cap[key] if fits else None

    def _fits(self, share: str, size_gib: int) -> bool:
        return self._headroom(share, size_gib) is not None

    def find_share(self, size_gib: int) -> str:
        """The share with the most headroom that can take ``size_gib`` more."""
        if not self._shares:
            raise exception.VolumeError("driver not set up: call do_setup() first")
        candidates = []
        for share in self._shares:
            room = self._headroom(share, size_gib)
            if room is not None:
                candidates.append((room, share))
        if not candidates:
            raise exception.VolumeError(
                f"no share can take a {size_gib} GiB volume (reserved_percentage="
                f"{self.conf.reserved_percentage}, max_over_subscription_ratio="
                f"{self.conf.max_over_subscription_ratio}); free space or add a share"
            )
        return max(candidates)[1]

    def get_volume_stats(self, refresh: bool = False) -> dict:
        """Capacity per share (a pool per share, as Cinder's NFS driver reports).

        ``max_over_subscription_ratio`` is reported as configured (a number,
        or 'auto' for the scheduler to derive from these figures).
        """
        ratio = opts.parse_over_subscription_ratio(self.conf.max_over_subscription_ratio)
        common = {
            "reserved_percentage": self.conf.reserved_percentage,
            "max_over_subscription_ratio": ratio,
            "thin_provisioning_support": not self.thick,
            "thick_provisioning_support": self.thick,
            "QoS_support": False,
            "multiattach": False,
        }
        pools = []
        interval = self.conf.provisioned_capacity_refresh_interval
        for share in self._shares:
            with self._stats_lock:
                age = time.monotonic() - self._scanned_at.get(share, -math.inf)
            if refresh:
                # Cinder's periodic task: one read of the share recounts it and
                # sweeps interrupted work; what another host's lock still covers
                # is counted, not removed.
                self._leftovers[share] = self.sweep_leftovers(share, self._rescan(share))["kept"]
            elif age >= interval:
                self._rescan(share)  # a caller that never refreshes still sees others' volumes
            cap = self.share_capacity(share)
            pools.append(
                {
                    "pool_name": share,
                    "leftover_files": len(self._leftovers.get(share, [])),
                    "total_capacity_gb": round(cap["total"] / GiB, 2),
                    "free_capacity_gb": round(cap["free"] / GiB, 2),
                    "provisioned_capacity_gb": round(cap["provisioned"] / GiB, 2),
                    **common,
                }
            )
        return {
            "volume_backend_name": self.conf.volume_backend_name or self.driver_name,
            "vendor_name": "remotefs_aa",
            "driver_version": VERSION,
            "storage_protocol": self.storage_protocol,
            "total_capacity_gb": round(sum(p["total_capacity_gb"] for p in pools), 2),
            "free_capacity_gb": round(sum(p["free_capacity_gb"] for p in pools), 2),
            "provisioned_capacity_gb": round(sum(p["provisioned_capacity_gb"] for p in pools), 2),
            "sparse_copy_volume": True,
            "online_extend_support": False,
            **common,
            "pools": pools,
        }

    def list_volumes(self) -> list[Volume]:
        """Volumes found on the shares (base files), sized from their active images.

        One ``share_scan`` per share (one directory read, one header per
        volume). A volume whose chain cannot be read (a truncated .info file,
        a bad header) is listed with status ``error`` and the reason, so one
        broken volume does not hide the others.
        """
        found = []
        for share in self._shares:
            path = self.share_path(share)
            scan = self.io.share_scan(path, self.volume_format)
            for vid, seen in sorted(scan["volumes"].items()):
                if not seen["base"] or seen["deleting"]:
                    continue
                found.append(self._listed(share, path, vid, seen))
        return found

    def _listed(self, share: str, path: str, volume_id: str, seen: dict) -> Volume:
        error = seen["error"]
        if seen["info"] is not None and error is None:
            try:
                parse_info(os.path.join(path, f"volume-{volume_id}.info"), seen["info"], "raw")
            except exception.RemoteFSAAError as exc:
                error = str(exc)
        if error is None and seen["size"] is None:
            error = f"the active image of volume {volume_id} is missing"
        size = max(1, math.ceil((seen["size"] or 0) / GiB))
        if error is not None:
            return Volume(volume_id, size, share, status="error", error=error)
        return Volume(id=volume_id, size=size, provider_location=share, status="available")

    def find_volume(self, volume_id: str) -> Volume | None:
        """The volume with this id on any share, or None (for the CLI; no database).

        Looked up by name on each share (``volume_state``), never by a listing.
        """
        for share in self._shares:
            path = self.share_path(share)
            seen = self.io.volume_state(path, f"volume-{volume_id}", self.volume_format, False)
            if f"volume-{volume_id}" in seen["files"]:
                return self._volume_on(share, volume_id)
        return None

    def _volume_on(self, share: str, volume_id: str) -> Volume:
        chain = Chain(self.io, self.share_path(share), volume_id, 0, self.volume_format)
        state = chain.load()
        raw = [chain.base] if state.format == "raw" else None
        top = self.io.image_chain(chain.path(state.active), raw)[0]
        size = max(1, math.ceil(top["virtual_size"] / GiB))
        return Volume(id=volume_id, size=size, provider_location=share, status="available")

    def verify_volume(self, volume: Any, deep: bool = True) -> dict:
        """``Chain.verify`` for ``volume``: empty ``problems`` when the chain is intact."""
        return self.chain(volume).verify(deep=deep)
