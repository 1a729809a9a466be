"""A hostile service user against the privsep daemons: can it make root act outside allowed_paths?

The service runs as an unprivileged system user in ``[privileged] mode =
privsep`` with ``root_helper = sudo -n`` and a root-owned config (see
``tests/functional/unprivileged.py`` for the user, its venv and its sudo
rule). It calls the entrypoints of ``remotefs_aa.privsep.files`` / ``qemu`` /
``mount`` directly, with files it crafted itself under ``allowed_paths``,
and aims at victims: root-only files of random bytes in fresh root-owned
directories under ``/var/tmp`` (:class:`tests.functional.hostile.Victims`).

Each attack is one small function in :data:`ATTACKS` (``@attack(family,
name)``) and one test; it returns ``escaped`` with the evidence (a victim
changed, appeared or vanished, root opened a victim, the service read a
victim's bytes back, a hostile option was accepted) or ``refused`` with what
the entrypoint answered. Every test asserts "no escape"; the module prints
the whole table at the end, and the last test checks every victim byte for
byte. To adapt an attack to a changed entrypoint, edit its one call in the
snippet (the snippets run as the service user; their helpers are in
``hostile.AGENT``).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from tests.functional import hostile
from tests.functional.hostile import HostileService, VictimDir, Victims

pytestmark = pytest.mark.functional

MiB = 1 << 20
#: Seconds each rename-exchange race runs.
RACE_SECONDS = 3.0


@dataclass
class Row:
    family: str
    attack: str
    verdict: str  # "escaped", "refused" (or "inconclusive": nothing to judge)
    evidence: str


@dataclass
class Attack:
    family: str
    name: str
    run: Callable[[Env], tuple[str, str]]

    @property
    def id(self) -> str:
        return f"{self.family}:{self.run.__name__}"


ATTACKS: list[Attack] = []
RESULTS: list[Row] = []


def attack(family: str, name: str) -> Callable:
    """Register an attack: ``fn(env) -> (verdict, evidence)``."""

    def register(fn: Callable[[Env], tuple[str, str]]) -> Callable:
        ATTACKS.append(Attack(family, name, fn))
        return fn

    return register


@dataclass(repr=False)
class Env:
    """What every attack gets: the hostile service, the victims, the paths."""

    service: HostileService
    victims: Victims
    base: str  # root-owned, outside allowed_paths: config, coordination
    state: str  # state_path = the only allowed path
    play: str  # a directory under allowed_paths the service obtained for itself
    config: str
    uid: int
    gid: int
    venv: str

    def svc(self, code: str, timeout: float = 180, **params: object) -> object:
        return self.service.run(code, timeout=timeout, **params)


# -- verdicts -----------------------------------------------------------------


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def describe(answer: object) -> str:
    """One line for what the entrypoint(s) answered."""
    if isinstance(answer, dict) and "outcome" in answer:
        text = answer["outcome"]
        if "error" in answer:
            return f"{text}: {answer['error']}"
        if "value" in answer:
            return f"{text}: {json.dumps(answer['value'], default=repr)[:160]}"
        subs = {k: v for k, v in answer.items() if isinstance(v, dict) and "outcome" in v}
        subs.update(answer.get("calls", {}))
        if subs:
            return "; ".join(f"{k}: {describe(v)[:160]}" for k, v in subs.items())
        return text
    if isinstance(answer, dict):
        subs = {k: v for k, v in answer.items() if isinstance(v, dict) and "outcome" in v}
        if subs:
            return "; ".join(f"{k}: {describe(v)[:160]}" for k, v in subs.items())
    return json.dumps(answer, default=repr)[:300]


def judge(
    env: Env,
    victim: VictimDir,
    answer: object,
    leaks: list[str] | tuple[str, ...] = (),
    accepted: list[str] | tuple[str, ...] = (),
) -> tuple[str, str]:
    """Escaped if the victim changed, root opened one of its files, or ``leaks`` / ``accepted``."""
    opened = sorted(
        {
            f"{os.path.basename(path)} {what}"
            for path, what in env.victims.events()
            if path.startswith(victim.path + "/")
        }
    )
    changes = victim.changes()
    if len(changes) > 4:
        changes = [*changes[:4], f"and {len(changes) - 4} more changes"]
    proof = [*changes, *leaks, *accepted]
    if opened:
        proof.append(f"root touched victim files: {', '.join(opened)}")
    if proof:
        return "escaped", "; ".join(proof)
    return "refused", describe(answer)


def leaked(answer: object, victim: VictimDir, name: str = "secret", what: str = "") -> list[str]:
    """A leak if the service read back (sha ``answer['sha']``) the victim file's bytes."""
    if isinstance(answer, dict) and answer.get("sha") == _sha(victim.contents[name]):
        return [f"the service read the victim {victim.file(name)} back{what}"]
    return []


# -- setup --------------------------------------------------------------------

SETUP = """
play = state + "/play"
made = attempt(files.make_directory, play, 0o755)
owned = attempt(files.chown, play, os.getuid(), os.getgid())
result = {"made": made, "owned": owned, "uid": os.getuid(), "gid": os.getgid()}
"""
# The mount daemon starts later and inherits this cwd (through sudo), unless it
# changes it itself.
ENTER = """
os.chdir(play)
result = files.daemon_info()
"""


@pytest.fixture(scope="module")
def env(service_venv, service_user):
    base = tempfile.mkdtemp(prefix="rfsaa-attack-", dir="/var/tmp")
    os.chmod(base, 0o755)  # noqa: S103 - root-owned
    state, conf_dir, coord = (os.path.join(base, d) for d in ("state", "conf", "coord"))
    for directory in (state, conf_dir, coord):
        os.mkdir(directory)
        os.chmod(directory, 0o755)  # noqa: S103 - root-owned
    uid = int(subprocess.check_output(["id", "-u", service_user]))
    gid = int(subprocess.check_output(["id", "-g", service_user]))
    os.chown(coord, uid, gid)  # the service's own lock files (tooz file backend)
    config = os.path.join(conf_dir, "rfsaa.conf")
    with open(config, "w") as f:
        f.write(
            textwrap.dedent(
                f"""\
                [DEFAULT]
                state_path = {state}
                volume_driver = local
                [privileged]
                mode = privsep
                root_helper = sudo -n
                command_timeout = 60
                [coordination]
                backend_url = file://{coord}
                """
            )
        )
    os.chmod(config, 0o644)
    victims = Victims()
    service = None
    try:
        service = HostileService(service_user, service_venv, config)
        # A directory of its own under allowed_paths: the daemon makes and hands
        # it over. Should a fixed daemon refuse that, root makes it, as an
        # operator whose shares belong to the service user would.
        setup = service.run(SETUP, state=state)
        play = os.path.join(state, "play")
        if "refused" in (setup["made"]["outcome"], setup["owned"]["outcome"]):
            print(f"\n  the daemon would not hand the service a directory: {setup}")
            os.makedirs(play, exist_ok=True)
            os.chown(play, uid, gid)
        assert os.stat(play).st_uid == uid, setup
        service.run(ENTER)
        yield Env(service, victims, base, state, play, config, uid, gid, service_venv)
    finally:
        print_table({victims.root: "$VICTIMS", state: "$STATE"})
        if service is not None:
            service.stop()
        victims.cleanup()
        hostile.remove_tree(base)


