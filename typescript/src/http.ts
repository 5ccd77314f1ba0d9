/**
 * The HTTP half of the SDK: one `fetch` per call, a timeout in milliseconds per call, error statuses
 * mapped to the typed errors, and NDJSON event streams read incrementally.
 */

import { USER_AGENT, type Endpoint } from "./config.js";
import { APIConnectionError, APITimeoutError, ForkdError, errorForStatus, redact, type APIStatusError } from "./errors.js";

/** Milliseconds added to an operation's own timeout to get its HTTP request timeout. */
export const MARGIN_MS = 30_000;
/** The longest NDJSON line accepted from the controller (characters), as in the Python SDK. */
export const MAX_EVENT_LINE = 32 << 20;

export type QueryValue = string | number | boolean | readonly string[] | undefined;

export interface RequestSpec {
  method: "GET" | "POST" | "PUT" | "DELETE";
  /** Path below the base URL, already percent-encoded (`/v1/sandboxes/sb-1/eval`). */
  path: string;
  query?: Record<string, QueryValue>;
  /** A JSON body. */
  json?: unknown;
  /** A raw body, sent as application/octet-stream. */
  body?: Uint8Array;
  /**
   * Milliseconds for the whole request, body included (`undefined`: the controller's default,
   * `null`: no limit). For a stream: the longest wait between two chunks.
   */
  timeoutMs?: number | null;
}

/** One line of an NDJSON answer, as an object. */
export type StreamEvent = { type?: unknown } & Record<string, unknown>;

export type FetchLike = (input: string, init: RequestInit) => Promise<Response>;

/** Sends requests to one endpoint. Internal: {@link Controller} owns one. */
export class Transport {
  readonly endpoint: Endpoint;
  readonly defaultTimeoutMs: number | null;
  private readonly fetchFn: FetchLike;

  constructor(endpoint: Endpoint, defaultTimeoutMs: number | null, fetchFn?: FetchLike) {
    this.endpoint = endpoint;
    this.defaultTimeoutMs = defaultTimeoutMs;
    const f = fetchFn ?? (globalThis.fetch as FetchLike | undefined);
    if (typeof f !== "function") {
      throw new TypeError("no global fetch: the forkd SDK needs Node.js 18 or newer (or pass options.fetch)");
    }
    this.fetchFn = f;
  }

  url(spec: RequestSpec): string {
    const params = new URLSearchParams();
    for (const [k, v] of Object.entries(spec.query ?? {})) {
      if (v === undefined) continue;
      if (Array.isArray(v)) {
        for (const item of v as readonly string[]) params.append(k, item);
      } else {
        params.append(k, String(v));
      }
    }
    const qs = params.toString();
    return this.endpoint.baseUrl + spec.path + (qs ? `?${qs}` : "");
  }

  private headers(spec: RequestSpec): Record<string, string> {
    const h: Record<string, string> = { "User-Agent": USER_AGENT, Accept: "application/json" };
    if (this.endpoint.token !== undefined) h.Authorization = `Bearer ${this.endpoint.token}`;
    if (spec.json !== undefined) h["Content-Type"] = "application/json";
    if (spec.body !== undefined) h["Content-Type"] = "application/octet-stream";
    return h;
  }

  /**
   * Send `spec` and hand the (successful) response to `read`, all within the timeout; an error status
   * is thrown as the typed error.
   */
  async call<T>(spec: RequestSpec, read: (resp: Response) => Promise<T>): Promise<T> {
    const limit = spec.timeoutMs === undefined ? this.defaultTimeoutMs : spec.timeoutMs;
    const abort = new AbortController();
    let timedOut = false;
    const timer = limit === null ? undefined : setTimeout(() => {
      timedOut = true;
      abort.abort();
    }, limit);
    try {
      const resp = await this.send(spec, abort.signal, () => timedOut, limit);
      try {
        if (resp.status >= 400) throw await this.statusError(resp);
        return await read(resp);
      } catch (err) {
        throw this.mapError(err, spec, timedOut, limit);
      }
    } finally {
      if (timer !== undefined) clearTimeout(timer);
    }
  }

  /** The response's JSON. */
  json<T>(spec: RequestSpec): Promise<T> {
    return this.call(spec, async (resp) => {
      const text = await resp.text();
      try {
        return JSON.parse(text) as T;
      } catch {
        throw this.unexpected(spec, resp.status, `the body is not JSON: ${JSON.stringify(text.slice(0, 200))}`);
      }
    });
  }

  /** The response's bytes. */
  bytes(spec: RequestSpec): Promise<Uint8Array> {
    return this.call(spec, async (resp) => new Uint8Array(await resp.arrayBuffer()));
  }

  /** The response as text. */
  text(spec: RequestSpec): Promise<string> {
    return this.call(spec, (resp) => resp.text());
  }

  /** Nothing (204 and the like); the body is drained. */
  nothing(spec: RequestSpec): Promise<void> {
    return this.call(spec, async (resp) => {
      await resp.arrayBuffer();
    });
  }

