"""Replay a workload's history and compare the model with every chain and every byte.

Input: the history files of every process (remotefs_aa.history) and the shares.
Output: a report whose ``problems`` list every way the volumes differ from what
the history, replayed in generation order, says they must be.

The order
    Every chain change publishes the next ``.info`` generation of its volume,
    so the generations are the order in which the driver's locks let the
    operations through. Each volume's generations 1..N (N read from the share)
    must be explained exactly once, and the chain says by whom: it logs every
    generation it publishes with what it is (history ``published``: creation,
    snapshot, delete, revert, image, or an intent or claim that changes no
    view), in the call that published it, failed calls and the recoveries an
    operation ran on the way included. A generation published twice, one no
    recorded call published, a successful call that published no generation
    of its kind, a recovery that finished the intent of a call that then
    succeeded, and two operations whose generations contradict real time (one
    ended before the other started yet has the higher generation) are
    problems: with working locks none of them can happen.

The model
    Per volume: the content of the active image and of each snapshot as a map
    region -> (status, pattern), where status is ``present``, ``either`` (a
    write that overlapped chain changes: all the pattern or all zeros) or
    ``partial`` (a write that failed: any mix). A region not in a map must read
    zeros. Positions are generations: a write, a clone's read or an extend that
    started after generation g's operation ended comes after it, one that
    ended before it started comes before it, otherwise it could be on either
    side. An operation's interval is the time its driver call held its locks
    (history ``held_from``/``held_until``) when the guard logged them, else
    the whole call. Replaying generation by generation:

    * a write known to fall between g and g+1 (and successful) is ``present``
      in the active image from g on. A write that could fall anywhere in g..h
      is ``either`` in the active image while g..h are replayed, so in the
      snapshots made by g+1..h and in any copy read then; after h it is
      ``present`` again, unless a delete or revert in g+1..h could have lost
      it (the commit copied the file before the write landed in it; the revert
      discarded the image it landed in): then it stays ``either``, and so in
      whatever later copies the active image (a snapshot, a revert, a clone);
    * a snapshot create copies the active map; a delete drops the snapshot
      (other views keep their data: the commit merges it); a revert copies
      the snapshot's map to the active image; an image copy replaces it;
    * a clone is the source's active map at any position its interval allows
      (writes of those positions compared with its interval); a volume from a
      snapshot is that snapshot's map. Either is then a volume of its own.

    Sizes: the active image must be the size of the last successful extend
    (or the creation size); a snapshot the size the volume had when taken.

What is compared
    Every live volume: ``verify_volume`` (the .info file against the files, no
    orphan or leftover, ``qemu-img check`` on every overlay, qemu-img's chain
    against our header reader); its snapshots against the model's; every view
    (active image, each snapshot) flattened with ``qemu-img convert`` through
    the privileged daemon and read back byte by byte against the model (holes
    read as zeros, so every byte of the virtual disk is checked, not only the
    written regions), plus one region per view read with qemu-io
    (``pattern_matches``) as an independent reader. Volumes that are deleted,
    or whose creation failed, must have no file left on any share. A failed
    call must have changed nothing (the model ignores it; the comparison sees
    any change) and must have had a cause: a refusal (history.REFUSALS) is
    checked against the history (the snapshot was gone or no longer the latest
    at a position the call could have run at, the volume had grown, been
    deleted, or its guest was writing); anything else is an error.
"""

from __future__ import annotations

import bisect
import dataclasses
import errno
import itertools
import os
from collections.abc import Iterable
from typing import Any

from remotefs_aa import exception, history
from remotefs_aa.history import MAX_REGIONS, REGION, pattern_of
from remotefs_aa.image.chain import GiB
from remotefs_aa.objects import Volume

PRESENT, EITHER, PARTIAL = "present", "either", "partial"
#: Chain changes that can lose a write made while they run.
LOSSY = ("delete", "revert", "image", "image?")
Status = tuple[str, int]
Content = dict[int, Status]

#: Problems listed per view before they are summed up.
PER_VIEW = 6
CREATES = ("create_volume", "create_cloned_volume", "create_volume_from_snapshot")