def print_table(short: dict[str, str]) -> None:
    """The summary: one row per attack, then the full evidence of each escape."""
    if not RESULTS:
        return
    width = max(len(r.attack) for r in RESULTS)
    fam = max(len(r.family) for r in RESULTS)
    print("\n\nPrivileged attacks by a hostile service user (attack -> refused / escaped)")
    print("  " + ", ".join(f"{v} = {k}" for k, v in short.items()))
    print(f"{'family':<{fam}}  {'attack':<{width}}  verdict  evidence")

    def shorten(text: str) -> str:
        for long, abbrev in short.items():
            text = text.replace(long, abbrev)
        return text.replace("\n", " ")

    for r in RESULTS:
        evidence = shorten(r.evidence)
        evidence = evidence if len(evidence) <= 150 else evidence[:147] + "..."
        print(f"{r.family:<{fam}}  {r.attack:<{width}}  {r.verdict:<7}  {evidence}")
    escaped = [r for r in RESULTS if r.verdict == "escaped"]
    print(f"\n{len(escaped)} of {len(RESULTS)} attacks escaped")
    for r in escaped:
        print(f"  ESCAPED {r.family} / {r.attack}:\n      {shorten(r.evidence)}")


# -- 1. a backing file outside allowed_paths -----------------------------------

CONVERT = """
import re
# A name the daemon accepts for a new file (a conversion file), readable by the service
# whoever owns it: otherwise the destination is refused before the source chain matters.
out = f"{play}/image-" + re.sub(r"[^A-Za-z0-9_-]", "-", os.path.basename(top)) + ".1.1"
result = attempt(qemu.qemu_img_convert, top, top_fmt, out, "raw", mode=0o644)
if result["outcome"] == "done":
    result["chmod"] = attempt(files.chmod, out, 0o644)
    with open(out, "rb") as f:
        data = f.read()
    result["sha"] = digest(data[:size])
    if marker:
        result["marker_found"] = marker.encode() in data
"""


def convert_and_read(env: Env, build: str, **params: object) -> object:
    """``build`` makes ``top`` (qcow2); convert it to raw through the daemon, read it back."""
    params.setdefault("size", MiB)
    params.setdefault("marker", "")
    return env.svc(build + "\ntop_fmt = 'qcow2'\n" + CONVERT, **params)


@attack("backing", "qemu_img_commit: overlay whose backing file is a root-only file outside")
def commit_absolute(env):
    v = env.victims.make("commit-absolute")
    answer = env.svc(
        """
        ov = overlay(f"{play}/commit-absolute.qcow2", victim, pattern=0x41)
        result = attempt(qemu.qemu_img_commit, ov, "qcow2")
        """,
        victim=v.file("secret"),
    )
    return judge(env, v, answer)


@attack("backing", "qemu_img_convert: backing file outside, copied into the share")
def convert_absolute(env):
    v = env.victims.make("convert-absolute")
    build = 'top = overlay(f"{play}/convert-absolute.qcow2", victim)'
    answer = convert_and_read(env, build, victim=v.file("secret"))
    return judge(env, v, answer, leaked(answer, v, what=" from the converted copy"))


@attack("backing", "qemu_img_rebase (safe): old backing outside, its data copied in")
def rebase_absolute(env):
    v = env.victims.make("rebase-absolute")
    answer = env.svc(
        """
        ov = overlay(f"{play}/rebase-absolute.qcow2", victim)
        with open(f"{play}/zero.raw", "wb") as f:
            f.truncate(MiB)
        result = attempt(qemu.qemu_img_rebase, ov, "zero.raw", "raw")
        if result["outcome"] == "done":
            result["sha"] = digest(extract(ov))
        """,
        victim=v.file("secret"),
    )
    return judge(env, v, answer, leaked(answer, v, what=" from the rebased overlay"))


@attack("backing", "qemu_img_resize: overlay with backing file outside")
def resize_absolute(env):
    v = env.victims.make("resize-absolute")
    answer = env.svc(
        """
        ov = overlay(f"{play}/resize-absolute.qcow2", victim)
        result = attempt(qemu.qemu_img_resize, ov, "qcow2", 2 * MiB)
        """,
        victim=v.file("secret"),
    )
    return judge(env, v, answer)


@attack("backing", "qemu_img_info --backing-chain: backing file outside")
def info_absolute(env):
    v = env.victims.make("info-absolute")
    answer = env.svc(
        """
        ov = overlay(f"{play}/info-absolute.qcow2", victim)
        result = attempt(qemu.qemu_img_info, ov, "qcow2", backing_chain=True)
        """,
        victim=v.file("secret"),
    )
    told = []
    if answer["outcome"] == "done" and len(answer["value"]) > 1:
        below = answer["value"][1]
        told.append(
            f"info answered for the victim: {below.get('filename')} "
            f"format {below.get('format')} virtual-size {below.get('virtual-size')}"
        )
    return judge(env, v, answer, told)


@attack("backing", "qemu_img_check: backing file outside")
def check_absolute(env):
    v = env.victims.make("check-absolute")
    answer = env.svc(
        """
        ov = overlay(f"{play}/check-absolute.qcow2", victim)
        result = attempt(qemu.qemu_img_check, ov, "qcow2")
        """,
        victim=v.file("secret"),
    )
    return judge(env, v, answer)


@attack("backing", "write_pattern (qemu-io): a partial-cluster write copies the backing in")
def write_pattern_absolute(env):
    v = env.victims.make("write-pattern-absolute")
    answer = env.svc(
        """
        ov = overlay(f"{play}/write-pattern.qcow2", victim)
        result = attempt(qemu.write_pattern, ov, "qcow2", 0, 512, 0x42)
        if result["outcome"] == "done":
            result["sha"] = digest(extract(ov, start=512, length=65536 - 512))
        """,
        victim=v.file("secret"),
    )
    proof = []
    if answer.get("sha") == _sha(v.contents["secret"][512:65536]):
        proof.append("copy-on-write put 63.5 KiB of the victim into the service's overlay")
    return judge(env, v, answer, proof)


@attack("backing", "pattern_matches (qemu-io -r): a byte oracle on the backing file")
def pattern_oracle_absolute(env):
    v = env.victims.make("pattern-oracle")
    answer = env.svc(
        """
        ov = overlay(f"{play}/oracle.qcow2", victim)
        found, result = [], None
        for offset in range(2):
            for byte in range(256):
                r = attempt(qemu.pattern_matches, ov, "qcow2", offset, 1, byte)
                if r["outcome"] != "done":
                    result = r
                    break
                if r["value"]:
                    found.append(byte)
                    break
            if result:
                break
        result = result or {"outcome": "done", "bytes": found}
        """,
        victim=v.file("secret"),
    )
    proof = []
    if answer.get("bytes") == list(v.contents["secret"][:2]):
        proof.append(f"the oracle gave the victim's first bytes {bytes(answer['bytes']).hex()}")
    return judge(env, v, answer, proof)


@attack("backing", "image_chain: header walk of an overlay whose backing file is outside")
def image_chain_absolute(env):
    v = env.victims.make("image-chain")
    answer = env.svc(
        """
        ov = overlay(f"{play}/image-chain.qcow2", victim)
        os.symlink(victim, f"{play}/image-chain-link")
        deep = overlay(f"{play}/image-chain-deep.qcow2", "image-chain-link")
        result = {"outcome": "done", "absolute": attempt(qemu.image_chain, ov),
                  "symlink": attempt(qemu.image_chain, deep),
                  "raw-listed": attempt(qemu.image_chain, ov, ["x"])}
        """,
        victim=v.file("secret"),
    )
    return judge(env, v, answer)


