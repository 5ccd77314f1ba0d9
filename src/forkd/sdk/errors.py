"""Exceptions raised by the forkd Python SDK.

Every exception the SDK raises on purpose derives from :class:`ForkdAPIError`:

* an HTTP error status from ``forkd-controller`` becomes an :class:`APIStatusError` subclass chosen by
  the status (:func:`error_for_status`);
* a transport failure (refused connection, TLS failure, timeout) is :class:`APIConnectionError` or
  :class:`APITimeoutError`; these carry no status;
* an exception raised by *your* code inside a sandbox is :class:`CodeError`;
* children that failed to start are reported by :class:`SpawnError`.

No message, ``repr`` or ``body`` ever contains the API token: the client redacts it before raising.
"""

from __future__ import annotations

from typing import Generic, TypeVar

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "CodeError",
    "ConflictError",
    "ForkdAPIError",
    "GatewayTimeoutError",
    "InternalServerError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "ServiceUnavailableError",
    "SpawnError",
    "UnprocessableEntityError",
    "error_for_status",
]

SandboxT = TypeVar("SandboxT")
E = TypeVar("E", bound=BaseException)


def _rebuild(cls: type[E], args: tuple[object, ...], state: dict[str, object]) -> E:
    exc = cls.__new__(cls)
    exc.args = args
    exc.__dict__.update(state)
    return exc


class ForkdAPIError(Exception):
    """Base class of every error the SDK raises on purpose.

    ``message`` is the human-readable reason; ``status`` the HTTP status code when there was one
    (``None`` for transport failures, code errors and spawn errors); ``body`` the decoded response
    body (a dict for JSON, else text) or other structured detail, or ``None``.
    """

    status: int | None
    message: str
    body: object

    def __init__(self, message: str, *, status: int | None = None, body: object = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.body = body

    def __reduce__(self) -> tuple[object, ...]:
        # keyword-only constructor arguments: rebuild from the attributes (pickling, copy.copy)
        return (_rebuild, (type(self), self.args, self.__dict__.copy()))


class APIStatusError(ForkdAPIError):
    """The controller answered with an HTTP error status (4xx or 5xx).

    ``message`` is the server's ``{"error": "..."}`` text; ``str(exc)`` is ``"HTTP <status>: <message>"``.
    Statuses without a dedicated subclass (other 4xx) are raised as this class.
    """

    status: int

    def __init__(self, message: str, *, status: int, body: object = None) -> None:
        super().__init__(message, status=status, body=body)
        self.args = (f"HTTP {status}: {message}",)

    def __str__(self) -> str:
        return str(self.args[0])


class BadRequestError(APIStatusError):
    """400: a value broke a rule (the message names the field), or the guest agent refused the request."""


class AuthenticationError(APIStatusError):
    """401: the bearer token is missing or wrong (set ``token=`` or ``FORKD_TOKEN``)."""


class PermissionDeniedError(APIStatusError):
    """403: the token is valid but not allowed to do this."""


class NotFoundError(APIStatusError):
    """404: no such snapshot, sandbox, file in the guest, or program to execute."""


class ConflictError(APIStatusError):
    """409: the resource exists already, is in use, or the sandbox is no longer running."""


class PayloadTooLargeError(APIStatusError):
    """413: the request body is larger than the controller accepts (256 MiB for a file upload), or the
    guest file asked for is larger than it serves (256 MiB, or a device that gives more)."""


class UnprocessableEntityError(APIStatusError):
    """422: the request did not match the API schema (the message names the field)."""


class InternalServerError(APIStatusError):
    """500, and any 5xx without a more specific class: the controller failed."""


class ServiceUnavailableError(InternalServerError):
    """503: the controller cannot serve the request right now; retrying later may work."""


class GatewayTimeoutError(InternalServerError):
    """504: the guest agent did not answer within the operation's timeout."""


class APIConnectionError(ForkdAPIError):
    """The request did not get an HTTP response: connection refused, DNS, TLS or protocol failure."""


class APITimeoutError(APIConnectionError):
    """The HTTP request timed out on the client side (see the ``timeout`` arguments, in seconds)."""


class CodeError(ForkdAPIError):
    """Python code run in the sandbox (``eval``/``run_code``) raised an exception.

    ``type`` is the exception's class name (``"ZeroDivisionError"``), ``message`` its text, ``traceback``
    the formatted traceback from the guest (or ``None``), and ``stdout``/``stderr`` what the code
    printed before it failed.
    """

    def __init__(self, type: str, message: str, traceback: str | None = None, *, stdout: str = "",
                 stderr: str = "") -> None:
        super().__init__(message, body={"type": type, "message": message, "traceback": traceback})
        self.args = (f"{type}: {message}" if message else type,)
        self.type = type
        self.traceback = traceback
        self.stdout = stdout
        self.stderr = stderr

    def __str__(self) -> str:
        return str(self.args[0])


class SpawnError(ForkdAPIError, Generic[SandboxT]):
    """Some children of a spawn request failed to start.

    ``sandboxes`` are the ones that *did* start (still running: kill them, or keep using them);
    ``errors`` is a list of ``(index, message)`` for the children that failed, ``index`` being the
    child's position in the request (``0..n-1``). With ``return_exceptions=True`` each failed child
    is one ``SpawnError`` with a single entry in ``errors`` and no sandboxes.
    """

    def __init__(self, message: str, *, sandboxes: list[SandboxT] | None = None,
                 errors: list[tuple[int, str]] | None = None) -> None:
        errs = list(errors or [])
        super().__init__(message, body={"errors": [{"index": i, "error": e} for i, e in errs]})
        self.sandboxes: list[SandboxT] = list(sandboxes or [])
        self.errors: list[tuple[int, str]] = errs

    @property
    def index(self) -> int | None:
        """The failed child's index when exactly one child is reported, else ``None``."""
        return self.errors[0][0] if len(self.errors) == 1 else None


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: UnprocessableEntityError,
    500: InternalServerError,
    503: ServiceUnavailableError,
    504: GatewayTimeoutError,
}


def error_for_status(status: int, message: str, body: object = None) -> APIStatusError:
    """The exception for an HTTP error ``status`` (400..599)."""
    cls = _BY_STATUS.get(status)
    if cls is None:
        cls = InternalServerError if status >= 500 else APIStatusError
    return cls(message, status=status, body=body)

