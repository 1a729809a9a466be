"""The same classes without Cinder: the CLI's operations in a process where Cinder cannot load.

Cinder is installed in the test environment (for the Cinder tests), so a
meta-path hook makes every ``import cinder...`` fail, as on a host without it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests import REPO
from tests.functional import volumes as v
from tests.functional.conftest import worker_env

pytestmark = pytest.mark.functional

BLOCK = """
import importlib.abc, sys

class NoCinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "cinder" or name.startswith("cinder."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None

sys.meta_path.insert(0, NoCinder())
"""


def test_drivers_work_where_cinder_cannot_be_imported(tmp_path):
    config = v.write_config(str(tmp_path))
    script = BLOCK + textwrap.dedent(
        f"""
        import json
        from remotefs_aa import service
        from remotefs_aa.drivers.glusterfs import GlusterfsDriver
        from remotefs_aa.drivers.nfs import NfsDriver
        from remotefs_aa.objects import Snapshot, Volume

        conf = service.make_config(["--config-file", {config!r}])
        # Built the standalone way (no configuration= keyword): no Cinder needed.
        others = [type(cls(conf, host="h")).__name__ for cls in (NfsDriver, GlusterfsDriver)]
        with service.running(conf) as driver:
            vol = Volume(size=1)
            vol.provider_location = driver.create_volume(vol)["provider_location"]
            snap = Snapshot(vol)
            driver.create_snapshot(snap)
            clone = Volume(size=2)
            clone.provider_location = driver.create_cloned_volume(clone, vol)["provider_location"]
            conn = driver.initialize_connection(vol, {{}})
            problems = [p for x in (vol, clone) for p in driver.verify_volume(x)["problems"]]
            driver.delete_snapshot(snap)
            for each in (vol, clone):
                driver.delete_volume(each)
        print(json.dumps({{
            "class": type(driver).__name__, "others": others, "active": conn["data"]["name"],
            "problems": problems,
            "cinder": sorted(m for m in sys.modules if m.split(".")[0] == "cinder"),
        }}))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=worker_env(), capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["class"] == "LocalDriver" and out["others"] == ["NfsDriver", "GlusterfsDriver"]
    assert out["active"].startswith("volume-") and "." in out["active"]
    assert out["problems"] == [] and out["cinder"] == []
