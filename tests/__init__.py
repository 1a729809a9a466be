"""Shared bits of the unit and functional tests."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60):
    """Run ``remotefs-aa ARGS`` in a fresh interpreter, output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "remotefs_aa.cmd.main", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