@attack("backing", "volume_state: a hostile .info, a chain out, a symlinked base")
def volume_state_hostile(env):
    v = env.victims.make("volume-state")
    answer = env.svc(
        """
        folder = f"{play}/vs"
        os.mkdir(folder)
        os.symlink(victim, f"{folder}/volume-vs")
        overlay(f"{folder}/volume-vs.s1", victim)
        with open(f"{folder}/volume-vs.info", "w") as f:
            json.dump({"active": "volume-vs.s1", "format": "qcow2", "generation": 1}, f)
        os.symlink(victim, f"{folder}/volume-vt.info")
        result = {"outcome": "done",
                  "chain-out": attempt(qemu.volume_state, folder, "volume-vs", "raw"),
                  "info-link": attempt(qemu.volume_state, folder, "volume-vt", "raw")}
        """,
        victim=v.file("secret"),
    )
    proof = []
    info = answer["info-link"]
    if info["outcome"] == "done" and info["value"].get("info"):
        proof.append("volume_state returned the text of a .info symlinked outside")
    return judge(env, v, answer, proof)


# -- 2. variants: symlinks, deep chains, json:, probing, data files, encryption --


@attack("variants", "qemu_img_commit: backing file = a symlink in the share pointing outside")
def commit_symlink(env):
    v = env.victims.make("commit-symlink")
    answer = env.svc(
        """
        os.symlink(victim, f"{play}/commit-link")
        ov = overlay(f"{play}/commit-symlink.qcow2", "commit-link", pattern=0x41)
        result = attempt(qemu.qemu_img_commit, ov, "qcow2")
        """,
        victim=v.file("secret"),
    )
    return judge(env, v, answer)


@attack("variants", "qemu_img_convert: backing file = a symlink in the share pointing outside")
def convert_symlink(env):
    v = env.victims.make("convert-symlink")
    build = """
os.symlink(victim, f"{play}/convert-link")
top = overlay(f"{play}/convert-symlink.qcow2", "convert-link")
"""
    answer = convert_and_read(env, build, victim=v.file("secret"))
    return judge(env, v, answer, leaked(answer, v, what=" from the converted copy"))


@attack("variants", "qemu_img_create / rebase naming a symlinked backing file")
def create_on_symlink(env):
    v = env.victims.make("create-symlink")
    answer = env.svc(
        """
        os.symlink(victim, f"{play}/create-link")
        with open(f"{play}/create-ok.raw", "wb") as f:
            f.truncate(MiB)
        ok = overlay(f"{play}/create-rebase.qcow2", "create-ok.raw")
        result = {"outcome": "done",
                  "create": attempt(qemu.qemu_img_create, f"{play}/create-new.qcow2", "qcow2",
                                    MiB, backing_file="create-link", backing_fmt="raw"),
                  "create-probe": attempt(qemu.qemu_img_create, f"{play}/create-new2.qcow2",
                                          "qcow2", None, backing_file="create-link",
                                          backing_fmt="raw"),
                  "rebase": attempt(qemu.qemu_img_rebase, ok, "create-link", "raw")}
        """,
        victim=v.file("secret"),
    )
    accepted = [k for k in ("create", "create-probe", "rebase") if answer[k]["outcome"] == "done"]
    return judge(
        env, v, answer, [f"accepted a symlinked backing file: {accepted}"] * bool(accepted)
    )


@attack("variants", "qemu_img_convert: two-deep chain, only the second link points outside")
def convert_deep(env):
    v = env.victims.make("convert-deep")
    build = """
overlay(f"{play}/deep-1.qcow2", victim)
top = overlay(f"{play}/deep-2.qcow2", "deep-1.qcow2", fmt="qcow2")
"""
    answer = convert_and_read(env, build, victim=v.file("secret"))
    return judge(env, v, answer, leaked(answer, v, what=" through the second link"))


@attack("variants", "qemu_img_info --backing-chain: two-deep chain, second link outside")
def info_deep(env):
    v = env.victims.make("info-deep")
    answer = env.svc(
        """
        overlay(f"{play}/info-deep-1.qcow2", victim)
        top = overlay(f"{play}/info-deep-2.qcow2", "info-deep-1.qcow2", fmt="qcow2")
        result = attempt(qemu.qemu_img_info, top, "qcow2", backing_chain=True)
        """,
        victim=v.file("secret"),
    )
    return judge(env, v, answer)


def _json_backing(path: str) -> str:
    return "json:" + json.dumps({"driver": "raw", "file": {"driver": "file", "filename": path}})


@attack("variants", "qemu_img_create without a size: backing overlay in the share, its own out")
def create_without_size(env):
    v = env.victims.make("create-no-size")
    answer = env.svc(
        """
        overlay(f"{play}/no-size-1.qcow2", victim)
        result = attempt(qemu.qemu_img_create, f"{play}/no-size-2.qcow2", "qcow2", None,
                         backing_file="no-size-1.qcow2", backing_fmt="qcow2")
        """,
        victim=v.file("secret"),
    )
    return judge(env, v, answer)


@attack("variants", "backing file = nbd+unix:// URL of a root-only socket (root connects)")
def backing_unix_socket(env):
    v = env.victims.make("nbd-socket", {}, dir_mode=0o700)
    listener = hostile.UnixListener(v.file("root-only.sock"))
    v.before = v.snapshot()
    env.victims.events()  # the listener's own creation is not the daemon's doing
    try:
        build = 'top = overlay(f"{play}/nbd-unix.qcow2", url)'
        answer = convert_and_read(env, build, url=f"nbd+unix:///x?socket={listener.path}")
    finally:
        listener.close()
    proof = [
        f"pid {pid} (uid {uid}) connected to the root-only socket {listener.path} for the service"
        for pid, uid, _gid in listener.peers[:2]
    ]
    return judge(env, v, answer, proof)


@attack("variants", "qemu_img_commit: backing file = json:{driver raw, file: the victim}")
def commit_json(env):
    v = env.victims.make("commit-json")
    answer = env.svc(
        """
        ov = overlay(f"{play}/commit-json.qcow2", spec, pattern=0x41)
        result = attempt(qemu.qemu_img_commit, ov, "qcow2")
        """,
        spec=_json_backing(v.file("secret")),
    )
    return judge(env, v, answer)


@attack("variants", "qemu_img_convert: backing file = json:{driver raw, file: the victim}")
def convert_json(env):
    v = env.victims.make("convert-json")
    build = 'top = overlay(f"{play}/convert-json.qcow2", spec)'
    answer = convert_and_read(env, build, spec=_json_backing(v.file("secret")))
    return judge(env, v, answer, leaked(answer, v, what=" through a json: backing file"))


@attack("variants", "qemu_img_convert: json: backing file = vvfat of a whole root-only directory")
def convert_vvfat(env):
    marker = "RFSAA-VVFAT-" + os.urandom(8).hex()
    v = env.victims.make("convert-vvfat", {"notes.txt": marker.encode() + os.urandom(4096)})
    spec = "json:" + json.dumps(
        {"driver": "raw", "file": {"driver": "vvfat", "dir": v.path, "fat-type": 16}}
    )
    build = 'top = overlay(f"{play}/convert-vvfat.qcow2", spec, size=500 * MiB)'
    answer = convert_and_read(env, build, spec=spec, marker=marker)
    proof = []
    if answer.get("marker_found"):
        proof.append("the directory's files, as a FAT image, copied into the share and read")
    return judge(env, v, answer, proof)


