"""forkd: fork warmed QEMU microVMs copy-on-write, for AI-agent fan-out.

The Python SDK's client classes and exceptions are importable from here (``from forkd import
Controller``); they are loaded on first use, so ``import forkd`` stays light (no engine, no httpx).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncController",
    "AsyncMultiController",
    "AsyncSandbox",
    "AuthenticationError",
    "BadRequestError",
    "CodeError",
    "ConflictError",
    "Controller",
    "ForkdAPIError",
    "GatewayTimeoutError",
    "InternalServerError",
    "MultiController",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "Sandbox",
    "ServiceUnavailableError",
    "SpawnError",
    "UnprocessableEntityError",
    "__version__",
    "aconnect",
    "connect",
]
_SDK_NAMES = frozenset(__all__) - {"__version__"}

if TYPE_CHECKING:
    from forkd.sdk import (
        APIConnectionError,
        APIStatusError,
        APITimeoutError,
        AsyncController,
        AsyncMultiController,
        AsyncSandbox,
        AuthenticationError,
        BadRequestError,
        CodeError,
        ConflictError,
        Controller,
        ForkdAPIError,
        GatewayTimeoutError,
        InternalServerError,
        MultiController,
        NotFoundError,
        PayloadTooLargeError,
        PermissionDeniedError,
        Sandbox,
        ServiceUnavailableError,
        SpawnError,
        UnprocessableEntityError,
        aconnect,
        connect,
    )


def __getattr__(name: str) -> object:
    """Load the SDK on first access to one of its names (PEP 562)."""
    if name in _SDK_NAMES:
        from forkd import sdk

        value = getattr(sdk, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'forkd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_SDK_NAMES})
