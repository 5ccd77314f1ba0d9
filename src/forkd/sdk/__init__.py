"""The forkd Python SDK: a client of ``forkd-controller``'s REST API.

:class:`Controller` / :class:`Sandbox` are synchronous; :class:`AsyncController` / :class:`AsyncSandbox`
mirror them for asyncio. Errors are :class:`ForkdAPIError` subclasses (see :mod:`forkd.sdk.errors`).
The same names are exported from the top-level ``forkd`` package.
"""

from forkd.sdk.aio import AsyncCommandHandle, AsyncCommands, AsyncController, AsyncFiles, AsyncSandbox
from forkd.sdk.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    CodeError,
    ConflictError,
    ForkdAPIError,
    GatewayTimeoutError,
    InternalServerError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    ServiceUnavailableError,
    SpawnError,
    UnprocessableEntityError,
)
from forkd.sdk.models import (
    BranchResult,
    CommandResult,
    EvalResult,
    Execution,
    FileEntry,
    InterruptResult,
    PendingSnapshot,
    PingResult,
    ProcessInfo,
    SandboxInfo,
    SnapshotInfo,
    VersionInfo,
)
from forkd.sdk.sync import CommandHandle, Commands, Controller, Files, Sandbox

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncCommandHandle",
    "AsyncCommands",
    "AsyncController",
    "AsyncFiles",
    "AsyncSandbox",
    "AuthenticationError",
    "BadRequestError",
    "CodeError",
    "BranchResult",
    "CommandResult",
    "CommandHandle",
    "Commands",
    "ConflictError",
    "Controller",
    "EvalResult",
    "Execution",
    "FileEntry",
    "Files",
    "ForkdAPIError",
    "GatewayTimeoutError",
    "InternalServerError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "InterruptResult",
    "PendingSnapshot",
    "PingResult",
    "ProcessInfo",
    "Sandbox",
    "SandboxInfo",
    "ServiceUnavailableError",
    "SnapshotInfo",
    "SpawnError",
    "UnprocessableEntityError",
    "VersionInfo",
]