@attack("variants", "qemu_img_convert: no backing format, the raw base is a qcow2 pointing out")
def convert_probe(env):
    v = env.victims.make("convert-probe")
    build = """
overlay(f"{play}/probe-base", victim)   # a raw file by our records; its bytes say qcow2
top = overlay(f"{play}/probe-top.qcow2", "probe-base", fmt=None)
"""
    answer = convert_and_read(env, build, victim=v.file("secret"))
    return judge(env, v, answer, leaked(answer, v, what=" after qemu probed the base"))


@attack("variants", "qemu_img_info without a format: a raw file holding a qcow2 header")
def info_probe(env):
    v = env.victims.make("info-probe")
    answer = env.svc(
        """
        overlay(f"{play}/probe-info", victim)
        result = attempt(qemu.qemu_img_info, f"{play}/probe-info", None, backing_chain=True)
        """,
        victim=v.file("secret"),
    )
    return judge(env, v, answer)


DATA_FILE = """
holder = "x" * len(victim)   # a relative name as long as the victim's path
path = f"{play}/{name}.qcow2"
sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={holder}", path, str(MiB))
# Allocate every cluster while the data file is our own: each maps to the same offset there.
sh("qemu-io", "-f", "qcow2", "-c", f"write -P 0x44 0 {MiB}", path)
replace_bytes(path, holder, victim)
"""


@attack("variants", "write_pattern: qcow2 whose external data file is the victim")
def data_file_write(env):
    v = env.victims.make("data-file-write")
    answer = env.svc(
        DATA_FILE + 'result = attempt(qemu.write_pattern, path, "qcow2", 0, 65536, 0x43)',
        victim=v.file("secret"),
        name="data-write",
    )
    return judge(env, v, answer)


@attack("variants", "qemu_img_convert: qcow2 whose external data file is the victim")
def data_file_convert(env):
    v = env.victims.make("data-file-convert")
    answer = convert_and_read(
        env, DATA_FILE + "top = path", victim=v.file("secret"), name="data-convert"
    )
    return judge(env, v, answer, leaked(answer, v, what=" through the data file"))


@attack("variants", "qemu_img_resize: qcow2 whose external data file is the victim")
def data_file_resize(env):
    v = env.victims.make("data-file-resize")
    answer = env.svc(
        DATA_FILE + 'result = attempt(qemu.qemu_img_resize, path, "qcow2", 4 * MiB)',
        victim=v.file("secret"),
        name="data-resize",
    )
    return judge(env, v, answer)


@attack("variants", "encrypted (LUKS) qcow2: info / check / resize / convert")
def encrypted(env):
    v = env.victims.make("encrypted")
    answer = env.svc(
        """
        path = f"{play}/encrypted.qcow2"
        new = ["qemu-img", "create", "-q", "-f", "qcow2", "--object", "secret,id=s0,data=hunter2"]
        # LUKS benchmarks PBKDF2 by thread CPU time, which some VMs cannot measure
        # ("Unable to get accurate CPU usage"); the old AES encryption needs none.
        if sh(*new, "-o", "encrypt.format=luks,encrypt.key-secret=s0", path, str(MiB),
              check=False)["rc"] != 0:
            sh(*new, "-o", "encrypt.format=aes,encrypt.key-secret=s0", path, str(MiB))
        result = {"outcome": "done",
                  "info": attempt(qemu.qemu_img_info, path, "qcow2"),
                  "check": attempt(qemu.qemu_img_check, path, "qcow2"),
                  "resize": attempt(qemu.qemu_img_resize, path, "qcow2", 2 * MiB),
                  "convert": attempt(qemu.qemu_img_convert, path, "qcow2",
                                     f"{play}/encrypted.out", "raw")}
        """
    )
    accepted = [k for k in ("info", "check", "resize", "convert") if answer[k]["outcome"] == "done"]
    proof = [f"qemu-img ran on an encrypted image instead of a refusal: {accepted}"] * bool(
        accepted
    )
    return judge(env, v, answer, proof)


@attack("variants", "a hard link to the victim in the share, then chmod/chown")
def hard_link(env):
    v = env.victims.make("hard-link")
    answer = env.svc(
        """
        try:
            os.link(victim, f"{play}/hard-link")
        except OSError as exc:
            result = {"outcome": "refused", "error": f"link(2): {exc} (fs.protected_hardlinks)"}
        else:
            result = {"outcome": "done",
                      "chmod": attempt(files.chmod, f"{play}/hard-link", 0o666),
                      "chown": attempt(files.chown, f"{play}/hard-link", os.getuid(), -1)}
        """,
        victim=v.file("secret"),
    )
    return judge(env, v, answer)


# -- 3. symlinked directories and top paths --------------------------------------


@attack("symlinks", "paths through a directory symlink (and ..) pointing at a victim directory")
def directory_symlink(env):
    v = env.victims.make("dir-symlink", {"secret": 4096, "text": b"root only\n"})
    answer = env.svc(
        """
        link = f"{play}/dir-link"
        os.symlink(victim_dir, link)
        dotdot = play + "/.." * play.count("/") + victim_dir
        calls = {
            "make_directory": attempt(files.make_directory, f"{link}/newdir"),
            "truncate": attempt(files.truncate, f"{link}/secret", 1),
            "fallocate": attempt(files.fallocate, f"{link}/new", 4096),
            "chmod": attempt(files.chmod, f"{link}/secret", 0o666),
            "chown": attempt(files.chown, f"{link}/secret", os.getuid(), os.getgid()),
            "unlink": attempt(files.unlink, f"{link}/secret"),
            "unlink_many": attempt(files.unlink_many, link, ["secret"]),
            "write_file_atomic": attempt(files.write_file_atomic, f"{link}/new", "x"),
            "replace_file_if": attempt(files.replace_file_if, f"{link}/new2", "x", None),
            "read_file": attempt(files.read_file, f"{link}/text"),
            "list_directory": attempt(files.list_directory, link),
            "rename": attempt(files.rename, f"{link}/secret", f"{link}/moved"),
            "qemu_img_create": attempt(qemu.qemu_img_create, f"{link}/new.raw", "raw", MiB),
            "qemu_img_info": attempt(qemu.qemu_img_info, f"{link}/secret", "raw"),
            "dotdot chmod": attempt(files.chmod, f"{dotdot}/secret", 0o666),
        }
        result = {"outcome": "done", "calls": calls}
        """,
        victim_dir=v.path,
    )
    done = [k for k, r in answer["calls"].items() if r["outcome"] != "refused"]
    return judge(env, v, answer, [f"not refused: {done}"] * bool(done))


