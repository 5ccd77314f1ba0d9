/**
 * Errors thrown by the forkd TypeScript SDK; the same hierarchy as the Python SDK's `forkd.sdk.errors`.
 *
 * Every error the SDK throws on purpose derives from {@link ForkdError}:
 *
 * - an HTTP error status from `forkd-controller` becomes an {@link APIStatusError} subclass chosen by
 *   the status ({@link errorForStatus}): `err.status` is the status, `err.message` the daemon's
 *   `{"error": "..."}` text and `err.body` the decoded body;
 * - a request that got no response is an {@link APIConnectionError}, or an {@link APITimeoutError}
 *   when the SDK's own timeout (milliseconds) ran out; these have no status;
 * - an exception raised by *your* Python code in the sandbox is a {@link CodeError};
 * - children that failed to start are reported by a {@link SpawnError}.
 *
 * Invalid arguments are plain `TypeError` / `RangeError`, thrown before any request is sent.
 * No message or body ever contains the API token: it is redacted before the error is built.
 */

export class ForkdError extends Error {
  /** The HTTP status when there was one (`undefined` for transport, code and spawn errors). */
  readonly status: number | undefined;
  /** The decoded response body (an object for JSON, else text) or other detail, or `undefined`. */
  readonly body: unknown;

  constructor(message: string, options: { status?: number; body?: unknown; cause?: unknown } = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = new.target.name;
    this.status = options.status;
    this.body = options.body;
  }
}

/** The controller answered with an HTTP error status (4xx or 5xx); other 4xx are this class. */
export class APIStatusError extends ForkdError {
  declare readonly status: number;

  constructor(message: string, options: { status: number; body?: unknown }) {
    super(message, options);
  }

  override toString(): string {
    return `${this.name}: HTTP ${this.status}: ${this.message}`;
  }
}

/** 400 or 422: the request broke a rule or the schema (the message names the field). */
export class ValidationError extends APIStatusError {}

/** 400: a value broke a rule, or the guest agent refused the request. */
export class BadRequestError extends ValidationError {}

/** 422: the request did not match the API schema (an unknown field, a wrong type). */
export class UnprocessableEntityError extends ValidationError {}

/** 401: the bearer token is missing or wrong (set `token` or `FORKD_TOKEN`). */
export class AuthenticationError extends APIStatusError {}

/** 403: the token is valid but not allowed to do this. */
export class PermissionDeniedError extends APIStatusError {}

/** 404: no such snapshot, sandbox, process, or file in the guest. */
export class NotFoundError extends APIStatusError {}

/** 409: the resource exists already, is in use, or the sandbox is no longer running. */
export class ConflictError extends APIStatusError {}

/** 413: the body is larger than the controller accepts (256 MiB for a file), or the file asked for is. */
export class PayloadTooLargeError extends APIStatusError {}

/** 500, and any 5xx without a more specific class: the controller failed. */
export class InternalServerError extends APIStatusError {}

/** 503: the controller cannot serve the request right now; retrying later may work. */
export class ServiceUnavailableError extends InternalServerError {}

/** 504: the guest did not answer within the operation's timeout (the code was interrupted). */
export class GatewayTimeoutError extends InternalServerError {}

/** The request got no HTTP response: connection refused, DNS, TLS or protocol failure. */
export class APIConnectionError extends ForkdError {}

/** The request timed out on the client side (the `timeoutMs` options, in milliseconds). */
export class APITimeoutError extends APIConnectionError {}

/**
 * Python code run in the sandbox (`eval` / `runCode`) raised an exception. `type` is its class name
 * (`"ZeroDivisionError"`), `message` its text, `traceback` the guest's formatted traceback, and
 * `stdout` / `stderr` what the code printed before it failed.
 */
export class CodeError extends ForkdError {
  readonly type: string;
  readonly traceback: string | null;
  readonly stdout: string;
  readonly stderr: string;
  /** The exception's own message (`err.message` is `"Type: message"`). */
  readonly errorMessage: string;

  constructor(type: string, message: string, traceback: string | null = null,
              output: { stdout?: string; stderr?: string } = {}) {
    super(message ? `${type}: ${message}` : type, { body: { type, message, traceback } });
    this.type = type;
    this.errorMessage = message;
    this.traceback = traceback;
    this.stdout = output.stdout ?? "";
    this.stderr = output.stderr ?? "";
  }
}

/** One child of a spawn request that failed: its position in the request and the daemon's reason. */
export interface SpawnFailure {
  index: number;
  error: string;
}

/**
 * Some children of a spawn request failed to start. `sandboxes` are the ones that *did* start (still
 * running: kill them, or use them); `errors` the failed ones, by index in the request.
 */
export class SpawnError<S = unknown> extends ForkdError {
  readonly sandboxes: S[];
  readonly errors: SpawnFailure[];

  constructor(message: string, sandboxes: S[], errors: SpawnFailure[]) {
    super(message, { body: { errors } });
    this.sandboxes = sandboxes;
    this.errors = errors;
  }
}

const BY_STATUS: Record<number, new (message: string, options: { status: number; body?: unknown }) => APIStatusError> = {
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
};

/** The error for an HTTP error `status` (400..599). */
export function errorForStatus(status: number, message: string, body?: unknown): APIStatusError {
  const cls = BY_STATUS[status] ?? (status >= 500 ? InternalServerError : APIStatusError);
  return new cls(message, { status, body });
}

/** `value` with every occurrence of `token` in its strings replaced, recursively. */
export function redact<T>(value: T, token: string | undefined): T {
  if (!token) return value;
  if (typeof value === "string") return value.split(token).join("[REDACTED]") as T;
  if (Array.isArray(value)) return value.map((v) => redact(v, token)) as T;
  if (value !== null && typeof value === "object") {
    const out: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(value)) out[redact(k, token)] = redact(v, token);
    return out as T;
  }
  return value;
}
