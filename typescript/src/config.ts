/**
 * Where the controller is and how to reach it.
 *
 * Resolution order, as in the Python SDK (`forkd.sdk._config`): the `url` / `token` options, else the
 * `FORKD_URL` / `FORKD_TOKEN` environment variables, else `http://127.0.0.1:8889` and no token.
 *
 * Only `http://` and `https://` URLs are accepted: `fetch` has no Unix-socket transport, so a daemon
 * listening on a Unix socket (`unix:/path`, `http+unix://...`) needs a TCP listener (`--bind`) or a
 * proxy in front of it.
 */

export const DEFAULT_URL = "http://127.0.0.1:8889";
export const URL_ENV = "FORKD_URL";
export const TOKEN_ENV = "FORKD_TOKEN";
export const SDK_VERSION = "0.1.0";
export const USER_AGENT = `forkd-typescript/${SDK_VERSION}`;

/** A resolved controller address. */
export interface Endpoint {
  /** The URL as given (or from `FORKD_URL`), for display. */
  readonly url: string;
  /** What requests go to: scheme, host, port and path prefix, without a trailing slash. */
  readonly baseUrl: string;
  /** The bearer token, or `undefined` for none. */
  readonly token: string | undefined;
}

function env(name: string): string | undefined {
  // `process` exists on Node; elsewhere (Deno, Bun, a bundler) there may be no environment at all.
  const proc = (globalThis as { process?: { env?: Record<string, string | undefined> } }).process;
  const value = proc?.env?.[name];
  return value === undefined || value === "" ? undefined : value;
}

/** `url` checked and normalised (no trailing slash); a TypeError names what is wrong. */
export function parseUrl(url: string): string {
  if (typeof url !== "string" || url.trim() === "") {
    throw new TypeError("url: must be a non-empty string such as http://127.0.0.1:8889");
  }
  const given = url.trim();
  if (given.startsWith("unix:") || given.toLowerCase().startsWith("http+unix:")) {
    throw new TypeError(
      `url ${JSON.stringify(given)}: Unix sockets are not supported by the TypeScript SDK (fetch has no ` +
        "Unix-socket transport); serve the API on TCP (forkd-controller serve --bind 127.0.0.1:8889)",
    );
  }
  let parsed: URL;
  try {
    parsed = new URL(given);
  } catch {
    throw new TypeError(`url ${JSON.stringify(given)}: expected http://HOST:PORT or https://HOST:PORT`);
  }
  if ((parsed.protocol !== "http:" && parsed.protocol !== "https:") || parsed.host === "") {
    throw new TypeError(`url ${JSON.stringify(given)}: expected http://HOST:PORT or https://HOST:PORT`);
  }
  if (parsed.search !== "" || parsed.hash !== "" || parsed.username !== "" || parsed.password !== "") {
    throw new TypeError(`url ${JSON.stringify(given)}: no query, fragment or credentials (use token)`);
  }
  return `${parsed.protocol}//${parsed.host}${parsed.pathname.replace(/\/+$/, "")}`;
}

/** Resolve the controller address and token from the options and the environment. */
export function resolveEndpoint(url?: string, token?: string): Endpoint {
  const given = url ?? env(URL_ENV) ?? DEFAULT_URL;
  const baseUrl = parseUrl(given);
  let tok = token ?? env(TOKEN_ENV);
  if (tok !== undefined) {
    if (typeof tok !== "string") {
      throw new TypeError(`token: expected a string, got ${typeof tok}`);
    }
    tok = tok.trim();
    if (tok === "") {
      tok = undefined;
    } else if (/[\s\x00-\x1f\x7f]/.test(tok)) {
      throw new TypeError("token: must not contain whitespace or control characters");
    }
  }
  return { url: given.trim(), baseUrl, token: tok };
}