@attack("symlinks", "the top path itself a symlink to a victim file")
def top_symlink(env):
    v = env.victims.make("top-symlink", {"secret": 4096, "text": b"root only\n"})
    answer = env.svc(
        """
        link, text = f"{play}/top-link", f"{play}/top-text"
        with open(f"{play}/zero.raw", "wb") as f:   # the convert source (whatever ran before)
            f.truncate(MiB)
        os.symlink(victim_dir + "/text", text)

        def fresh():
            # the link, as it was before (an earlier call may have replaced it)
            if os.path.lexists(link):
                os.unlink(link)
            os.symlink(victim_dir + "/secret", link)
            return link

        calls = {
            "truncate": attempt(files.truncate, fresh(), 1),
            "chmod": attempt(files.chmod, fresh(), 0o666),
            "chown": attempt(files.chown, fresh(), os.getuid(), os.getgid()),
            "unlink": attempt(files.unlink, fresh()),
            "write_file_atomic": attempt(files.write_file_atomic, fresh(), "x"),
            "read_file": attempt(files.read_file, text),
            "qemu_img_info": attempt(qemu.qemu_img_info, fresh(), "raw"),
            "qemu_img_resize": attempt(qemu.qemu_img_resize, fresh(), "raw", 2 * MiB),
            "qemu_img_convert src": attempt(qemu.qemu_img_convert, fresh(), "raw",
                                            f"{play}/top-out.raw", "raw"),
            "qemu_img_convert dst": attempt(qemu.qemu_img_convert, f"{play}/zero.raw", "raw",
                                            fresh(), "raw"),
            "write_pattern": attempt(qemu.write_pattern, fresh(), "raw", 0, 512, 1),
            "image_chain": attempt(qemu.image_chain, fresh()),
        }
        result = {"outcome": "done", "calls": calls}
        """,
        victim_dir=v.path,
    )
    # unlink and an atomic replace act on the name itself (the service's own
    # link), never through it; whether the victim changed is judged below.
    on_the_link = {"unlink", "write_file_atomic"}
    done = [
        k for k, r in answer["calls"].items() if r["outcome"] != "refused" and k not in on_the_link
    ]
    return judge(env, v, answer, [f"not refused: {done}"] * bool(done))


@attack("symlinks", "a share / mount point that is a symlink to a victim directory")
def share_symlink(env):
    v = env.victims.make("share-symlink", {"secret": 4096}, subdirs=("mnt",))
    answer = env.svc(
        """
        link = f"{play}/share-link"
        os.symlink(victim_dir, link)
        calls = {
            "mount tmpfs on it": attempt(mount.mount, "tmpfs", "tmpfs", link, ["size=1m"]),
            "mount tmpfs below it": attempt(mount.mount, "tmpfs", "tmpfs", f"{link}/mnt"),
            "bind it": attempt(mount.mount, "none", link, f"{play}/share-bind", ["bind"]),
            "bind the victim": attempt(mount.mount, "none", victim_dir, f"{play}/share-bind",
                                       ["bind"]),
            "umount": attempt(mount.umount, f"{link}/mnt"),
            "volume_state": attempt(qemu.volume_state, link, "secret", "raw"),
            "list_directory": attempt(files.list_directory, link),
        }
        result = {"outcome": "done", "calls": calls, "mounts": mounts_under(victim_dir)}
        """,
        victim_dir=v.path,
    )
    done = [k for k, r in answer["calls"].items() if r["outcome"] != "refused"]
    proof = [f"not refused: {done}"] * bool(done)
    proof += [f"mounted over the victim: {answer['mounts']}"] * bool(answer["mounts"])
    hostile.release_mounts(v.path)
    return judge(env, v, answer, proof)


# -- 4. rename-exchange races ------------------------------------------------------

RACE_FILES = {
    "target": 4096,
    "volume-target": 4096,  # a volume's image name: the file entrypoints refuse other names
    "text": b"root-only text\n",
    "a": 4096,
    "b": 4096,
    "only-in-victim": 16,  # a name the service's own directory never has
}

RACE = """
top = f"{play}/race-{label}"
os.mkdir(top)
d, s = top + "/d", top + "/s"
os.mkdir(d)
os.symlink(victim_dir, s)
for n in ("volume-target", "target", "text", "a", "b"):
    content = b"mine"
    with open(f"{d}/{n}", "wb") as f:
        f.write(content)
os.mkdir(f"{d}/mnt")
dir_fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
leaks, mounted = [], []
exec(before_code)

def fn():
    return eval(call)

def after(r):
    exec(after_code)

stats = race(d, s, fn, seconds, after)
os.close(dir_fd)
result = {"outcome": "done", "race": stats, "leaks": leaks[:3],
          "mounts": sorted(set(mounted + mounts_under(victim_dir)))}
"""

#: name -> (the call, run in a loop with ``d`` the swapped directory; what to do after each).
RACES: dict[str, tuple[str, str]] = {
    "truncate": ("files.truncate(d + '/volume-target', 1)", ""),
    "fallocate": ("files.fallocate(d + '/volume-newfile', 4096)", ""),
    "chown": ("files.chown(d + '/target', os.getuid(), os.getgid())", ""),
    "chmod": ("files.chmod(d + '/target', 0o666)", ""),
    "unlink": ("files.unlink(d + '/target')", ""),
    "unlink_many": ("files.unlink_many(d, ['a'])", ""),
    "write_file_atomic": ("files.write_file_atomic(d + '/target', 'pwned', 0o666, False)", ""),
    "make_directory": ("files.make_directory(d + '/newdir')", ""),
    "rename": (
        "files.rename(d + '/a', d + '/b')",
        "os.close(os.open('a', os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=dir_fd))",
    ),
    "replace_file_if": ("files.replace_file_if(d + '/newfile', 'pwned', None, 0o666, False)", ""),
    "read_file": (
        "files.read_file(d + '/text')",
        "r.get('value') not in (None, 'mine') and leaks.append(r['value'])",
    ),
    "list_directory": (
        "files.list_directory(d)",
        "r.get('value') and 'only-in-victim' in r['value'] and leaks.append(r['value'])",
    ),
    "qemu_img_create": ("qemu.qemu_img_create(d + '/volume-new', 'raw', 512)", ""),
    "mount": (
        "mount.mount('tmpfs', 'tmpfs', d + '/mnt', ['size=1m'])",
        "if r.get('value'):\n"
        "    mounted.extend(mounts_under(victim_dir))\n"
        "    attempt(mount.umount, d + '/mnt')",
    ),
}


def _race_attack(label: str, call: str, after: str) -> Callable[[Env], tuple[str, str]]:
    def run(env: Env) -> tuple[str, str]:
        v = env.victims.make(f"race-{label}", RACE_FILES, subdirs=("mnt",), dir_mode=0o700)
        answer = env.svc(
            RACE,
            timeout=RACE_SECONDS + 120,
            label=label,
            call=call,
            after_code=after or "pass",
            before_code="pass",
            victim_dir=v.path,
            seconds=RACE_SECONDS,
        )
        stats = answer["race"]
        proof = []
        if answer["leaks"]:
            proof.append(f"the service got victim data: {str(answer['leaks'])[:200]}")
        mounts = sorted(set(answer["mounts"] + hostile.mounts_under(v.path)))
        if mounts:
            proof.append(f"tmpfs mounted over the victim's {mounts}")
        hostile.release_mounts(v.path)
        verdict, evidence = judge(env, v, answer, proof)
        tally = f"[{stats['calls']} calls, {stats['swaps']} swaps, {stats['outcomes']}]"
        if verdict == "refused":
            evidence = f"{tally} {json.dumps(stats['errors'])[:300]}"
        return verdict, f"{tally} {evidence}"

    run.__name__ = f"race_{label}"
    return run


for _label, (_call, _after) in RACES.items():
    attack("race", f"renameat2 exchange of the parent directory during {_label}")(
        _race_attack(_label, _call, _after)
    )