@dataclasses.dataclass
class Op:
    """One finished call from the history."""

    rec: dict

    def __getattr__(self, name: str) -> Any:
        try:
            return self.rec[name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def ok(self) -> bool:
        return self.rec.get("result") == "ok"

    def get(self, key: str, default: Any = None) -> Any:
        return self.rec.get(key, default)

    @property
    def body_start(self) -> float:
        """When the driver's body can have started: once it held its locks."""
        held = self.rec.get("held_from")
        return held if held is not None else self.rec["start"]

    @property
    def body_end(self) -> float:
        held = self.rec.get("held_until")
        return held if held is not None else self.rec["end"]

    def describe(self) -> str:
        what = self.rec["kind"]
        target = self.rec.get("volume") or self.rec.get("new_volume")
        if self.rec.get("snapshot"):
            target = f"{target} snapshot {self.rec['snapshot']}"
        if self.rec.get("kind") == "write":
            target = f"{target} region {self.rec.get('region')}"
        who = f"{self.rec.get('host')}/{self.rec.get('pid')}"
        return f"{what} on {target} ({who}, t={self.rec['start']:.3f}-{self.rec['end']:.3f})"


@dataclasses.dataclass
class Entry:
    """One generation of one volume's .info file and the operation that wrote it."""

    gen: int
    effect: str  # create | snapshot | delete | revert | image | image? | intent
    snapshot: str | None
    start: float
    end: float
    what: str
    ok: bool = True  # did the call that wrote it succeed?


def _combine(views: list[Content]) -> Content:
    """What is certain in every one of ``views``; ``either``/``partial`` where they differ."""
    if len(views) == 1:
        return dict(views[0])
    out: Content = {}
    for r in set().union(*views):
        vals = [v.get(r) for v in views]
        first = vals[0]
        if all(v == first for v in vals):
            out[r] = first  # type: ignore[assignment]
            continue
        pattern = next(v[1] for v in vals if v is not None)
        partial = any(v is not None and v[0] == PARTIAL for v in vals)
        out[r] = (PARTIAL if partial else EITHER, pattern)
    return out


class Lineage:
    """The model of one volume: its generations, then its content at each of them."""

    def __init__(self, volume_id: str, created: Op, shared: bool) -> None:
        self.id = volume_id
        self.created = created
        self.shared = shared
        self.share: str = created.get("share")
        self.size: int = int(created.get("size") or 1)
        self.initial: Content = {}
        self.entries: dict[int, Entry] = {}
        self.writes: list[Op] = []
        self.extends: list[Op] = []
        self.deletions: list[Op] = []
        self.final_gen: int | None = None
        self.last = 0
        self._index: tuple[list, list, list, list] | None = None
        # Filled by replay():
        self.active: Content = {}
        self.snaps: dict[str, Content] = {}
        self.taken: dict[str, Content] = {}
        self.taken_by: dict[str, Entry] = {}
        self.at: list[tuple[Content, list[Op]]] = [({}, [])]
        self.snapsets: list[list[str]] = [[]]

    @property
    def deleted(self) -> bool:
        return bool(self.deletions)

    def deleted_before(self, t: float) -> bool:
        return any(d.body_start < t for d in self.deletions)

    def final_size(self) -> int:
        return max([self.size] + [int(e.new_size) for e in self.extends])

    def snapshot_sizes(self, entry: Entry) -> tuple[set[int], int]:
        """Sizes (GiB) a snapshot taken by ``entry`` may have, and the least it must."""
        allowed = {self.size} | {int(e.new_size) for e in self.extends if e.body_start < entry.end}
        least = max(
            [self.size] + [int(e.new_size) for e in self.extends if e.body_end < entry.start]
        )
        return allowed, least

    # -- generations --------------------------------------------------------

    def claim(self, gen: int, entry: Entry, problems: list[str]) -> None:
        if gen < 1:
            problems.append(f"volume {self.id}: {entry.what} claims generation {gen}")
            return
        other = self.entries.get(gen)
        if other is not None and other.what != entry.what:
            problems.append(
                f"volume {self.id}: generation {gen} was written by both {other.what} and "
                f"{entry.what} (two writers of one chain at once)"
            )
            return
        self.entries[gen] = entry

    def window(self, start: float, end: float) -> tuple[int, int]:
        """Positions (generations) an interval may fall at: after lo, before hi + 1.

        lo: the highest generation whose call ended before ``start``; hi: one
        below the lowest whose call started after ``end`` (by bisection over
        the entries sorted once, as histories run to thousands of calls).
        """
        if self._index is None:
            by_end = sorted(self.entries.values(), key=lambda e: e.end)
            by_start = sorted(self.entries.values(), key=lambda e: e.start)
            suffix_min = list(itertools.accumulate(reversed([e.gen for e in by_start]), min))
            self._index = (
                [e.end for e in by_end],
                list(itertools.accumulate((e.gen for e in by_end), max)),
                [e.start for e in by_start],
                suffix_min[::-1],
            )
        ends, max_gen, starts, min_gen = self._index
        i = bisect.bisect_left(ends, start)  # entries [0, i) ended before start
        lo = max_gen[i - 1] if i else 0
        j = bisect.bisect_right(starts, end)  # entries [j, n) started after end
        hi = min_gen[j] if j < len(starts) else self.last + 1
        return max(lo, 1), max(min(hi - 1, self.last), max(lo, 1))

    def settle(self, problems: list[str]) -> None:
        """Every generation 1..N must have been published by exactly one recorded call.

        N is the share's (``final_gen``); a deleted volume has none left, and
        its last recorded generation stands in.
        """
        known = self.entries
        last = self.final_gen if self.final_gen is not None else max(known, default=0)
        for g in [g for g in known if g > last]:
            problems.append(
                f"volume {self.id}: {known[g].what} claims generation {g}, but the .info "
                f"file is at generation {last}"
            )
            del known[g]
        free = [g for g in range(1, last + 1) if g not in known]
        if free:
            problems.append(f"volume {self.id}: generations {free} were written by no call")
        self.last = last
        self._index = None

    def check_time_order(self, problems: list[str]) -> None:
        """An operation that ended before another started must have the lower generation."""
        latest: Entry | None = None
        for g in sorted(self.entries):
            e = self.entries[g]
            if latest is not None and e.end < latest.start and e.what != latest.what:
                problems.append(
                    f"volume {self.id}: {e.what} wrote generation {g} but ended before "
                    f"{latest.what} (generation {latest.gen}) started: the order of the "
                    f"chain's writes contradicts real time"
                )
            if latest is None or e.start > latest.start:
                latest = e

    # -- content ------------------------------------------------------------

    def replay(self, image: Content, problems: list[str]) -> None:
        """The content of every view at every generation (see the module docstring)."""
        spanning: dict[int, list[Op]] = {}
        definite: dict[int, list[Op]] = {}
        settled: dict[int, tuple[int, Status]] = {}  # id(write) -> (end of span, status then)
        for w in self.writes:
            lo, hi = self.window(w.start, w.end)
            if w.ok and lo == hi:
                definite.setdefault(lo, []).append(w)
                continue
            for p in range(lo, hi + 1):
                spanning.setdefault(p, []).append(w)
            # Only a delete (the commit may have copied the file before the write
            # landed in it) or a revert (it discards the active image) can lose
            # a write; snapshot creates only decide which side of them it is on.
            lossy = any(
                self.entries[g].effect in LOSSY for g in range(lo + 1, hi + 1) if g in self.entries
            )
            kind = PARTIAL if not w.ok else EITHER if lossy else PRESENT
            settled[id(w)] = (hi, (kind, w.pattern))
        active: Content = {}
        snaps: dict[str, Content] = {}
        for p in range(1, self.last + 1):
            e = self.entries.get(p)
            if e is None:
                pass  # an unexplained generation, reported by settle()
            elif e.effect == "create":
                active = dict(self.initial)
            elif e.effect == "snapshot":
                if e.snapshot in snaps:
                    problems.append(f"volume {self.id}: {e.what} made snapshot {e.snapshot} twice")
                snaps[e.snapshot] = dict(active)  # type: ignore[index]
                self.taken[e.snapshot] = snaps[e.snapshot]  # type: ignore[index]
                self.taken_by[e.snapshot] = e  # type: ignore[index]
            elif e.effect == "delete":
                if snaps.pop(e.snapshot, None) is None:  # type: ignore[arg-type]
                    problems.append(
                        f"volume {self.id}: {e.what} deleted snapshot {e.snapshot}, which did "
                        f"not exist at generation {p}"
                    )
            elif e.effect == "revert":
                latest = list(snaps)[-1] if snaps else None
                if latest != e.snapshot:
                    problems.append(
                        f"volume {self.id}: {e.what} reverted to {e.snapshot}, but the latest "
                        f"snapshot at generation {p} was {latest}"
                    )
                if e.snapshot in snaps:
                    active = dict(snaps[e.snapshot])  # type: ignore[index]
            elif e.effect == "image":
                active = dict(image)
            elif e.effect == "image?":
                # A copy that failed after its claim: the image replaced the
                # base, or it did not.
                active = _combine([active, dict(image)])
            for w in spanning.get(p, []):
                # Within its span a write is on either side of each change (so
                # are the snapshots those make); once the span is over it is in.
                last, status = settled[id(w)]
                during = PARTIAL if status[0] == PARTIAL else EITHER
                active[w.region] = status if p == last else (during, w.pattern)
            start = dict(active)
            for w in definite.get(p, []):
                active[w.region] = (PRESENT, w.pattern)
            self.at.append((start, definite.get(p, []) + spanning.get(p, [])))
            self.snapsets.append(list(snaps))
        self.active = active
        self.snaps = snaps

    def active_view(self, start: float, end: float) -> Content:
        """The active image as a copy made at some time in [start, end] saw it."""
        lo, hi = self.window(start, end)
        views = []
        for q in range(lo, min(hi, len(self.at) - 1) + 1):
            base, writes = self.at[q]
            view = dict(base)
            for w in writes:  # those that may land at this position: by time
                if w.start > end:
                    view.pop(w.region, None)
                elif w.end >= start or base.get(w.region, (PRESENT,))[0] != PRESENT:
                    view[w.region] = (EITHER if w.ok else PARTIAL, w.pattern)
                else:
                    view[w.region] = (PRESENT, w.pattern)
            views.append(view)
        return _combine(views) if views else {}

    def positions(self, op: Op) -> range:
        lo, hi = self.window(op.body_start, op.body_end)
        return range(lo, min(hi, len(self.snapsets) - 1) + 1)


def volume_ids(records: Iterable[dict]) -> set[str]:
    """Every volume id a history mentions (including those a failed call announced)."""
    ids: set[str] = set()
    for r in records:
        for key in ("volume", "new_volume"):
            if r.get(key):
                ids.add(r[key])
    return ids


def files_of(volume_id: str, names: Iterable[str]) -> list[str]:
    """The files of a volume among a share's names (its own and its hidden leftovers)."""
    base = f"volume-{volume_id}"
    return sorted(
        n for n in names if n == base or n.startswith(base + ".") or n.startswith("." + base + ".")
    )


class Model:
    """Every volume of a history, replayed; with the problems the history itself shows."""

    def __init__(self, records: list[dict], unfinished: list[dict]) -> None:
        self.problems: list[str] = []
        self.errors: list[str] = []
        self.ops = sorted((Op(r) for r in records if r.get("event") == "end"), key=_start)
        self.image: Content = {}
        for r in records:
            if r.get("event") == "note" and r.get("kind") == "image":
                self.image = {x: (PRESENT, pattern_of(x)) for x in r.get("regions", [])}
        for r in unfinished:
            self.problems.append(
                f"{r.get('kind')} on {r.get('volume') or r.get('new_volume')} by "
                f"{r.get('host')}/{r.get('pid')} started and never ended (its process died?)"
            )
        self.lineages: dict[str, Lineage] = {}
        self.failed_creates: dict[str, Op] = {}
        for op in self.ops:
            if op.kind in CREATES and op.get("new_volume"):
                if op.ok:
                    self.lineages[op.new_volume] = Lineage(
                        op.new_volume, op, op.get("worker") == -1
                    )
                else:
                    self.failed_creates[op.new_volume] = op
        for op in self.ops:
            if op.kind == "delete_volume" and op.ok and op.get("volume") in self.lineages:
                self.lineages[op.volume].deletions.append(op)
            if not op.ok and op.kind != "write" and op.get("refusal") is None:
                err = op.get("error") or {}
                self.errors.append(f"{op.describe()}: {err.get('class')}: {err.get('message')}")
        self.announced = volume_ids(records) | volume_ids(unfinished)

    def build(self, final_generations: dict[str, int | None]) -> None:
        """Generations, order and content of every volume (sources before their copies)."""
        by_volume: dict[str, list[Op]] = {}
        for op in self.ops:
            if op.get("volume"):
                by_volume.setdefault(op.volume, []).append(op)
        published: dict[str, list[tuple[Op, int, str]]] = {}
        recoveries: dict[str, list[tuple[Op, dict]]] = {}
        for op in self.ops:
            for volume, gen, label in op.get("published") or []:
                published.setdefault(volume, []).append((op, int(gen), label))
            for rec in op.get("recovered") or []:
                recoveries.setdefault(rec["volume"], []).append((op, rec))
            if op.get("swept"):
                self.problems.append(
                    f"{op.describe()} removed {op.swept} as orphans: a snapshot create "
                    f"failed half-way or ran at the same time without its lock"
                )
        for lin in sorted(self.lineages.values(), key=lambda x: x.created.start):
            lin.final_gen = final_generations.get(lin.id)
            self._gather(
                lin,
                by_volume.get(lin.id, []),
                published.get(lin.id, []),
                recoveries.get(lin.id, []),
            )
            lin.settle(self.problems)
            lin.check_time_order(self.problems)
            lin.initial = self._origin(lin)
            lin.replay(self.image, self.problems)
        self._judge_failures(by_volume)

    def _gather(
        self,
        lin: Lineage,
        ops: list[Op],
        published: list[tuple[Op, int, str]],
        recoveries: list[tuple[Op, dict]],
    ) -> None:
        """Credit every generation of the volume to the call that published it."""
        p = self.problems
        made: dict[int, set[str]] = {}  # id(op) -> the effects it published
        for op, g, label in published:
            effect, snapshot = _effect(label, op.ok)
            made.setdefault(id(op), set()).add(effect)
            entry = Entry(g, effect, snapshot, op.body_start, op.body_end, op.describe(), op.ok)
            lin.claim(g, entry, p)
        for op in [lin.created, *ops]:
            if op.kind == "write":
                lin.writes.append(op)
                continue
            if op.kind == "extend_volume" and op.ok:
                lin.extends.append(op)
            needed = _MUST_PUBLISH.get(op.kind)
            if op is not lin.created and op.kind in CREATES:
                needed = None  # a copy's source: it publishes on the new volume
            if op.kind == "delete_snapshot" and op.get("noop"):
                needed = None  # already gone (or finished on the way, published then)
            if op.ok and needed and needed not in made.get(id(op), set()):
                p.append(
                    f"{op.describe()} succeeded but logged no {needed} generation of volume "
                    f"{lin.id} (driver log changed?)"
                )
        for finder, rec in recoveries:
            owner = lin.entries.get(rec["generation"])
            if owner is not None and owner.ok and owner.what != finder.describe():
                # A call that succeeded cannot have left an intent to finish:
                # it was still running it when the finder read it.
                p.append(
                    f"volume {lin.id}: {finder.describe()} finished the intent of generation "
                    f"{rec['generation']} while {owner.what} was still running it (no lock "
                    f"kept them apart)"
                )

    def _origin(self, lin: Lineage) -> Content:
        """A new volume's first content: empty, or a copy of its source's view."""
        c = lin.created
        if c.kind == "create_volume":
            return {}
        src = self.lineages.get(c.volume)
        if src is None:
            self.problems.append(f"{c.describe()} succeeded from a volume the history never made")
            return {}
        if c.kind == "create_cloned_volume":
            return src.active_view(c.body_start, c.body_end)
        snap = c.snapshot
        if snap not in src.taken:
            self.problems.append(f"{c.describe()} succeeded, but snapshot {snap} was never taken")
            return {}
        if not any(snap in src.snapsets[q] for q in src.positions(c)):
            self.problems.append(
                f"{c.describe()} succeeded, but snapshot {snap} did not exist at any "
                f"generation the call could have run at"
            )
        return dict(src.taken[snap])

    def _judge_failures(self, by_volume: dict[str, list[Op]]) -> None:
        """Every refusal and every failed guest write needs a cause in the history."""
        # A broken chain fails every later call the same way: list a few of each.
        unexplained: dict[tuple[str, str], list[str]] = {}
        writes = {v: _Overlaps(o for o in ops if o.kind == "write") for v, ops in by_volume.items()}
        calls = {v: _Overlaps(o for o in ops if o.kind != "write") for v, ops in by_volume.items()}
        for op in self.ops:
            if op.ok or not op.get("volume"):
                continue
            lin = self.lineages.get(op.volume)
            if lin is None:
                continue  # a volume whose creation failed: nothing could succeed on it
            if op.kind == "write":
                if calls[op.volume].any(op.start, op.end) or lin.deleted_before(op.end):
                    continue
                err = op.get("error") or {}
                unexplained.setdefault((op.volume, "write"), []).append(
                    f"{op.describe()} failed with nothing else running on the volume: "
                    f"{err.get('class')}: {err.get('message')}"
                )
                continue
            reason = op.get("refusal")
            if reason is None:
                continue  # an error, listed by _gather
            guest = writes[op.volume].any(op.body_start, op.body_end)
            if self._justified(op, reason, lin, guest):
                continue
            unexplained.setdefault((op.volume, reason), []).append(
                f"{op.describe()} was refused ({reason}) with no cause in the history: "
                f"{(op.get('error') or {}).get('message')}"
            )
        for (volume, what), lines in unexplained.items():
            self.problems += lines[:3]
            if len(lines) > 3:
                self.problems.append(
                    f"... and {len(lines) - 3} more calls on volume {volume} failed so ({what})"
                )

    def _justified(self, op: Op, reason: str, lin: Lineage, guest: bool) -> bool:
        if lin.deleted_before(op.end):
            return True  # whatever it said, the volume was going away
        if reason == "snapshot-gone":
            return any(op.snapshot not in lin.snapsets[q] for q in lin.positions(op))
        if reason == "not-latest":
            return any(
                not lin.snapsets[q] or lin.snapsets[q][-1] != op.snapshot for q in lin.positions(op)
            )
        if reason == "stale-size":
            # The volume had grown past the size the caller believed.
            grown = [int(e.new_size) for e in lin.extends if e.body_start < op.body_end]
            return max(grown, default=0) > int(op.get("size") or 0)
        if reason == "image-in-use":
            return guest  # the volume's guest was writing while the call ran
        return False  # volume-gone, yet it was not deleted


#: The effect each successful call must have published on its volume.
_MUST_PUBLISH = {
    **{kind: "create" for kind in CREATES},
    "create_snapshot": "snapshot",
    "delete_snapshot": "delete",
    "revert_to_snapshot": "revert",
    "copy_image_to_volume": "image",
}


def _effect(label: str, ok: bool) -> tuple[str, str | None]:
    """What a published generation did to the volume's views, from the chain's label.

    ``create``/``snapshot <id>``/``delete <id>``/``revert <id>`` change them
    as their names say; ``image`` is claimed just before the image replaces the
    base (``image?`` when the call then failed: it may not have); intents and
    claims (``intent ...``, ``claim ...``) change no view.
    """
    word, _, rest = label.partition(" ")
    if word in ("create", "snapshot", "delete", "revert") and (word == "create" or rest):
        return word, rest or None
    if word == "image":
        return ("image" if ok else "image?"), None
    snapshot = rest.split()[-1] if word == "intent" and len(rest.split()) > 1 else None
    return "intent", snapshot


def _start(op: Op) -> float:
    return op.rec["start"]


class _Overlaps:
    """Does any of these calls' bodies overlap an interval? (sorted once, then bisected)."""

    def __init__(self, ops: Iterable[Op]) -> None:
        spans = sorted((o.body_start, o.body_end) for o in ops)
        self.starts = [a for a, _ in spans]
        self.max_end = list(itertools.accumulate((b for _, b in spans), max))

    def any(self, start: float, end: float) -> bool:
        i = bisect.bisect_right(self.starts, end)  # those that started by ``end``
        return i > 0 and self.max_end[i - 1] >= start


# -- comparing with the shares ---------------------------------------------------


def compare_bytes(path: str, expected: Content, size: int) -> tuple[list[str], dict]:
    """Read the flat raw image at ``path`` against ``expected``; problems and counts.

    Holes read as zeros (SEEK_DATA/SEEK_HOLE), so every byte of the image is
    judged while only the allocated ranges are read.
    """
    pattern_bytes: dict[int, int] = {}
    wrong: dict[int, int] = {}
    fd = os.open(path, os.O_RDONLY)
    try:
        actual = os.fstat(fd).st_size
        pos = 0
        while pos < actual:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            off = data
            while off < hole:
                r = off // REGION
                buf = os.pread(fd, min(hole, (r + 1) * REGION) - off, off)
                if not buf:
                    break
                want = expected.get(r)
                p = want[1] if want else 0
                n = buf.count(p) if p else 0
                if n + buf.count(0) != len(buf) and r not in wrong:
                    wrong[r] = next(b for b in buf if b not in (p, 0))
                pattern_bytes[r] = pattern_bytes.get(r, 0) + n
                off += len(buf)
            pos = hole
    finally:
        os.close(fd)
    problems = []
    if actual != size:
        problems.append(f"is {actual} bytes, expected {size}")
    counts = {"regions": 0, "ambiguous": 0, "bytes": actual}
    for r in sorted(wrong):
        want = expected.get(r)
        problems.append(
            f"region {r} holds byte 0x{wrong[r]:02x}; expected "
            + (
                f"0x{want[1]:02x}" + (" or zeros" if want[0] != PRESENT else "")
                if want
                else "zeros"
            )
        )
    for r, (status, p) in sorted(expected.items()):
        got = pattern_bytes.get(r, 0)
        if status == PRESENT:
            counts["regions"] += 1
            if got != REGION:
                problems.append(f"region {r} reads {got} of {REGION} bytes as 0x{p:02x}")
        else:
            counts["ambiguous"] += 1
            if status == EITHER and got not in (0, REGION) and r not in wrong:
                problems.append(
                    f"region {r} holds {got} of {REGION} bytes of 0x{p:02x}; a write lands "
                    f"whole or not at all"
                )
    return problems, counts


def _flatten(driver: Any, share: str, src: str, fmt: str) -> str:
    """A flat raw copy of the image chain at ``src``, made by the privileged daemon.

    Where and as what copy_volume_to_image makes its flat copy to read.
    """
    dst = driver.conversion_file("upload-verify")
    driver.io_for(share).convert(src, fmt, dst, "raw", True, 0o600)
    return dst


def _view_problems(
    driver: Any, share: str, src: str, fmt: str, expected: Content, size_gib: int | set[int]
) -> tuple[list[str], dict]:
    """Flatten one view, compare every byte, and read one region with qemu-io too."""
    from remotefs_aa.privsep import qemu

    flat = _flatten(driver, share, src, fmt)
    try:
        allowed = size_gib if isinstance(size_gib, set) else {size_gib}
        actual_size = os.stat(flat).st_size
        want = actual_size if actual_size in {s * GiB for s in allowed} else max(allowed) * GiB
        problems, counts = compare_bytes(flat, expected, want)
    finally:
        driver.remove_conversion_file(flat)
    present = [r for r, (s, _p) in expected.items() if s == PRESENT]
    region = max(present) if present else MAX_REGIONS - 1
    pattern = expected[region][1] if present else 0
    if region not in expected or present:
        if not qemu.pattern_matches(src, fmt, region * REGION, REGION, pattern):
            problems.append(f"qemu-io does not read region {region} as 0x{pattern:02x}")
    if len(problems) > PER_VIEW:
        problems = [*problems[:PER_VIEW], f"... and {len(problems) - PER_VIEW} more"]
    return problems, counts


def check(driver: Any, workspace: Any, deep: bool = True) -> dict:
    """The report: problems (model vs. shares, history), errors, and what was checked."""
    records, unfinished = history.load(workspace.history)
    model = Model(records, unfinished)
    reports: dict[str, dict] = {}
    finals: dict[str, int | None] = {}
    for lin in model.lineages.values():
        if not lin.share:
            model.problems.append(f"{lin.created.describe()} recorded no share for the volume")
        if lin.deleted or not lin.share:
            continue
        vol = Volume(id=lin.id, size=0, provider_location=lin.share)
        reports[lin.id] = driver.verify_volume(vol, deep=deep)
        finals[lin.id] = reports[lin.id].get("generation")
    model.build(finals)
    problems = model.problems
    checked = {
        "volumes": 0,
        "derived": 0,
        "snapshots": 0,
        "chain_links": 0,
        "regions": 0,
        "ambiguous": 0,
        "bytes": 0,
        "writes": sum(1 for op in model.ops if op.kind == "write" and op.ok),
        "operations": sum(1 for op in model.ops if op.kind != "write"),
        "refusals": sum(1 for op in model.ops if not op.ok and op.get("refusal")),
        "generations": 0,
    }
    for lin in model.lineages.values():
        if lin.id not in reports:
            continue
        checked["volumes" if lin.shared else "derived"] += 1
        problems += _compare_volume(driver, lin, reports[lin.id], checked)
    problems += _leftovers(driver, model)
    return {
        "problems": problems,
        "errors": model.errors,
        "checked": checked,
        "refused": _refusal_counts(model.ops),
    }


def _refusal_counts(ops: list[Op]) -> dict[str, int]:
    out: dict[str, int] = {}
    for op in ops:
        if not op.ok and op.get("refusal"):
            out[op.refusal] = out.get(op.refusal, 0) + 1
    return out


def _compare_volume(driver: Any, lin: Lineage, report: dict, checked: dict) -> list[str]:
    label = f"volume {lin.id}" + ("" if lin.shared else f" ({lin.created.kind})")
    problems = [f"{label}: {p}" for p in report["problems"]]
    checked["chain_links"] += len(report.get("chain", []))
    checked["generations"] += lin.last
    on_disk = set(report.get("snapshots", {}))
    model = set(lin.snaps)
    if on_disk != model:
        if model - on_disk:
            problems.append(f"{label}: snapshots {sorted(model - on_disk)} are missing")
        if on_disk - model:
            problems.append(f"{label}: .info has snapshots {sorted(on_disk - model)} no one made")
    if "chain" not in report:
        return problems
    vol = Volume(id=lin.id, size=0, provider_location=lin.share)
    try:
        chain = driver.chain(vol)
        state = chain.load()
        top = chain.trusted_chain(state)[0]
        views = [("active image", chain.path(top.name), top.format, lin.active, lin.final_size())]
        for snap in sorted(model & on_disk):
            link = chain.snapshot_image(state, snap)
            allowed, least = lin.snapshot_sizes(lin.taken_by[snap])
            views.append(
                (
                    f"snapshot {snap}",
                    chain.path(link.name),
                    link.format,
                    lin.snaps[snap],
                    {s for s in allowed if s >= least} or allowed,
                )
            )
        for name, path, fmt, expected, size in views:
            found, counts = _view_problems(driver, lin.share, path, fmt, expected, size)
            problems += [f"{label} {name}: {p}" for p in found]
            for key in ("regions", "ambiguous", "bytes"):
                checked[key] += counts[key]
            if name != "active image":
                checked["snapshots"] += 1
    except exception.RemoteFSAAError as exc:
        problems.append(f"{label}: {exc}")
    return problems


def _leftovers(driver: Any, model: Model) -> list[str]:
    """Files of volumes that must not have any, or on a share they do not live on."""
    problems = []
    live = {lin.id: lin.share for lin in model.lineages.values() if not lin.deleted}
    for share in driver.shares:
        names = driver.io_for(share).list_directory(driver.share_path(share))
        for volume_id in sorted(model.announced):
            files = files_of(volume_id, names)
            if not files or live.get(volume_id) == share:
                continue
            if volume_id in live:
                why = f"lives on {live[volume_id]}"
            elif volume_id in model.lineages:
                why = "was deleted"
            elif volume_id in model.failed_creates:
                why = f"was never created ({model.failed_creates[volume_id].describe()} failed)"
            else:
                why = "was never created"
            problems.append(f"volume {volume_id} {why}, yet {share} has its files {files}")
    return problems
