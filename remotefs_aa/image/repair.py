"""Rebuild a volume's ``.info`` file from its images (``remotefs-aa volume repair``).

The ``.info`` file can be rebuilt because the images say everything it records
but the base's format: a snapshot S's overlay is named ``volume-<id>.S`` (it is
made under that name when S is taken), each overlay's header names its backing
file, and the active image is the top of that chain. So the plan is: read every
overlay's header, find the one overlay no other overlay is backed by, walk down
to the base, and map each overlay in the walk to its snapshot.

Nothing is guessed. The plan is refused when the files do not make one chain
(two tops: an interrupted snapshot delete whose overlay was already merged; a
header that cannot be read), when the volume is being deleted, or when the
current file parses and records an interrupted operation (the next operation
finishes it). The base's format cannot be read from the base without probing a
raw volume a guest may have written a qcow2 header into, so it is the
caller's (the driver's configured format, or ``--base-format``). The write is
the chain's own compare-and-swap against the text read for the plan, under the
volume's lock, and only after every rule of ``Chain.trusted_chain`` passed.
"""

from __future__ import annotations

import dataclasses
import difflib
import re

from remotefs_aa import exception
from remotefs_aa.image.chain import Chain, ChainState, parse_info
from remotefs_aa.privsep import images

_GENERATION = re.compile(r'"generation"\s*:\s*(\d+)')
_CLAIM = re.compile(r"^gen\.(\d+)\Z")


@dataclasses.dataclass
class RepairPlan:
    """What ``repair`` would write, and why; ``problems`` non-empty means it will not."""

    volume_id: str
    info_path: str
    current: str | None
    proposed: str | None
    state: ChainState | None
    chain: list[str]
    left_alone: list[str]
    notes: list[str]
    problems: list[str]

    @property
    def needed(self) -> bool:
        """Whether writing would change the file."""
        return not self.problems and self.proposed != self.current

    def diff(self) -> str:
        """Unified diff of the current text (or nothing) against the proposed one."""
        # A truncated file's last line has no newline; shown as a line of its own.
        old = [line.rstrip("\n") + "\n" for line in (self.current or "").splitlines()]
        new = [line.rstrip("\n") + "\n" for line in (self.proposed or "").splitlines()]
        name = self.info_path
        return "".join(difflib.unified_diff(old, new, f"{name} (now)", f"{name} (rebuilt)"))


def plan(chain: Chain, base_format: str | None = None) -> RepairPlan:
    """Read the volume's files and headers; the ``.info`` text they imply.

    ``base_format``: the base's format; by default the current file's, if it
    parses, else the chain's default (the driver's configured format). Call
    under the volume's lock: the plan's ``current`` text is what :func:`apply`
    compares against.
    """
    vid, base = chain.volume_id, chain.base
    current = chain.io.read_text(chain.info_path)
    parsed = None
    if current is not None:
        try:
            parsed = parse_info(chain.info_path, current, chain.default_format)
        except exception.InvalidInfoFile:
            parsed = None
    fmt = base_format or (parsed.format if parsed else chain.default_format)
    problems: list[str] = []
    notes: list[str] = []
    result = RepairPlan(vid, chain.info_path, current, None, None, [], [], notes, problems)
    files = chain.io.list_directory(chain.directory)
    if base not in files:
        problems.append(f"{chain.path(base)} does not exist: there is no volume to repair")
        return result
    if f".{base}.deleting" in files:
        problems.append(
            f"volume {vid} is being deleted (.{base}.deleting exists); finish that with "
            f"'remotefs-aa volume delete {vid}' instead"
        )
        return result
    if parsed is not None and parsed.intent:
        problems.append(
            f"{chain.info_path} records an interrupted {parsed.intent.get('op')}; the next "
            f"operation on the volume finishes it. Nothing to repair"
        )
        return result
    raw = [base] if fmt == "raw" else None
    backing: dict[str, str | None] = {}
    for name in sorted(files):
        if name == base or not images.backing_allowed(vid, name):
            if name.startswith(f".{base}.") and not _CLAIM.match(name[len(base) + 2 :]):
                result.left_alone.append(name)
            continue
        try:
            chain.overlay_name(name[len(base) + 1 :])  # not a key .info reserves ("active")
        except exception.InvalidSnapshot:
            result.left_alone.append(name)
            continue
        try:
            backing[name] = chain.io.image_chain(chain.path(name), raw)[0].get("backing_file")
        except (exception.RemoteFSAAError, OSError) as exc:
            problems.append(f"cannot read the header of {name}: {exc}")
    if problems:
        return result
    backed = {b for b in backing.values() if b}
    tops = sorted(n for n in backing if n not in backed)
    if len(tops) > 1:
        problems.append(
            f"several overlays have nothing on top of them ({', '.join(tops)}), so the active "
            f"image cannot be told; an interrupted snapshot delete leaves its merged overlay "
            f"so. Inspect them (doc/chains.md, 'Repairing a .info file') and write the file "
            f"by hand"
        )
        return result
    walk = [tops[0]] if tops else [base]
    while walk[-1] != base:
        below = backing.get(walk[-1])
        if below is None or below in walk or (below != base and below not in backing):
            problems.append(
                f"{walk[-1]} is backed by {below!r}, not by another file of volume {vid}: "
                f"the chain does not reach {base}"
            )
            return result
        walk.append(below)
    result.chain = walk
    snapshots = {name[len(base) + 1 :]: name for name in walk if name != base}
    result.left_alone += sorted(n for n in backing if n not in walk)
    generation = 0
    if current is not None:
        seen = [int(g) for g in _GENERATION.findall(current)]
        generation = max(seen, default=0)
    # Above every generation claimed so far: the compare-and-swap refuses to
    # publish a generation whose claim exists (.<base>.gen.<N>).
    claimed = [
        int(m[1])
        for n in files
        if (m := _CLAIM.match(n[len(base) + 2 :] if n.startswith(f".{base}.") else ""))
    ]
    generation = max([generation, *claimed])
    state = ChainState(walk[0], snapshots, generation, fmt, raw=current)
    try:
        chain.trusted_chain(state)
    except exception.VolumeError as exc:
        problems.append(str(exc))
        return result
    if parsed and (parsed.active, parsed.snapshots, parsed.format) == (walk[0], snapshots, fmt):
        notes.append(f"{chain.info_path} already matches the images")
        result.state, result.proposed = state, current
        return result
    result.state = state
    result.proposed = dataclasses.replace(state, generation=generation + 1).render()
    how = "given" if base_format else ("from the current file" if parsed else "configured")
    notes.append(
        f"the base {base} is taken as {fmt} ({how}): its header is not probed, since a raw "
        f"volume's guest may have written a qcow2 header into it. If it was created "
        f"otherwise, run again with --base-format"
    )
    if result.left_alone:
        notes.append(
            f"not in the chain, left as they are: {', '.join(result.left_alone)} (the next "
            f"snapshot create, delete or revert removes overlays the .info file does not name)"
        )
    return result


def apply(chain: Chain, repair: RepairPlan) -> ChainState:
    """Write the planned text if the file still holds what the plan read (StaleInfoGeneration)."""
    if repair.problems or repair.state is None:
        raise exception.InvalidInfoFile(repair.info_path, "; ".join(repair.problems))
    return chain.save(repair.state, label="repair")
