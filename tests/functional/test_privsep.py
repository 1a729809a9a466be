"""The real oslo.privsep daemons, started through remotefs-aa-privsep-helper, doing real work.

As root (CI), the helper is started without sudo; the separation from an
unprivileged service is proven in test_privsep_unprivileged.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from oslo_config import cfg
from oslo_privsep import capabilities as caps

from remotefs_aa import exception, opts, privsep
from remotefs_aa.privsep import files, mount, qemu, rootwrap_filters, runner

pytestmark = pytest.mark.functional

Refused = exception.PrivilegedArgumentRefused


def _bit(cap: int) -> int:
    return 1 << cap


MODES = ["privsep", "rootwrap_daemon", "sudo_rootwrap"]


def _start(tmp_path, mode: str, root_helper: str = "") -> str:
    """Write a config for ``mode``, load it, ``privsep.init`` it; the state dir."""
    state = tmp_path / "state"
    state.mkdir()
    conf_file = tmp_path / "rfsaa.conf"
    text = f"[DEFAULT]\nstate_path = {state}\n[privileged]\nmode = {mode}\n"
    if mode == "privsep":
        # Already root: the helper runs without sudo unless told otherwise.
        text += f"root_helper = {root_helper}\n"
    else:
        filters = tmp_path / "rootwrap.d"
        filters.mkdir()
        (filters / "remotefs_aa.filters").write_text(rootwrap_filters.generate([str(state)]))
        (tmp_path / "rootwrap.conf").write_text(rootwrap_filters.rootwrap_conf(str(filters)))
        text += f"root_helper = sudo -n\nrootwrap_config = {tmp_path}/rootwrap.conf\n"
    conf_file.write_text(text)
    conf = cfg.ConfigOpts()
    opts.register_opts(conf)
    privsep.register_opts(conf)
    conf(["--config-file", str(conf_file)], default_config_files=[])
    privsep.init(conf)
    return str(state)


@pytest.fixture(params=MODES)
def base(request, tmp_path):
    """A state directory, with privileged calls going through ``request.param``."""
    state = _start(tmp_path, request.param)
    yield state
    if mount.is_mounted(os.path.join(state, "mnt")):
        mount.umount(os.path.join(state, "mnt"))
    privsep.stop()
    privsep.runner.set_executor(privsep.runner.Executor())


@pytest.fixture
def daemon_base(tmp_path):
    """Like ``base``, privsep mode only (tests about the daemon itself)."""
    yield _start(tmp_path, "privsep")
    privsep.stop()


def test_daemons_are_separate_processes_with_least_capabilities(daemon_base):
    file_info = files.daemon_info()
    mount_info = mount.daemon_info()
    assert file_info["pid"] != os.getpid() and mount_info["pid"] != os.getpid()
    assert file_info["pid"] != mount_info["pid"]
    file_caps = sum(_bit(c) for c in privsep.FILES_CAPS)
    assert file_info["cap_eff"] == file_caps
    assert mount_info["cap_eff"] == _bit(caps.CAP_SYS_ADMIN)
    # What any child could ever gain is bounded the same way.
    assert file_info["cap_bnd"] == file_caps and mount_info["cap_bnd"] == _bit(caps.CAP_SYS_ADMIN)
    assert file_info["no_new_privs"] and mount_info["no_new_privs"]


def test_tmpfs_mount_and_umount(base):
    target = os.path.join(base, "mnt")
    assert mount.mount("tmpfs", "tmpfs", target, ["size=1m", "mode=0755"]) is True
    try:
        assert mount.is_mounted(target)
        assert mount.mount("tmpfs", "tmpfs", target, ["size=1m"]) is False  # idempotent
        with open("/proc/self/mountinfo") as f:
            assert any(line.split()[4] == os.path.realpath(target) for line in f)
    finally:
        assert mount.umount(target) is True
    assert mount.umount(target) is False


def qemu_io(image: str, fmt: str, command: str) -> None:
    subprocess.run(["qemu-io", "-f", fmt, "-c", command, image], check=True, capture_output=True)


def test_qemu_img_chain_through_daemon(base):
    mib = 1024 * 1024
    vol = os.path.join(base, "volume-1")
    qemu.qemu_img_create(vol, "raw", 16 * mib)
    qemu_io(vol, "raw", "write -P 0x11 0 1M")
    s1 = os.path.join(base, "volume-1.s1")
    s2 = os.path.join(base, "volume-1.s2")
    qemu.qemu_img_create(s1, "qcow2", backing_file="volume-1", backing_fmt="raw")
    qemu_io(s1, "qcow2", "write -P 0x22 1M 1M")
    qemu.qemu_img_create(s2, "qcow2", backing_file="volume-1.s1", backing_fmt="qcow2")
    qemu_io(s2, "qcow2", "write -P 0x33 2M 1M")
    chain = qemu.qemu_img_info(s2, "qcow2", backing_chain=True)
    assert [i["filename"] for i in chain] == [s2, s1, vol]
    assert chain[0]["backing-filename"] == "volume-1.s1"  # relative: any host can open it

    # Delete the middle snapshot: merge s1 into the base, point s2 at the base.
    qemu.qemu_img_commit(s1, "qcow2")
    qemu.qemu_img_rebase(s2, "volume-1", "raw", unsafe=True)
    assert files.unlink(s1) is True
    chain = qemu.qemu_img_info(s2, "qcow2", backing_chain=True)
    assert [i["filename"] for i in chain] == [s2, vol]
    for offset, pattern in ((0, "0x11"), (1, "0x22"), (2, "0x33")):
        qemu_io(s2, "qcow2", f"read -P {pattern} {offset}M 1M")
    assert qemu.qemu_img_check(s2)["exit_code"] == 0

    qemu.qemu_img_resize(vol, "raw", 32 * mib)
    assert qemu.qemu_img_info(vol, "raw")[0]["virtual-size"] == 32 * mib
    flat = os.path.join(base, "volume-2")
    qemu.qemu_img_convert(s2, "qcow2", flat, "raw")
    qemu_io(flat, "raw", "read -P 0x33 2M 1M")


def test_file_operations_and_ownership(base):
    d = os.path.join(base, "sub", "dir")
    files.make_directory(d, 0o750)
    assert oct(os.stat(d).st_mode & 0o777) == "0o750"
    info = os.path.join(d, "volume-1.info")
    files.write_file_atomic(info, '{"active": "volume-1"}', 0o640)
    assert files.read_file(info) == '{"active": "volume-1"}'
    st = os.stat(info)
    assert (st.st_uid, st.st_mode & 0o777) == (os.geteuid(), 0o640)  # the service's
    img = os.path.join(d, "volume-thick")
    files.fallocate(img, 4 * 1024 * 1024, 0o660)
    assert os.stat(img).st_blocks * 512 >= 4 * 1024 * 1024
    assert os.stat(img).st_mode & 0o777 == 0o660
    sparse = os.path.join(d, "volume-sparse")
    files.truncate(sparse, 1 << 30)
    assert os.stat(sparse).st_size == 1 << 30 and os.stat(sparse).st_blocks == 0
    stats = files.statvfs(base)
    assert stats["total"] >= stats["free"] >= stats["available"] > 0
    assert not [n for n in os.listdir(d) if n.startswith(".tmp-")]


def test_confinement_is_enforced_by_the_real_daemon(base, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink("/etc", os.path.join(base, "etc-link"))
    cases = [
        (files.read_file, ("/etc/shadow",), "outside the allowed directories"),
        (files.read_file, (f"{base}/../../../etc/passwd",), "'..'"),
        (files.read_file, (os.path.join(base, "etc-link", "shadow"),), "link|resolves to"),
        (files.unlink, (str(outside / "x"),), "outside"),
        (files.write_file_atomic, ("relative.info", "x"), "not an absolute path"),
        (files.write_file_atomic, (os.path.join(base, "f"), "x", 0o4755), "mode"),
        (files.make_directory, (os.path.join(base, "d"), 0o777), "world-writable"),
        (mount.mount, ("tmpfs", "tmpfs", os.path.join(base, "m"), ["size=1m", "-oexec"]), "option"),
        (mount.mount, ("nfs", "host:/x -o exec", os.path.join(base, "m")), "share"),
        (mount.mount, ("tmpfs", "tmpfs", str(outside / "m")), "outside"),
        (mount.mount, ("ext4", "/dev/sda1", os.path.join(base, "m")), "filesystem type"),
        (mount.mount, ("nfs", "h:/x", os.path.join(base, "m"), ["helper=/bin/sh"]), "not allowed"),
        (mount.mount, ("glusterfs", "/etc/glusterfs/x.vol", os.path.join(base, "m")), "local"),
        (mount.mount, ("tmpfs", "tmpfs", base), "base directory itself"),
        (qemu.qemu_img_create, (os.path.join(base, "volume-o"), "qcow2", None, "../x", "raw"),
         "same volume|plain"),
        (qemu.qemu_img_create, (os.path.join(base, "volume-o"), "vmdk", 1024), "format"),
        (qemu.qemu_img_info, ("/etc/shadow", "raw"), "outside"),
    ]  # fmt: skip
    for func, args, message in cases:
        with pytest.raises(Refused, match=message):
            func(*args)
    assert not os.path.exists(os.path.join(base, "m"))
    assert not os.path.exists(os.path.join(base, "volume-o"))


def test_failed_command_is_a_clear_error(base):
    image = os.path.join(base, "volume-1")
    qemu.qemu_img_create(image, "qcow2", 2 * 1024 * 1024)
    with pytest.raises(exception.PrivilegedCommandFailed, match="qemu-img resize .*volume-1"):
        qemu.qemu_img_resize(image, "qcow2", 1024 * 1024)  # shrinking is refused
    # The daemon opens the image itself; the rootwrap modes leave that to qemu-img.
    with pytest.raises((FileNotFoundError, exception.PrivilegedCommandFailed)):
        qemu.qemu_img_info(os.path.join(base, "volume-missing"), "raw")


def test_killed_daemon_is_restarted_on_next_call(daemon_base):
    first = files.daemon_info()["pid"]
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{first}") and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # let the client notice the closed channel
    second = files.daemon_info()["pid"]
    assert second != first
    assert files.ping() is True


@pytest.mark.parametrize("mode", ["rootwrap_daemon", "sudo_rootwrap"])
def test_rootwrap_filters_refuse_other_commands(tmp_path, mode):
    """Commands outside the generated filters are refused by rootwrap itself."""
    state = _start(tmp_path, mode)
    try:
        for argv in (
            ["cat", "/etc/shadow"],
            ["rm", "-rf", "--", "/"],
            ["chmod", "777", "--", "/etc"],
        ):
            with pytest.raises(exception.PrivilegedCommandFailed):
                runner.run(argv, timeout=30)
        outside = tmp_path / "outside"
        with pytest.raises(exception.PrivilegedCommandFailed):
            runner.run(["truncate", "-s", "1", "--", str(outside)], timeout=30)
        assert not outside.exists()
        with pytest.raises(exception.PrivilegedCommandFailed):
            runner.run(["truncate", "-s", "1", "--", f"{state}/../outside"], timeout=30)
        assert not outside.exists()
    finally:
        privsep.stop()
        runner.set_executor(runner.Executor())


def test_helper_that_cannot_start_is_a_clear_error_not_a_hang(tmp_path):
    _start(tmp_path, "privsep", root_helper="false")
    started = time.monotonic()
    with pytest.raises(exception.PrivilegedHelperUnavailable, match="root_helper"):
        files.ping()
    assert time.monotonic() - started < 30
    privsep.stop()


def test_daemon_leaks_no_descriptor(daemon_base):
    """Every entrypoint closes what it opens (a leaked one keeps a share's mount busy)."""
    pid = files.daemon_info()["pid"]
    before = len(os.listdir(f"/proc/{pid}/fd"))
    vol = os.path.join(daemon_base, "volume-1")
    qemu.qemu_img_create(vol, "raw", 1 << 20)
    qemu.qemu_img_create(f"{vol}.s1", "qcow2", backing_file="volume-1", backing_fmt="raw")
    for _ in range(5):
        files.list_directory(daemon_base)
        qemu.volume_state(daemon_base, "volume-1", "raw")
        qemu.image_chain(f"{vol}.s1", ["volume-1"])
        qemu.qemu_img_info(f"{vol}.s1", "qcow2", backing_chain=True)
        qemu.qemu_img_check(f"{vol}.s1")
        qemu.pattern_matches(f"{vol}.s1", "qcow2", 0, 512, 0)
        files.replace_file_if(f"{vol}.info", "x", None)
        files.read_file(f"{vol}.info")
        files.unlink(f"{vol}.info")
        with pytest.raises(Refused):
            files.read_file("/etc/passwd")
    assert len(os.listdir(f"/proc/{pid}/fd")) == before


def test_hundreds_of_megabytes_through_each_mode(base, request):
    """Export a root-owned 256 MiB volume through the privileged path; data checked, rate shown."""
    mib = 1024 * 1024
    vol = os.path.join(base, "volume-big")
    qemu.qemu_img_create(vol, "raw", 256 * mib)
    qemu_io(vol, "raw", "write -P 0x5a 0 256M")
    os.chown(vol, 0, 0)
    os.chmod(vol, 0o600)
    copy = os.path.join(base, "volume-copy")
    started = time.monotonic()
    qemu.qemu_img_convert(vol, "raw", copy, "qcow2", sparse=False)
    seconds = time.monotonic() - started
    qemu_io(copy, "qcow2", "read -P 0x5a 0 256M")  # every byte arrived
    mode = request.node.callspec.params["base"]
    print(f"\n  [{mode}] exported 256 MiB in {seconds:.2f} s: {256 / seconds:.0f} MiB/s")


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        kids = []
        try:
            for task in os.listdir(f"/proc/{current}/task"):  # each thread's own children
                with open(f"/proc/{current}/task/{task}/children") as f:
                    kids += [int(k) for k in f.read().split()]
        except FileNotFoundError:
            continue
        found += kids
        todo += kids
    return found


def _qemu_children(pid: int) -> list[int]:
    out = []
    for child in _descendants(pid):
        try:
            with open(f"/proc/{child}/comm") as f:
                if f.read().strip() == "qemu-img":
                    out.append(child)
        except FileNotFoundError:
            continue
    return out


def _gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(os.path.exists(f"/proc/{p}") and not _zombie(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_killed_daemon_takes_its_running_qemu_img_with_it(daemon_base):
    """SIGKILL of the file daemon mid-command: its watchdog ends the command too."""
    import threading

    vol = os.path.join(daemon_base, "volume-long")
    qemu.qemu_img_create(vol, "raw", 8 << 30)
    errors: list[BaseException] = []

    def convert() -> None:
        try:
            qemu.qemu_img_convert(vol, "raw", vol + ".s1", "raw", sparse=False)
        except BaseException as exc:  # the daemon dies under it
            errors.append(exc)

    pid = files.daemon_info()["pid"]
    worker = threading.Thread(target=convert, daemon=True)
    worker.start()
    deadline = time.monotonic() + 20
    children: list[int] = []
    while not children and time.monotonic() < deadline:
        children = _qemu_children(pid)
        time.sleep(0.02)
    assert children, "no qemu-img child of the daemon appeared"
    os.kill(pid, signal.SIGKILL)
    assert _gone(children, 5), f"qemu-img {children} outlived its daemon"
    worker.join(30)
    assert errors and isinstance(errors[0], exception.PrivilegedDaemonLost), errors


SERVICE_WITH_LONG_COPY = """
import json, os, sys, threading
from oslo_config import cfg
from remotefs_aa import opts, privsep
from remotefs_aa.privsep import files, qemu
conf = cfg.ConfigOpts(); opts.register_opts(conf); privsep.register_opts(conf)
conf(["--config-file", sys.argv[1]], default_config_files=[])
privsep.init(conf)
vol = os.path.join(sys.argv[2], "volume-long")
qemu.qemu_img_create(vol, "raw", 8 << 30)
print(json.dumps({"daemon": files.daemon_info()["pid"]}), flush=True)
qemu.qemu_img_convert(vol, "raw", vol + ".s1", "raw", sparse=False)
"""


def test_killed_service_leaves_no_daemon_and_no_qemu_img(tmp_path):
    """SIGKILL of the service mid-command: its daemon exits and ends the command."""
    import json
    import sys

    state = tmp_path / "state"
    state.mkdir()
    conf = tmp_path / "rfsaa.conf"
    conf.write_text(f"[DEFAULT]\nstate_path = {state}\n[privileged]\nroot_helper =\n")
    service = subprocess.Popen(
        [sys.executable, "-c", SERVICE_WITH_LONG_COPY, str(conf), str(state)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        daemon = json.loads(service.stdout.readline())["daemon"]
        deadline = time.monotonic() + 20
        children: list[int] = []
        while not children and time.monotonic() < deadline:
            children = _qemu_children(daemon)
            time.sleep(0.02)
        assert children, "no qemu-img child of the daemon appeared"
        service.kill()
        service.wait(10)
        assert _gone([daemon, *children], 5), "the daemon or its qemu-img outlived the service"
    finally:
        service.kill()
        service.wait(10)


def _long_copy(base: str) -> tuple[str, str]:
    vol = os.path.join(base, "volume-fenced")
    if not os.path.exists(vol):
        qemu.qemu_img_create(vol, "raw", 8 << 30)
    copy = vol + ".s1"
    if os.path.exists(copy):
        os.unlink(copy)
    return vol, copy


def test_a_fenced_step_is_refused_after_its_deadline(daemon_base):
    from remotefs_aa.privsep import fence

    late = fence.Fence(["remotefs_aa-v1"], deadline=fence.now() - 0.01)
    with fence.active(late), pytest.raises(exception.LeaseExpired, match="ran out"):
        files.ping()
    # The daemon refuses it too when the caller's own check is skipped.
    with pytest.raises(exception.LeaseExpired, match="before the step could start"):
        files.ping(_fence=("t0", fence.now() - 0.01))


def test_the_daemon_ends_a_running_child_when_the_lease_runs_out(daemon_base):
    from remotefs_aa.privsep import fence

    vol, copy = _long_copy(daemon_base)
    pid = files.daemon_info()["pid"]
    started = time.monotonic()
    with fence.active(fence.Fence(["remotefs_aa-v1"], deadline=fence.now() + 1.0)):
        with pytest.raises(exception.LeaseExpired, match="ran out while it ran"):
            qemu.qemu_img_convert(vol, "raw", copy, "raw", sparse=False)
    assert time.monotonic() - started < 5  # the copy alone takes far longer
    assert not _qemu_children(pid)
    assert not os.path.exists(copy)  # and what it made is gone


def test_confirmed_renewals_let_a_long_step_finish_and_a_lost_lock_ends_it(daemon_base):
    import threading

    from remotefs_aa.privsep import fence

    vol = os.path.join(daemon_base, "volume-renewed")
    qemu.qemu_img_create(vol, "raw", 1 << 30)  # about 1-3 s of copying here
    copy = vol + ".s1"
    renewed = fence.Fence(["remotefs_aa-v1"], deadline=fence.now() + 0.5)
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(0.2):
            renewed.moved(fence.now() + 0.5)

    beater = threading.Thread(target=heartbeat, daemon=True)
    beater.start()
    try:
        with fence.active(renewed):
            qemu.qemu_img_convert(vol, "raw", copy, "raw", sparse=False)  # outlives 0.5 s
    finally:
        stop.set()
        beater.join()
    assert os.path.getsize(copy) == 1 << 30
    os.unlink(copy)

    lost = fence.Fence(["remotefs_aa-v1"], deadline=fence.now() + 60)
    threading.Timer(0.3, lost.lose, ["the backend said so"]).start()
    started = time.monotonic()
    with fence.active(lost), pytest.raises(exception.LeaseExpired):
        qemu.qemu_img_convert(vol, "raw", copy, "raw", sparse=False)
    assert time.monotonic() - started < 3
    with fence.active(lost), pytest.raises(exception.LeaseExpired, match="the backend said so"):
        files.ping()  # and nothing more starts
