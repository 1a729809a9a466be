"""Privsep contexts and entrypoints that exist only for the transport tests.

The helper imports this module by name (``tests.functional.privsep_contexts``)
inside the daemon, so it needs the repository on PYTHONPATH; the helper
commands in test_privsep_lean.py set that.
"""

from __future__ import annotations

import logging
import os
import time

from oslo_privsep import priv_context

from remotefs_aa import privsep
from remotefs_aa.privsep.lean import LeanContext

LEAN_SECTION = "rfsaa_test_lean_privsep"
STOCK_SECTION = "rfsaa_test_stock_privsep"

lean_ctx = LeanContext(
    "tests",
    cfg_section=LEAN_SECTION,
    pypath=__name__ + ".lean_ctx",
    capabilities=privsep.FILES_CAPS,
)
stock_ctx = priv_context.PrivContext(
    "tests",
    cfg_section=STOCK_SECTION,
    pypath=__name__ + ".stock_ctx",
    capabilities=privsep.FILES_CAPS,
)

LOG = logging.getLogger(__name__)


@lean_ctx.entrypoint
def echo(value: object, delay: float = 0.0) -> tuple:
    """``(value, daemon pid)`` after ``delay`` seconds."""
    if delay:
        time.sleep(delay)
    return value, os.getpid()


@lean_ctx.entrypoint
def log_and_return(message: str) -> str:
    """Sends a log record in band before the reply."""
    LOG.warning("from the daemon: %s", message)
    return message


@lean_ctx.entrypoint
def fail(message: str) -> None:
    """Raises in the daemon; the client must raise the same type."""
    raise ValueError(message)


@stock_ctx.entrypoint
def stock_pid() -> int:
    """Never reachable through remotefs-aa-privsep-helper."""
    return os.getpid()