@attack("race", "renameat2 exchange of the parent directory during umount")
def race_umount(env):
    """The service's own tmpfs at d/mnt; root's at <victim>/mnt holds a marker file."""
    v = env.victims.make("race-umount", RACE_FILES, subdirs=("mnt",), dir_mode=0o700)
    point = v.file("mnt")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", point], check=True)
    try:
        with open(os.path.join(point, "marker"), "w") as f:
            f.write("root's own mount\n")
        v.before = v.snapshot()
        env.victims.events()
        answer = env.svc(
            RACE,
            timeout=RACE_SECONDS + 120,
            label="umount",
            call="mount.umount(d + '/mnt')",
            before_code="mount.mount('tmpfs', 'tmpfs', d + '/mnt', ['size=1m'])",
            after_code="if r.get('value'):\n"
            "    attempt(mount.mount, 'tmpfs', 'tmpfs', d + '/mnt', ['size=1m'])",
            victim_dir=v.path,
            seconds=RACE_SECONDS,
        )
        proof = []
        if not os.path.exists(os.path.join(point, "marker")):
            proof.append(f"root's tmpfs at {point} is gone (unmounted, or covered by another)")
        extra = [m for m in hostile.mounts_under(v.path) if m != point]
        if len(hostile.mounts_under(v.path)) != 1 or extra:
            proof.append(f"mounts on the victim now: {hostile.mounts_under(v.path)}")
        # Judged while root's own tmpfs is still mounted there (releasing it
        # below changes what the victim directory shows).
        verdict, evidence = judge(env, v, answer, proof)
    finally:
        hostile.release_mounts(v.path)
        v.before = v.snapshot()  # unmounting root's own tmpfs is this test's doing
    hostile.release_mounts(os.path.join(env.play, "race-umount"))
    stats = answer["race"]
    tally = f"[{stats['calls']} calls, {stats['swaps']} swaps, {stats['outcomes']}]"
    if verdict == "refused":
        evidence = json.dumps(stats["errors"])[:300]
    return verdict, f"{tally} {evidence}"


# -- 5. mount options and shares ------------------------------------------------------


def _mount_attack(
    env: Env, victim: VictimDir, code: str, options_hostile: bool = True, **params: object
) -> tuple[str, str]:
    """Run a mount snippet; unmount whatever it left under the service's directory.

    ``options_hostile``: every call in the snippet passes something hostile, so one the
    mount command ran with (done or failed) is an escape in itself; otherwise
    only the victim's evidence counts (and a read-back of its ``text``).
    """
    try:
        answer = env.svc(code, victim_dir=victim.path, **params)
    finally:
        hostile.release_mounts(env.play)
    proof = []
    for key, r in answer.items():
        if key.startswith("umount") or not isinstance(r, dict):
            continue
        # "done" or "failed": the mount command ran with it; "error" never got that far.
        if options_hostile and r.get("outcome") in ("done", "failed"):
            proof.append(f"{key} accepted ({r['outcome']}: {r.get('error', r.get('value'))})"[:300])
    read = answer.get("read through it", {})
    if read.get("outcome") == "done" and read["value"].encode() == victim.contents.get("text"):
        proof.append(f"the service read {victim.file('text')} through the mount")
    return judge(env, victim, answer, proof)


@attack("mount", "glusterfs option log-file=<victim dir>/x (root writes the log)")
def mount_log_file(env):
    v = env.victims.make("mount-log-file", {})
    return _mount_attack(
        env,
        v,
        """
        os.mkdir(f"{play}/mnt-log")
        result = {"mount": attempt(mount.mount, "glusterfs", "127.0.0.1:/rfsaa-none",
                                   f"{play}/mnt-log", [f"log-file={victim_dir}/gluster.log"])}
        """,
    )


@attack("mount", "glusterfs option dump-fuse=<victim dir>/x")
def mount_dump_fuse(env):
    v = env.victims.make("mount-dump-fuse", {})
    return _mount_attack(
        env,
        v,
        """
        os.mkdir(f"{play}/mnt-dump")
        result = {"mount": attempt(mount.mount, "glusterfs", "127.0.0.1:/rfsaa-none",
                                   f"{play}/mnt-dump", [f"dump-fuse={victim_dir}/fuse.dump"])}
        """,
    )


VOLFILE = """
volume posix
    type storage/posix
    option directory {victim_dir}
end-volume
"""


@attack("mount", "glusterfs with an absolute share: a volfile the service wrote, serving a victim")
def mount_local_volfile(env):
    v = env.victims.make("mount-volfile", {"secret": 4096, "text": b"root only: volfile\n"})
    return _mount_attack(
        env,
        v,
        """
        with open(f"{play}/evil.vol", "w") as f:
            f.write(volfile.format(victim_dir=victim_dir))
        point = f"{play}/mnt-volfile"
        os.mkdir(point)
        result = {"mount": attempt(mount.mount, "glusterfs", f"{play}/evil.vol", point)}
        if result["mount"]["outcome"] == "done":
            result["read through it"] = attempt(files.read_file, point + "/text")
            result["umount"] = attempt(mount.umount, point)
        """,
        options_hostile=False,
        volfile=VOLFILE,
    )


@attack("mount", "glusterfs share host:vol that is also a file in the daemon's cwd (a volfile)")
def mount_cwd_volfile(env):
    v = env.victims.make("mount-cwd-volfile", {"secret": 4096, "text": b"root only: cwd\n"})
    return _mount_attack(
        env,
        v,
        """
        with open(f"{play}/evil:vol", "w") as f:   # the daemon runs in our cwd, through sudo
            f.write(volfile.format(victim_dir=victim_dir))
        point = f"{play}/mnt-cwd"
        os.mkdir(point)
        result = {"mount": attempt(mount.mount, "glusterfs", "evil:vol", point)}
        if result["mount"]["outcome"] == "done":
            result["read through it"] = attempt(files.read_file, point + "/text")
            result["umount"] = attempt(mount.umount, point)
        """,
        options_hostile=False,
        volfile=VOLFILE,
    )


@attack("mount", "a forbidden option smuggled after a comma inside one item")
def mount_comma(env):
    v = env.victims.make("mount-comma", {})
    return _mount_attack(
        env,
        v,
        """
        point = f"{play}/mnt-comma"
        os.mkdir(point)
        os.mkdir(f"{play}/mnt-comma2")
        result = {"X-mount.mkdir after a comma": attempt(
            mount.mount, "tmpfs", "tmpfs", point, ["size=1m,X-mount.mkdir"])}
        attempt(mount.umount, point)
        result["log-file after a comma"] = attempt(
            mount.mount, "glusterfs", "127.0.0.1:/rfsaa-none", f"{play}/mnt-comma2",
            [f"log-level=INFO,log-file={victim_dir}/comma.log"])
        """,
    )


@attack("mount", "options with spaces, a leading '-', '--', shell characters; a '-' share")
def mount_malformed(env):
    v = env.victims.make("mount-malformed", {})
    return _mount_attack(
        env,
        v,
        """
        point = f"{play}/mnt-malformed"
        os.mkdir(point)
        result = {}
        for opt in ["-o", "--bind", "size=1m -o bind", "a;b", "x=$(id)", "size=1m\\tmode=777",
                    "helper=/bin/sh", "uhelper=x", f"log-file {victim_dir}/x"]:
            result[repr(opt)] = attempt(mount.mount, "tmpfs", "tmpfs", point, [opt])
            attempt(mount.umount, point)
        result["share -o"] = attempt(mount.mount, "glusterfs", "-oremount", point)
        result["share with space"] = attempt(mount.mount, "glusterfs", "h:/v -o x", point)
        result["fstype ext4"] = attempt(mount.mount, "ext4", "/dev/null", point)
        """,
    )


