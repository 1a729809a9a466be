"""tools/bootstrap.sh against stand-in apt-get / dpkg programs (nothing is installed)."""

from __future__ import annotations

import os
import shutil
import subprocess

from tests import REPO

INTERRUPTED = (
    "E: dpkg was interrupted, you must manually run 'dpkg --configure -a' to correct the problem."
)


def _fake_host(tmp_path):
    """A copy of the script in a tree whose venv counts as installed, and fake tools on PATH."""
    tree = tmp_path / "tree"
    (tree / "tools").mkdir(parents=True)
    shutil.copy(os.path.join(REPO, "tools", "bootstrap.sh"), tree / "tools")
    (tree / "setup.cfg").write_text("")
    (tree / ".venv" / "bin").mkdir(parents=True)
    (tree / ".venv" / "bin" / "python").symlink_to(shutil.which("python3"))
    (tree / ".venv" / ".installed").touch()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls"
    scripts = {
        # every package is missing
        "dpkg-query": "exit 1",
        # apt refuses until dpkg --configure -a has run
        "apt-get": f'echo "apt-get $*" >> {log}\n'
        f'[ -e {tmp_path}/configured ] || {{ echo "{INTERRUPTED}" >&2; exit 100; }}',
        "dpkg": f'echo "dpkg $*" >> {log}\ntouch {tmp_path}/configured',
        "sudo": 'exec "$@"',
    }
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return tree, log, env


def test_interrupted_dpkg_is_configured_then_the_install_retried(tmp_path):
    tree, log, env = _fake_host(tmp_path)
    proc = subprocess.run(
        ["bash", str(tree / "tools" / "bootstrap.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    assert calls[0] == "apt-get update -qq"
    assert calls[1] == "dpkg --configure -a"
    assert calls[2] == "apt-get update -qq"
    assert calls[3].startswith("apt-get install -y -qq --no-install-recommends qemu-utils")
    assert "running 'dpkg --configure -a' as apt asks, then retrying" in proc.stderr


def test_other_apt_failures_are_passed_through(tmp_path):
    tree, log, env = _fake_host(tmp_path)
    (tmp_path / "bin" / "apt-get").write_text(
        "#!/bin/sh\necho 'E: Unable to locate package qemu-utils' >&2\nexit 100\n"
    )
    proc = subprocess.run(
        ["bash", str(tree / "tools" / "bootstrap.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 100
    assert "Unable to locate package" in proc.stderr
    assert not log.exists()  # no dpkg --configure -a for an unrelated error
