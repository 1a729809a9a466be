"""Find plugin classes by entry-point name or by dotted path.

Users write a short name (``nfs``, ``tooz``); the entry-point namespace is an
internal detail, and a third party adds a plugin with an entry point alone.
A dotted path (``remotefs_aa.drivers.nfs.NfsDriver``) is accepted too, as
Cinder's ``volume_driver`` always was.
"""

from __future__ import annotations

import importlib
from importlib import metadata

from stevedore import driver as stevedore_driver
from stevedore import exception as stevedore_exc

from remotefs_aa import exception

VOLUME_DRIVERS_NAMESPACE = "remotefs_aa.volume_drivers"
LOCK_PROVIDERS_NAMESPACE = "remotefs_aa.lock_providers"


def installed_names(namespace: str) -> list[str]:
    """Entry-point names installed in ``namespace``, sorted.

    Read from package metadata without importing the plugins, so listing the
    choices in an error never fails on (or logs about) a broken plugin.
    """
    return sorted({ep.name for ep in metadata.entry_points(group=namespace)})


def load_class(namespace: str, name: str, kind: str, base: type) -> type:
    """Return the plugin class named ``name``.

    :param namespace: entry-point namespace searched for short names.
    :param name: an entry-point name or a dotted ``module.Class`` path.
    :param kind: what is being loaded, for error messages ("volume driver").
    :param base: the class every plugin must derive from.
    :raises PluginNotFound: no such name; the message lists installed names.
    :raises PluginLoadFailed: found, but it failed to import or has the
        wrong type.
    """
    if not name:
        raise exception.PluginNotFound(kind, name, installed_names(namespace), "empty name")
    if "." in name and ":" not in name:
        cls = _import_dotted(namespace, name, kind)
    else:
        cls = _load_entry_point(namespace, name, kind)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise exception.PluginLoadFailed(
            f"{kind} {name!r} resolves to {cls!r}, which is not a subclass of "
            f"{base.__module__}.{base.__qualname__}"
        )
    return cls


def _load_entry_point(namespace: str, name: str, kind: str) -> type:
    known = installed_names(namespace)
    if name not in known:
        raise exception.PluginNotFound(kind, name, known)
    try:
        manager = stevedore_driver.DriverManager(
            namespace, name, invoke_on_load=False, on_load_failure_callback=_reraise
        )
    except stevedore_exc.NoMatches as exc:
        raise exception.PluginNotFound(kind, name, installed_names(namespace)) from exc
    except stevedore_exc.MultipleMatches as exc:
        raise exception.PluginLoadFailed(
            f"{kind} {name!r} is registered by several packages in {namespace}; "
            f"uninstall one or use a dotted class path: {exc}"
        ) from exc
    except ImportError as exc:
        raise exception.PluginLoadFailed(
            f"{kind} {name!r} is installed but failed to import: {exc}"
        ) from exc
    return manager.driver


def _import_dotted(namespace: str, path: str, kind: str) -> type:
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise exception.PluginNotFound(
            kind, path, installed_names(namespace), f"cannot import module {module_name}: {exc}"
        ) from exc
    try:
        return getattr(module, attr)
    except AttributeError as exc:
        raise exception.PluginNotFound(
            kind, path, installed_names(namespace), f"module {module_name} has no {attr}"
        ) from exc


def _reraise(_manager: object, entrypoint: object, exc: BaseException) -> None:
    # stevedore would log and swallow the import failure, then report "no
    # matches" — which hides the real cause from the operator.
    raise exc