@attack("mount", "tmpfs mounts outside allowed_paths (direct, '..', the base itself)")
def mount_outside(env):
    v = env.victims.make("mount-outside", {"secret": 16}, subdirs=("mnt",))
    answer_proof = _mount_attack(
        env,
        v,
        """
        dotdot = play + "/.." * play.count("/") + victim_dir
        result = {
            "victim dir": attempt(mount.mount, "tmpfs", "tmpfs", victim_dir + "/mnt"),
            "dotdot": attempt(mount.mount, "tmpfs", "tmpfs", dotdot + "/mnt"),
            "allowed base": attempt(mount.mount, "tmpfs", "tmpfs", state),
        }
        """,
        state=env.state,
    )
    if hostile.mounts_under(v.path) or hostile.mounts_under(env.state):
        hostile.release_mounts(v.path)
    return answer_proof


# -- 6. capabilities of the daemon's children --------------------------------------

CAP_NAMES = {0: "CHOWN", 1: "DAC_OVERRIDE", 2: "DAC_READ_SEARCH", 3: "FOWNER", 21: "SYS_ADMIN"}


def _caps(mask: str) -> str:
    value = int(mask, 16)
    names = [CAP_NAMES.get(bit, str(bit)) for bit in range(64) if value >> bit & 1]
    return f"{mask} ({', '.join(names) if len(names) <= 6 else f'{len(names)} caps'})"


def _sample_children(daemon_pid: int, seconds: float, stop_when_seen: bool) -> dict[int, dict]:
    """Status of every descendant of the daemon seen within ``seconds`` (sampled every ms)."""
    seen: dict[int, dict] = {}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for pid in hostile.descendants(daemon_pid):
            st = hostile.proc_status(pid)
            # A child between fork and exec still has the daemon's name: wait for its exec.
            if st and st.get("Name") not in ("python", "python3", "remotefs-aa-pri"):
                seen.setdefault(pid, st)
        if stop_when_seen and any(st.get("Name") == "qemu-img" for st in seen.values()):
            break
        time.sleep(0.001)
    return seen


@attack("caps", "capabilities of a qemu-img child of the file daemon")
def child_capabilities(env):
    v = env.victims.make("caps", {"secret": 16})
    daemons = env.svc(
        """
        os.mkfifo(f"{play}/caps.fifo")   # qemu-img blocks opening it: a child that waits
        info = {"file": files.daemon_info(), "mount": mount.daemon_info()}
        def _convert():
            G["caps_result"] = attempt(qemu.qemu_img_convert, f"{play}/caps.fifo", "raw",
                                       f"{play}/caps.out", "raw")
        caps_thread = threading.Thread(target=_convert, daemon=True)
        caps_thread.start()
        result = info
        """
    )
    daemon_pid = daemons["file"]["pid"]
    try:
        statuses = _sample_children(daemon_pid, 10, stop_when_seen=True)
    finally:
        how = env.svc(
            """
            # O_RDWR never blocks on a FIFO: it releases a blocked reader, if any,
            # and, held open, any later open of it too.
            writer = os.open(f"{play}/caps.fifo", os.O_RDWR)
            caps_thread.join(60)
            os.close(writer)
            result = G.get("caps_result")
            """
        )
    if not statuses:
        # No child blocked on the FIFO (the daemon may open sources itself now):
        # sample the children of ordinary qemu-img calls instead.
        env.svc(
            """
            legit = f"{play}/volume-caps"
            qemu.qemu_img_create(legit, "qcow2", MiB)
            def _loop():
                end = time.monotonic() + 5
                while time.monotonic() < end:
                    attempt(qemu.qemu_img_info, legit, "qcow2")
                    attempt(qemu.qemu_img_check, legit, "qcow2")
            caps_thread = threading.Thread(target=_loop, daemon=True)
            caps_thread.start()
            """
        )
        statuses = _sample_children(daemon_pid, 5, stop_when_seen=False)
        env.svc("caps_thread.join(60)")
    own = {name: hostile.proc_status(info["pid"]) for name, info in daemons.items()}
    allowed = int(own["file"]["CapEff"], 16)
    lines, proof = [], []
    for name, st in own.items():
        lines.append(
            f"{name} daemon pid {daemons[name]['pid']}: CapEff {_caps(st['CapEff'])} "
            f"CapBnd {_caps(st['CapBnd'])} NoNewPrivs {st.get('NoNewPrivs')}"
        )
    for pid, st in sorted(statuses.items())[:6]:
        # A child needs no capability at all (it opens only the descriptors it is
        # handed); it may never gain one (bounding set, no_new_privs).
        wide = [k for k in ("CapEff", "CapPrm", "CapInh", "CapAmb") if int(st[k], 16)]
        wide += ["CapBnd"] * bool(int(st["CapBnd"], 16) & ~allowed)
        wide += ["NoNewPrivs"] * (st.get("NoNewPrivs") != "1")
        wide += ["Uid"] * (int(st["Uid"].split()[0]) != env.uid)  # root's files stay root's
        desc = (
            f"child {st['Name']} pid {pid} uid {st['Uid'].split()[0]}: "
            + ", ".join(f"{k} {_caps(st[k])}" for k in ("CapEff", "CapPrm", "CapBnd", "CapAmb"))
            + f", NoNewPrivs {st.get('NoNewPrivs')}"
        )
        lines.append(desc)
        if wide:
            proof.append(f"{desc} ({'/'.join(wide)}: more than nothing, or beyond the daemon's)")
    print("\n    " + "\n    ".join(lines))
    if not statuses:
        return "inconclusive", "no child of the file daemon could be seen; " + "; ".join(lines)
    verdict, evidence = judge(env, v, how, proof)
    return verdict, evidence if verdict == "escaped" else "; ".join(lines)


# -- 7. modes of what the driver makes -----------------------------------------------

DRIVER = """
import json, os, sys
from remotefs_aa import service
from remotefs_aa.objects import Snapshot, Volume
conf = service.make_config(["--config-file", sys.argv[1]])
driver = service.start(conf)
try:
    vol = Volume(size=1)
    vol.provider_location = driver.create_volume(vol)["provider_location"]
    snap = Snapshot(vol)
    driver.create_snapshot(snap)
    driver.revert_to_snapshot(None, vol, snap)
    print(json.dumps({"share": driver.share_path(vol.provider_location), "name": vol.name,
                      "snapshot": snap.id}))
finally:
    service.stop()
"""


