"""An in-memory lock provider that records what happens, for unit tests.

It is a real provider (threads exclude each other through it), plus knobs
to make a given lock busy or its backend fail, which is how the error paths
of ``synchronized`` are exercised without a server.
"""

from __future__ import annotations

import threading

from oslo_config import cfg

from remotefs_aa import exception, opts
from remotefs_aa.coordination import base


def make_conf(**coordination: object) -> cfg.ConfigOpts:
    conf = cfg.ConfigOpts()
    opts.register_opts(conf)
    conf([], project="remotefs_aa", default_config_files=[])
    for key, value in coordination.items():
        conf.set_override(key, value, group="coordination")
    return conf


class MemoryLock(base.Lock):
    def __init__(self, provider: MemoryProvider, name: str) -> None:
        super().__init__(name)
        self.provider = provider
        self.held = False

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        p = self.provider
        p.events.append(("try", self.name, blocking, timeout))
        if self.name in p.broken:
            raise exception.LockBackendUnavailable(self.name, "backend down (fake)")
        if self.name in p.busy:
            return False
        sem = p.sems.setdefault(self.name, threading.Lock())
        got = sem.acquire(blocking, -1 if timeout is None else timeout)
        if got:
            self.held = True
            p.events.append(("acquire", self.name))
        return got

    def release(self) -> None:
        p = self.provider
        p.events.append(("release", self.name))
        self.held = False
        p.sems[self.name].release()
        if self.name in p.fail_release:
            raise exception.LockError(f"release of {self.name} failed (fake)")

    def is_still_owner(self) -> bool:
        return self.held


class MemoryProvider(base.LockProvider):
    provider_name = "memory"

    def __init__(self, conf: cfg.ConfigOpts | None = None, spans: bool = True) -> None:
        super().__init__(conf or make_conf())
        self.spans = spans
        self.events: list[tuple] = []
        self.sems: dict[str, threading.Lock] = {}
        self.busy: set[str] = set()
        self.broken: set[str] = set()
        self.fail_release: set[str] = set()

    @property
    def spans_hosts(self) -> bool:
        return self.spans

    def describe(self) -> str:
        return "memory"

    def _start(self) -> None:
        pass

    def _stop(self) -> None:
        pass

    def get_lock(self, name: str) -> MemoryLock:
        return MemoryLock(self, name)

    def acquired(self) -> list[str]:
        return [e[1] for e in self.events if e[0] == "acquire"]

    def released(self) -> list[str]:
        return [e[1] for e in self.events if e[0] == "release"]