  /**
   * The NDJSON events of a streamed answer, handed to `onEvent` one at a time as they arrive (an
   * async `onEvent` is awaited before the next line is read). `spec.timeoutMs` bounds the wait for each
   * chunk (`null`, or `undefined` here: no limit).
   */
  async stream(spec: RequestSpec, onEvent: (event: StreamEvent) => void | Promise<void>): Promise<void> {
    const idle = spec.timeoutMs ?? null;
    const abort = new AbortController();
    let timedOut = false;
    let timer: ReturnType<typeof setTimeout> | undefined;
    const arm = (): void => {
      if (idle === null) return;
      if (timer !== undefined) clearTimeout(timer);
      timer = setTimeout(() => {
        timedOut = true;
        abort.abort();
      }, idle);
    };
    const disarm = (): void => {
      if (timer !== undefined) clearTimeout(timer);
      timer = undefined;
    };
    arm();
    let reader: ReadableStreamDefaultReader<Uint8Array> | undefined;
    let finished = false;
    try {
      const resp = await this.send({ ...spec, timeoutMs: idle }, abort.signal, () => timedOut, idle);
      try {
        if (resp.status >= 400) throw await this.statusError(resp);
        if (resp.body === null) throw this.unexpected(spec, resp.status, "no body");
        reader = resp.body.getReader();
        const decoder = new TextDecoder("utf-8");
        let buffer = "";
        const emit = async (line: string): Promise<void> => {
          if (line.trim() === "") return;
          const event = parseEvent(line);
          disarm(); // the callback's own time is not the controller's silence
          try {
            await onEvent(event);
          } catch (err) {
            throw new CallbackFailure(err);
          }
          arm();
        };
        for (;;) {
          const { done, value } = await reader.read();
          if (done) {
            finished = true;
            buffer += decoder.decode();
            if (buffer !== "") await emit(buffer);
            return;
          }
          arm();
          buffer += decoder.decode(value, { stream: true });
          let nl: number;
          while ((nl = buffer.indexOf("\n")) >= 0) {
            const line = buffer.slice(0, nl);
            buffer = buffer.slice(nl + 1);
            if (line.length > MAX_EVENT_LINE) throw tooLong();
            await emit(line);
          }
          if (buffer.length > MAX_EVENT_LINE) throw tooLong();
        }
      } catch (err) {
        if (err instanceof CallbackFailure) throw err.error; // the caller's own error, as it was
        throw this.mapError(err, spec, timedOut, idle);
      }
    } finally {
      disarm();
      if (reader !== undefined && !finished) {
        // stop reading (a callback threw, or the line was too long): close the connection
        abort.abort();
        reader.cancel().catch(() => undefined);
      }
    }
  }

  private async send(spec: RequestSpec, signal: AbortSignal, timedOut: () => boolean,
                     limit: number | null): Promise<Response> {
    const init: RequestInit = { method: spec.method, headers: this.headers(spec), signal, redirect: "manual" };
    if (spec.json !== undefined) init.body = JSON.stringify(spec.json);
    else if (spec.body !== undefined) init.body = spec.body;
    try {
      return await this.fetchFn(this.url(spec), init);
    } catch (err) {
      throw this.mapError(err, spec, timedOut(), limit);
    }
  }

  /** The typed error for an error response (`{"error": "..."}` when it comes from forkd). */
  private async statusError(resp: Response): Promise<APIStatusError> {
    let text = "";
    try {
      text = await resp.text();
    } catch {
      // the body could not be read: the status still says what happened
    }
    let body: unknown = text;
    try {
      body = JSON.parse(text);
    } catch {
      // not JSON: keep the text
    }
    let message: string;
    if (body !== null && typeof body === "object" && typeof (body as { error?: unknown }).error === "string") {
      message = (body as { error: string }).error;
    } else {
      message = resp.statusText || "error";
      if (text.trim()) message += `: ${text.trim().slice(0, 500)}`;
    }
    const token = this.endpoint.token;
    return errorForStatus(resp.status, redact(message, token), redact(body, token));
  }

  /** Our own errors pass; a timeout or a transport failure becomes one. */
  private mapError(err: unknown, spec: RequestSpec, timedOut: boolean, limit: number | null): unknown {
    if (err instanceof ForkdError) return err;
    const token = this.endpoint.token;
    const what = `${spec.method} ${spec.path}`;
    if (timedOut) {
      return new APITimeoutError(redact(`${what} timed out${limit === null ? "" : ` after ${limit} ms`}`, token),
                                 { cause: err });
    }
    if (err instanceof TypeError || (err instanceof Error && (err.name === "AbortError" || "cause" in err))) {
      const cause = (err as { cause?: unknown }).cause;
      const detail = cause instanceof Error ? `${cause.message}` : err.message;
      return new APIConnectionError(
        redact(`cannot reach forkd-controller at ${this.endpoint.url} (${what}): ${detail || err.name}`, token),
        { cause: err },
      );
    }
    return err;
  }

  unexpected(spec: RequestSpec, status: number, detail: string): ForkdError {
    return new ForkdError(redact(`unexpected response to ${spec.method} ${spec.path}: ${detail}`, this.endpoint.token),
                          { status });
  }
}

/** Wraps what an event callback threw, so that it is not taken for a transport failure. */
class CallbackFailure {
  readonly error: unknown;

  constructor(error: unknown) {
    this.error = error;
  }
}

function tooLong(): ForkdError {
  return new ForkdError(`an event line longer than ${MAX_EVENT_LINE} characters in the controller's stream`);
}

/** One NDJSON line as an object (ForkdError if it is not one). */
export function parseEvent(line: string): StreamEvent {
  let obj: unknown;
  try {
    obj = JSON.parse(line);
  } catch (e) {
    throw new ForkdError(`a line of the controller's stream is not JSON: ${(e as Error).message}`);
  }
  if (obj === null || typeof obj !== "object" || Array.isArray(obj)) {
    throw new ForkdError("a line of the controller's stream is not a JSON object");
  }
  return obj as StreamEvent;
}
