"""The exceptions the engine raises. Every message names what went wrong and, where it can, how to fix it."""

from __future__ import annotations


class ForkdError(Exception):
    """Base class of every error forkd raises on purpose."""


class ValidationError(ForkdError, ValueError):
    """A user-supplied value breaks a rule (the message names the field and the rule)."""


class ImageBuildError(ForkdError):
    """The guest image could not be built."""


class ImageNotFoundError(ForkdError):
    """No guest image is built for the current inputs."""


class SnapshotError(ForkdError):
    """A snapshot could not be created."""


class SnapshotNotFoundError(ForkdError):
    """No snapshot with that tag exists."""


class SnapshotExistsError(ForkdError):
    """A snapshot with that tag already exists."""


class BusyError(ForkdError):
    """A conflicting operation on the same object is in progress (e.g. a second branch of one sandbox)."""


class DependentsError(ForkdError):
    """The snapshot has dependent snapshots (branches of it) and neither cascade nor force was given."""


class SnapshotInvalidError(ForkdError):
    """A snapshot's files are missing, corrupt, or do not match this host or QEMU."""


class PackError(ForkdError):
    """A snapshot pack (``.tar.zst``) could not be written, or is corrupt, truncated or unsafe to unpack."""


class BootTimeoutError(ForkdError):
    """The parent VM's agent did not come up in time (the message carries the console tail)."""


class VMError(ForkdError):
    """A QEMU process failed to start, exited, or refused a command."""


class AgentError(ForkdError):
    """The guest agent answered a request with an error."""

    def __init__(self, op: str, type_: str, message: str, traceback: str | None = None,
                 details: dict | None = None) -> None:
        super().__init__(f"{op}: {type_}: {message}")
        self.op = op
        self.type = type_
        self.message = message
        self.traceback = traceback
        self.details = details or {}


class ChannelClosedError(ForkdError):
    """The channel to a guest agent closed (the VM exited or was killed) before a reply came."""


class AgentTimeoutError(ForkdError, TimeoutError):
    """The guest agent did not answer within the timeout."""


class FileTooLargeError(ForkdError):
    """A guest file is larger than the read limit (or, not being a regular file, gave more than it)."""
