"""The unprivileged service user, its venv and its sudo rule (fixtures).

The service user is a system user; its virtualenv is made with Debian's
/usr/bin/python3 (the default python3 here lives in root's home, which other
users cannot read); the sudoers rule allows that user exactly our privsep
helper and the rootwrap daemon. Shared by every test that plays the service
as a non-root (possibly hostile) user.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile

import pytest

from tests import REPO

# Named after the checkout, so two checkouts on one machine (worktrees) can
# run these tests at the same time without removing each other's user or rule.
_CHECKOUT = hashlib.sha256(REPO.encode()).hexdigest()[:6]
USER = f"rfsaa-svc-{_CHECKOUT}"
SUDOERS = f"/etc/sudoers.d/rfsaa-privsep-test-{_CHECKOUT}"


def _must_be_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("these tests create a user and a sudo rule: run them as root (CI does)")
    for tool in ("sudo", "visudo", "useradd", "runuser"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed; run tools/bootstrap.sh --test")


@pytest.fixture(scope="module")
def service_venv() -> str:
    """A venv with remotefs_aa installed that the service user can run."""
    _must_be_root()
    with open(os.path.join(REPO, "setup.cfg"), "rb") as f:
        key = hashlib.sha256(f.read()).hexdigest()[:12]
    venv = f"/var/tmp/rfsaa-service-venv-{_CHECKOUT}-{key}"
    # A stale build/ in the checkout would put modules deleted since into the venv.
    shutil.rmtree(os.path.join(REPO, "build"), ignore_errors=True)
    if not os.path.exists(os.path.join(venv, ".ready")):
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run(["/usr/bin/python3", "-m", "venv", venv], check=True)
        subprocess.run(
            [f"{venv}/bin/pip", "install", "-q", "--disable-pip-version-check", REPO],
            check=True,
            timeout=900,
        )
        open(os.path.join(venv, ".ready"), "w").close()
    else:  # the project code changes more often than its dependencies
        subprocess.run(
            [f"{venv}/bin/pip", "install", "-q", "--no-deps", "--force-reinstall", REPO],
            check=True,
            timeout=600,
        )
    subprocess.run(["chmod", "-R", "a+rX", venv], check=True)
    return venv


@pytest.fixture(scope="module")
def rootwrap_dir() -> str:
    """Root-only rootwrap config, outside every path the service may touch."""
    directory = tempfile.mkdtemp(prefix="rfsaa-rootwrap-")
    os.chmod(directory, 0o755)  # noqa: S103 - root-owned, read-only for others
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def service_user(service_venv: str, rootwrap_dir: str):
    """The user, and a sudo rule allowing it only our privsep helper and the rootwrap daemon."""
    created = subprocess.run(["id", USER], capture_output=True).returncode != 0
    if created:
        subprocess.run(["useradd", "--system", "--no-create-home", USER], check=True)
    rule = (
        f"{USER} ALL=(root) NOPASSWD: {service_venv}/bin/remotefs-aa-privsep-helper *, "
        f"{service_venv}/bin/oslo-rootwrap-daemon {rootwrap_dir}/rootwrap.conf\n"
    )
    tmp = SUDOERS + ".new"
    with open(tmp, "w") as f:
        f.write(rule)
    os.chmod(tmp, 0o440)
    subprocess.run(["visudo", "-cf", tmp], check=True, capture_output=True)
    os.replace(tmp, SUDOERS)
    try:
        yield USER
    finally:
        os.unlink(SUDOERS)
        if created:
            subprocess.run(["userdel", USER], check=False)
