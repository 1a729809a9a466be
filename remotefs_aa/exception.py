"""One error hierarchy for remotefs_aa.

Every message says what failed and what the operator can do about it, so a
log line or a CLI error is enough to act on without reading the code.
"""

from __future__ import annotations


class RemoteFSAAError(Exception):
    """Base of every error remotefs_aa raises on purpose.

    An error may be raised in the privileged daemon and rebuilt in the
    service as ``type(exc)(*exc.args)`` (oslo.privsep sends the class name
    and ``args``). So ``args`` are always the constructor's arguments, and a
    subclass that builds its message from them overrides :meth:`message`.
    """

    def message(self) -> str:
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()

    def __str__(self) -> str:
        return self.message()


class InvalidConfig(RemoteFSAAError):
    """A configuration value is unusable; raised at start, before any work."""

    def __init__(self, option: str, value: object, reason: str) -> None:
        super().__init__(option, value, reason)
        self.option = option
        self.value = value
        self.reason = reason

    def message(self) -> str:
        return f"invalid value {self.value!r} for option {self.option}: {self.reason}"


class UsageError(RemoteFSAAError):
    """The command line asks for something that cannot be done; nothing was started (exit 2)."""


class PluginNotFound(RemoteFSAAError):
    """A configured driver or lock provider name matches no installed plugin."""

    def __init__(self, kind: str, name: str, known: list[str], detail: str = "") -> None:
        super().__init__(kind, name, list(known), detail)
        self.kind = kind
        self.name = name
        self.known = sorted(known)
        self.detail = detail

    def message(self) -> str:
        listing = ", ".join(self.known) or "none"
        extra = f" ({self.detail})" if self.detail else ""
        return (
            f"unknown {self.kind} {self.name!r}{extra}; installed: {listing}. "
            f"Use one of those names or a dotted path 'package.module.Class'."
        )


class PluginLoadFailed(RemoteFSAAError):
    """A plugin was found but could not be imported or constructed."""


class LockError(RemoteFSAAError):
    """Base for everything that goes wrong around a lock."""


class LockNameError(LockError):
    """A lock name template cannot be rendered from the call's arguments."""


class LockProviderNotStarted(LockError):
    """Code asked for a lock before the service started a lock provider."""

    def __init__(self) -> None:
        super().__init__()

    def message(self) -> str:
        return (
            "no lock provider is running: the service must call "
            "remotefs_aa.coordination.start(conf) before any locked operation"
        )