@attack("modes", "modes and owners after create volume, snapshot, revert (the driver)")
def driver_modes(env):
    answer = env.svc(
        """
        r = sh(sys.executable, "-c", driver, config, check=False)
        result = {"rc": r["rc"], "err": r["err"][-2000:], "out": r["out"]}
        """,
        timeout=300,
        driver=DRIVER,
        config=env.config,
    )
    assert answer["rc"] == 0, answer["err"]
    made = json.loads(answer["out"].strip().splitlines()[-1])
    share, name = made["share"], made["name"]
    shares = os.path.join(env.state, "shares")

    def describe_path(path: str) -> tuple[int, int, int]:
        st = os.lstat(path)
        return st.st_mode & 0o7777, st.st_uid, st.st_gid

    seen = {p: describe_path(p) for p in (shares, share)}
    volume_files = sorted(n for n in os.listdir(share) if name in n)
    for n in volume_files:
        seen[os.path.join(share, n)] = describe_path(os.path.join(share, n))
    proof = []
    for path, (mode, _uid, _gid) in seen.items():
        if os.path.isdir(path) and mode & 0o002 and not mode & 0o1000:
            proof.append(f"world-writable directory {path} ({mode:o})")
    for path, (mode, _uid, _gid) in seen.items():
        if path.endswith(".info") and mode & 0o004:
            proof.append(f"world-readable {os.path.basename(path)} ({mode:o})")
    images = {p: v for p, v in seen.items() if p.startswith(share + "/") and ".info" not in p}
    # The local driver's volume mode is 0660, owned by the service (its user and group).
    for path, (mode, uid, gid) in images.items():
        if os.path.basename(path).startswith(".") and ".gen." in path:
            continue  # a generation claim: the same inode as .info (checked below)
        if (mode, uid, gid) != (0o660, env.uid, env.gid):
            proof.append(f"{os.path.basename(path)} is {mode:o} {uid}:{gid}, not 660 service's")
    for path, (mode, uid, gid) in seen.items():
        if path.endswith(".info") and (mode, uid) != (0o660, env.uid):
            proof.append(f"{os.path.basename(path)} is {mode:o} {uid}:{gid}, not 660 service's")
    images = {p: v for p, v in images.items() if ".gen." not in p}
    if len(set(images.values())) > 1:
        proof.append(
            "one volume's files differ: "
            + ", ".join(f"{os.path.basename(p)} {m:o} {u}:{g}" for p, (m, u, g) in images.items())
        )
    table = ", ".join(
        f"{os.path.relpath(p, env.state)} {m:o} {u}:{g}" for p, (m, u, g) in seen.items()
    )
    print(f"\n    modes: {table}")
    return ("escaped", "; ".join(proof)) if proof else ("refused", table)


# -- another hole: a config file planted through the daemon -------------------------

PLANTED = """
import json, os, sys
from oslo_config import cfg
from remotefs_aa import opts, privsep
from remotefs_aa.privsep import files
planted, text, victim_dir = sys.argv[1:4]
conf = cfg.ConfigOpts(); opts.register_opts(conf); privsep.register_opts(conf)
conf(["--config-file", planted], default_config_files=[])
privsep.init(conf)
out = {"read": files.read_file(text)}
files.write_file_atomic(victim_dir + "/planted-by-service", "owned\\n", 0o644)
privsep.stop()
print(json.dumps(out))
"""


@attack("helper", "write_file_atomic plants a root-owned config; the helper then trusts it")
def planted_config(env):
    v = env.victims.make("planted-config", {"text": b"root only: planted\n"})
    answer = env.svc(
        """
        planted = state + "/planted.conf"
        text = (f"[privileged]\\nmode = privsep\\nroot_helper = sudo -n\\n"
                f"allowed_paths = {victims_root}\\n")
        result = {"plant": attempt(files.write_file_atomic, planted, text, 0o644)}
        if result["plant"]["outcome"] == "done":
            r = sh(sys.executable, "-c", child, planted, victim_dir + "/text", victim_dir,
                   check=False)
            result["child"] = {"rc": r["rc"], "out": r["out"][-500:], "err": r["err"][-500:]}
        """,
        state=env.state,
        victims_root=env.victims.root,
        victim_dir=v.path,
        child=PLANTED,
    )
    proof = []
    child = answer.get("child") or {}
    if child.get("rc") == 0 and "root only: planted" in child.get("out", ""):
        proof.append("a daemon started on the planted config read the victim for the service")
    return judge(env, v, answer, proof)


@attack("helper", "--privsep_sock_path names a root-only socket: the helper connects as root")
def helper_socket(env):
    v = env.victims.make("helper-socket", {}, dir_mode=0o700)
    listener = hostile.UnixListener(v.file("root-only.sock"))
    v.before = v.snapshot()
    env.victims.events()  # the listener's own creation is not the daemon's doing
    try:
        answer = env.svc(
            """
            helper = os.path.join(os.path.dirname(sys.executable), "remotefs-aa-privsep-helper")
            r = sh("sudo", "-n", helper, "--privsep_context", "remotefs_aa.privsep.file_pctxt",
                   "--privsep_sock_path", sock, check=False)
            result = {"outcome": "done" if r["rc"] == 0 else "failed",
                      "error": r["err"].strip()[-300:]}
            """,
            sock=listener.path,
        )
        hostile.wait_for(lambda: listener.peers, timeout=5)
    finally:
        listener.close()
    proof = [
        f"pid {pid} (uid {uid}) connected to the root-only socket {listener.path} for the service"
        for pid, uid, _gid in listener.peers[:2]
    ]
    return judge(env, v, answer, proof)


@attack("helper", "--privsep_sock_path names root's world-connectable socket: does it serve root?")
def helper_foreign_socket(env):
    """Connecting with the caller's rights succeeds here; only the listener check stops it."""
    v = env.victims.make("helper-foreign-socket", {}, dir_mode=0o755)
    listener = hostile.UnixListener(v.file("roots.sock"), mode=0o777)
    v.before = v.snapshot()
    env.victims.events()
    try:
        answer = env.svc(
            """
            helper = os.path.join(os.path.dirname(sys.executable), "remotefs-aa-privsep-helper")
            r = sh("sudo", "-n", helper, "--privsep_context", "remotefs_aa.privsep.file_pctxt",
                   "--privsep_sock_path", sock, check=False)
            result = {"outcome": "done" if r["rc"] == 0 else "refused",
                      "error": r["err"].strip()[-300:]}
            """,
            sock=listener.path,
        )
        hostile.wait_for(lambda: listener.peers, timeout=5)
    finally:
        listener.close()
    proof = []
    if answer["outcome"] == "done":
        proof.append(f"the helper started a daemon serving root's socket {listener.path}")
    return judge(env, v, answer, proof)


@attack("helper", "--privsep_context names any importable module: root imports it")
def helper_import(env):
    v = env.victims.make("helper-import", {})
    answer = env.svc(
        """
        helper = os.path.join(os.path.dirname(sys.executable), "remotefs-aa-privsep-helper")
        r = sh("sudo", "-n", helper, "--privsep_context", "this.s", "--privsep_sock_path",
               "/nonexistent", check=False)
        result = {"outcome": "done" if r["rc"] == 0 else "failed", "out": r["out"][:200],
                  "error": r["err"].strip()[-300:]}
        """
    )
    proof = []
    if "Beautiful is better than ugly" in answer["out"]:
        proof.append("root imported (ran) the module the service named: this printed its Zen")
    return judge(env, v, answer, proof)


# -- the tests ---------------------------------------------------------------------


@pytest.mark.parametrize("scenario", ATTACKS, ids=[a.id for a in ATTACKS])
def test_attack_is_refused(env, scenario):
    start = time.monotonic()
    verdict, evidence = scenario.run(env)
    RESULTS.append(Row(scenario.family, scenario.name, verdict, evidence))
    print(f"\n  {scenario.family}: {scenario.name} -> {verdict} ({time.monotonic() - start:.1f} s)")
    print(f"    {evidence}")
    assert verdict == "refused", f"ESCAPED: {scenario.name}: {evidence}"


def test_every_victim_is_untouched(env):
    """After all attacks: every victim byte for byte, nothing new in any victim directory."""
    changes = env.victims.all_changes()
    print("\n  victims: " + ("; ".join(changes) if changes else "all untouched"))
    assert changes == [], "\n".join(changes)
