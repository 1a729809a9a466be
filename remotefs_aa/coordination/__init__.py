"""Pluggable locks for every critical section of remotefs_aa.

A service starts the configured provider once::

    from remotefs_aa import coordination
    provider = coordination.start(CONF)      # loads, checks, connects
    ...
    coordination.stop()

and code takes locks declaratively::

    @coordination.synchronized('{volume.id}', '{src_vref.id}')
    def create_cloned_volume(self, volume, src_vref): ...

or, around a block, ``with coordination.locked('share-' + share): ...``.
"""

from __future__ import annotations

import logging

from oslo_config import cfg

from remotefs_aa import exception, plugins
from remotefs_aa.coordination.base import Lock, LockProvider
from remotefs_aa.coordination.guard import (
    LOCK_PREFIX,
    TURN_SUFFIX,
    get_provider,
    lock_names,
    locked,
    render_lock_names,
    set_provider,
    synchronized,
)

__all__ = [
    "LOCK_PREFIX",
    "Lock",
    "LockProvider",
    "check_cluster_safety",
    "clean",
    "get_provider",
    "load_provider",
    "lock_names",
    "locked",
    "render_lock_names",
    "start",
    "stop",
    "synchronized",
]

LOG = logging.getLogger(__name__)


def load_provider(conf: cfg.ConfigOpts) -> LockProvider:
    """Build (not start) the provider named by ``[coordination] lock_provider``."""
    name = conf.coordination.lock_provider
    cls = plugins.load_class(plugins.LOCK_PROVIDERS_NAMESPACE, name, "lock provider", LockProvider)
    try:
        return cls(conf)
    except exception.RemoteFSAAError:
        raise
    except Exception as exc:
        raise exception.PluginLoadFailed(
            f"lock provider {name!r} failed to initialise: {type(exc).__name__}: {exc}"
        ) from exc


def check_cluster_safety(conf: cfg.ConfigOpts, provider: LockProvider) -> None:
    """Refuse a host-local provider for an Active-Active service."""
    if conf.cluster and not provider.spans_hosts:
        raise exception.HostLocalLockProvider(
            f"[DEFAULT] cluster is set to {conf.cluster!r} (Active-Active), but lock "
            f"provider {conf.coordination.lock_provider!r} ({provider.describe()}) only "
            f"locks within one host, so two hosts could change one snapshot chain at "
            f"once. Use lock_provider = tooz with a backend shared by all hosts "
            f"(zookeeper://, etcd3+http://, redis://), or unset cluster to run "
            f"Active-Passive"
        )


def start(conf: cfg.ConfigOpts) -> LockProvider:
    """Load, check and start the configured provider; make it the default."""
    provider = load_provider(conf)
    check_cluster_safety(conf, provider)
    provider.start()
    set_provider(provider)
    return provider


def clean(*names: str, provider: LockProvider | None = None) -> None:
    """Remove the lock files of ``names`` (and their hand-off companions), if any.

    For the file-based providers, after the resource the names stand for is
    gone (a deleted volume), so a lock directory does not keep a file for every
    volume id ever used. A lock still held or waited for is left alone.
    """
    provider = provider if provider is not None else get_provider()
    for name in lock_names(names):
        for each in (name, name + TURN_SUFFIX):
            try:
                provider.clean(each)
            except Exception as exc:  # a leftover file is harmless; say why it stayed
                LOG.warning("could not remove the lock file of %s: %s", each, exc)


def stop() -> None:
    """Stop the default provider, if one runs."""
    try:
        provider = get_provider()
    except exception.LockProviderNotStarted:
        return
    set_provider(None)
    provider.stop()