class LockAcquireFailed(LockError):
    """A lock was not acquired; the code it protects did not run."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(name, reason)
        self.name = name
        self.reason = reason

    def message(self) -> str:
        return f"could not acquire lock {self.name}: {self.reason}"


class LockTimeout(LockAcquireFailed):
    """A blocking acquire did not succeed within its timeout."""


class LockBusy(LockAcquireFailed):
    """A non-blocking acquire found the lock held by someone else."""


class LockBackendUnavailable(LockAcquireFailed):
    """The lock backend cannot be reached; the provider is reconnecting."""


class LeaseExpired(LockError):
    """A locked operation's lease ran out (or its lock was lost); the step did not run.

    Raised by the service before it sends a step, and by the privileged
    daemon, which also ends a running child when the deadline passes. A
    frozen or cut-off service stops here instead of changing a chain that
    another host may already own.
    """

    def __init__(self, locks: str, step: str, reason: str) -> None:
        super().__init__(locks, step, reason)
        self.locks = locks
        self.step = step
        self.reason = reason

    def message(self) -> str:
        return (
            f"fenced: lock {self.locks} no longer surely ours, so {self.step} was refused "
            f"or stopped ({self.reason}). Another service may hold the lock now; the next "
            f"operation on the volume finishes or rolls back what this one left. Retry it"
        )


class LockProviderStartFailed(LockError):
    """The provider could not reach its backend at start."""


class HostLocalLockProvider(LockError):
    """An Active-Active service was configured with a host-local lock provider."""


class PrivilegedError(RemoteFSAAError):
    """Base of the errors of privileged operations.

    These cross the privsep channel as (class, args) and are rebuilt on the
    caller's side, so each subclass must be constructible from its args.
    """


class PrivilegedArgumentRefused(PrivilegedError):
    """A privileged entrypoint refused an argument (path outside the bases, ...)."""


class PrivilegedCommandFailed(PrivilegedError):
    """A command run with privileges failed or timed out."""

    def __init__(self, command: str, returncode: int, stderr: str) -> None:
        super().__init__(command, returncode, stderr)
        self.command = command
        self.returncode = returncode
        self.stderr = stderr

    def message(self) -> str:
        how = "timed out" if self.returncode == -1 else f"failed with exit code {self.returncode}"
        detail = self.stderr.strip()[-2000:]
        return f"{self.command} {how}" + (f": {detail}" if detail else "")


class PrivilegedHelperUnavailable(PrivilegedError):
    """The privileged helper could not be started or reached."""


class PrivilegedDaemonLost(PrivilegedHelperUnavailable):
    """The connection to a running privileged daemon broke during a call."""

    def __init__(self, section: str, cause: object) -> None:
        super().__init__(section, str(cause))
        self.section = section
        self.cause = str(cause)

    def message(self) -> str:
        return (
            f"lost the privileged daemon [{self.section}] ({self.cause}); the call may have "
            f"run in part. The next call starts a new daemon, and the next operation on the "
            f"volume finishes or rolls back what this one left: retry it"
        )


class VolumeError(RemoteFSAAError):
    """A volume or snapshot operation failed; the chain was left consistent."""


class _FileRefused(VolumeError):
    """A file on the share was refused; ``template`` says what and what to do."""

    template = "{path}: {reason}"

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def message(self) -> str:
        return self.template.format(path=self.path, reason=self.reason)


class InvalidImage(_FileRefused):
    """An image file is not one we may trust (format, size, backing file, data file).

    Nothing is deleted when this is raised: the file stays for an operator to
    inspect.
    """

    template = (
        "refusing image {path}: {reason}. Nothing was changed; inspect the file "
        "(qemu-img info -U {path}) before using or deleting it."
    )


class InvalidInfoFile(_FileRefused):
    """A ``volume-<id>.info`` file is malformed or disagrees with the files on disk."""

    template = (
        "snapshot info file {path} is unusable: {reason}. No file was changed; "
        "repair or restore the .info file and retry: 'remotefs-aa volume repair VOLUME' "
        "rebuilds it from the images, showing the change first (doc/chains.md)."
    )


class StaleInfoGeneration(VolumeError):
    """The .info file changed since we read it: another writer (a lapsed lock?) won.

    Raised instead of overwriting newer state (fencing).
    """

    def __init__(self, path: str, expected: int, found: int | None) -> None:
        super().__init__(path, expected, found)
        self.path = path
        self.expected = expected
        self.found = found

    def message(self) -> str:
        return (
            f"refusing to write {self.path}: it was at generation {self.expected} when read "
            f"and is now at {self.found}; another service changed this chain (did our lock "
            f"lapse?). Retry the operation; it re-reads the chain under the lock."
        )


class VolumeNotFound(VolumeError):
    """The volume's file does not exist on the share."""


class InvalidVolume(VolumeError):
    """The volume cannot be used as asked (a bad id, a size it cannot take)."""


class SnapshotNotFound(VolumeError):
    """The snapshot is not in the volume's .info file."""


class InvalidSnapshot(VolumeError):
    """The snapshot operation is not possible in the chain's current state."""


class VolumeBusy(VolumeError):
    """The volume is in use by another operation or has dependents."""


class VolumeExists(VolumeError):
    """A volume file with that id already exists; nothing was overwritten."""


class ImageRefused(VolumeError):
    """An image to copy into a volume is unusable (format, size, backing or data file)."""

    def __init__(self, image_id: str, reason: str) -> None:
        super().__init__(image_id, reason)
        self.image_id = image_id
        self.reason = reason

    def message(self) -> str:
        return f"image {self.image_id} refused: {self.reason}. No volume was changed."
