"""The forkd Python SDK: a client of ``forkd-controller``'s REST API.

:class:`Controller` / :class:`Sandbox` are synchronous; :class:`AsyncController` / :class:`AsyncSandbox`
mirror them for asyncio. :class:`MultiController` (:class:`AsyncMultiController`) is several controllers as
one (``multi.py``); :func:`connect` (:func:`aconnect`) picks one or the other from the URL.
Errors are :class:`ForkdAPIError` subclasses (see :mod:`forkd.sdk.errors`).
The same names are exported from the top-level ``forkd`` package.
"""

from forkd.sdk._multi import SandboxList, SpawnPlan
from forkd.sdk.aio import (
    AsyncCommandHandle,
    AsyncCommands,
    AsyncController,
    AsyncFiles,
    AsyncSandbox,
    AsyncWorkspace,
)
from forkd.sdk.amulti import AsyncMultiController, aconnect
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
    CapacityInfo,
    CommandResult,
    EvalResult,
    Execution,
    FileEntry,
    InterruptResult,
    PackResult,
    PendingSnapshot,
    PingResult,
    ProcessInfo,
    PullResult,
    SandboxInfo,
    SnapshotInfo,
    UnpackResult,
    VersionInfo,
    WorkspaceInfo,
)
from forkd.sdk.multi import MultiController, connect
from forkd.sdk.sync import CommandHandle, Commands, Controller, Files, Sandbox, Workspace

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncCommandHandle",
    "AsyncCommands",
    "AsyncController",
    "AsyncFiles",
    "AsyncMultiController",
    "AsyncSandbox",
    "AsyncWorkspace",
    "AuthenticationError",
    "BadRequestError",
    "CodeError",
    "BranchResult",
    "CapacityInfo",
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
    "MultiController",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "InterruptResult",
    "PackResult",
    "PendingSnapshot",
    "PingResult",
    "ProcessInfo",
    "PullResult",
    "Sandbox",
    "SandboxList",
    "SandboxInfo",
    "ServiceUnavailableError",
    "SnapshotInfo",
    "SpawnError",
    "SpawnPlan",
    "UnpackResult",
    "UnprocessableEntityError",
    "VersionInfo",
    "Workspace",
    "WorkspaceInfo",
    "aconnect",
    "connect",
]
