"""A snapshot's overlay written from a template is byte for byte what qemu-img create writes.

``qemu.overlay_image`` saves a qemu-img process per snapshot create and
revert: one template per size and backing format, the backing name patched
in. Compared here with real ``qemu-img create -u`` output for short and long
names, both backing formats and several sizes (unaligned ones too), and
checked by ``qemu-img check``.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from oslo_config import cfg

from remotefs_aa import opts, privsep
from remotefs_aa.privsep import qemu

pytestmark = pytest.mark.functional


@pytest.fixture(autouse=True)
def settings(tmp_path):
    """The daemon's limits, for the template's one qemu-img run in this process."""
    conf = cfg.ConfigOpts()
    opts.register_opts(conf)
    privsep.register_opts(conf)
    conf([], default_config_files=[])
    conf.set_override("allowed_paths", [str(tmp_path)], group="privileged")
    privsep.use(conf)
    yield
    privsep._settings = None


NAMES = ["volume-a", "volume-" + "b" * 36, "volume-" + "c" * 36 + "." + "d" * 128]


@pytest.mark.parametrize("size", [1 << 30, 3 << 30, (1 << 30) + 512, 10 << 40])
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_overlay_bytes_equal_qemu_img_create(tmp_path, size, fmt):
    for name in NAMES:
        path = tmp_path / "real.qcow2"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", name, "-F", fmt, str(path),
             str(size)],
            check=True,
        )  # fmt: skip
        ours = qemu.overlay_image(size, name, fmt)
        assert ours == path.read_bytes(), f"{name} ({fmt}, {size}): differs from qemu-img create"
        os.unlink(path)
        mine = tmp_path / "ours.qcow2"
        mine.write_bytes(ours)
        spec = json.dumps({"driver": "qcow2", "file": {"driver": "file", "filename": str(mine)}})
        check = subprocess.run(
            ["qemu-img", "check", "--output=json", "json:" + spec[:-1] + ', "backing": null}'],
            capture_output=True,
            text=True,
        )
        assert check.returncode == 0, check.stdout + check.stderr
        os.unlink(mine)
