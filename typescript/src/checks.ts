/**
 * Argument checks, done before a request is sent (TypeError / RangeError), and the limits of the API
 * (the same as `src/forkd/limits.py`; the daemon enforces them either way).
 */

export const MAX_CHILDREN = 1000;
export const MAX_EXPOSE = 16;
export const MAX_METADATA = 64;
export const MAX_METADATA_VALUE = 1024;
export const METADATA_KEY_PATTERN = /^[A-Za-z0-9_.:/-]{1,128}$/;
/** A sandbox's longest lifetime: 7 days, in milliseconds. */
export const MAX_LIFETIME_MS = 7 * 86_400_000;
export const NETWORKS = ["internet", "none", "user"] as const;
export const BRANCH_MODES = ["auto", "delta", "flat"] as const;
export const SIGNALS = ["KILL", "TERM", "INT", "HUP"] as const;

export type Network = (typeof NETWORKS)[number];
export type BranchMode = (typeof BRANCH_MODES)[number];
export type Signal = (typeof SIGNALS)[number];

/** `value` as one percent-encoded URL path segment. */
export function segment(value: unknown, name: string): string {
  if (typeof value !== "string" || value === "") {
    throw new TypeError(`${name}: must be a non-empty string, got ${JSON.stringify(value)}`);
  }
  return encodeURIComponent(value);
}

export function checkString(value: unknown, name: string, options: { empty?: boolean } = {}): string {
  if (typeof value !== "string") throw new TypeError(`${name}: expected a string, got ${typeof value}`);
  if (options.empty === false && value === "") throw new RangeError(`${name}: must not be empty`);
  return value;
}

export function checkInt(value: unknown, name: string, lo: number, hi?: number): number {
  if (typeof value !== "number" || !Number.isInteger(value)) {
    throw new TypeError(`${name}: expected an integer, got ${JSON.stringify(value)}`);
  }
  if (value < lo || (hi !== undefined && value > hi)) {
    throw new RangeError(`${name}: must be in ${lo}..${hi ?? ""}, got ${value}`);
  }
  return value;
}

/** Milliseconds (positive, finite, at most `maxMs`) as the API's seconds. */
export function seconds(valueMs: unknown, name: string, maxMs?: number): number {
  if (typeof valueMs !== "number") {
    throw new TypeError(`${name}: expected milliseconds as a number, got ${typeof valueMs}`);
  }
  if (!(valueMs > 0) || !Number.isFinite(valueMs)) {
    throw new RangeError(`${name}: must be a positive number of milliseconds, got ${valueMs}`);
  }
  if (maxMs !== undefined && valueMs > maxMs) {
    throw new RangeError(`${name}: at most ${maxMs} ms, got ${valueMs}`);
  }
  return valueMs / 1000;
}

/** Like {@link seconds}, but `null` (no limit) passes. */
export function secondsOrNull(valueMs: unknown, name: string): number | null {
  return valueMs === null ? null : seconds(valueMs, name);
}

export function oneOf<T extends string>(value: unknown, allowed: readonly T[], name: string): T {
  if (typeof value !== "string" || !(allowed as readonly string[]).includes(value)) {
    throw new RangeError(`${name}: must be one of ${allowed.map((a) => JSON.stringify(a)).join(", ")}, got ${JSON.stringify(value)}`);
  }
  return value as T;
}

/** `metadata` checked as the controller will (string keys and values within the limits). */
export function labels(metadata: Record<string, string> | undefined): Record<string, string> {
  const out: Record<string, string> = { ...(metadata ?? {}) };
  const keys = Object.keys(out);
  if (keys.length > MAX_METADATA) throw new RangeError(`metadata: at most ${MAX_METADATA} labels`);
  for (const k of keys) {
    if (!METADATA_KEY_PATTERN.test(k)) {
      throw new RangeError(`metadata: key ${JSON.stringify(k)} must match ${METADATA_KEY_PATTERN.source}`);
    }
    const v = out[k];
    if (typeof v !== "string" || v.length > MAX_METADATA_VALUE) {
      throw new RangeError(`metadata: the value of ${k} must be a string of at most ${MAX_METADATA_VALUE} characters`);
    }
  }
  return out;
}

/** A string runs under `/bin/sh -c` (as in the Python SDK); an array is the program and its arguments. */
export function argvOf(cmd: unknown): string[] {
  if (typeof cmd === "string") {
    if (cmd.trim() === "") throw new RangeError("cmd: the command is empty");
    return ["/bin/sh", "-c", cmd];
  }
  if (!Array.isArray(cmd)) throw new TypeError(`cmd: expected a string or an array of strings, got ${typeof cmd}`);
  if (cmd.length === 0) throw new RangeError("cmd: the argument list is empty");
  const bad = cmd.findIndex((a) => typeof a !== "string");
  if (bad >= 0) throw new TypeError(`cmd: every argument must be a string; cmd[${bad}] is ${typeof cmd[bad]}`);
  if (cmd[0] === "") throw new RangeError("cmd: the program name (cmd[0]) is empty");
  return [...(cmd as string[])];
}

/** `stdin` as the API's text (bytes must be UTF-8: the API carries stdin as a string). */
export function stdinText(stdin: string | Uint8Array | undefined): string | undefined {
  if (stdin === undefined || typeof stdin === "string") return stdin;
  if (stdin instanceof Uint8Array) {
    try {
      return new TextDecoder("utf-8", { fatal: true }).decode(stdin);
    } catch {
      throw new RangeError("stdin: bytes must be valid UTF-8 (the API carries stdin as text)");
    }
  }
  throw new TypeError(`stdin: expected a string or a Uint8Array, got ${typeof stdin}`);
}

export function guestPath(path: unknown): string {
  if (typeof path !== "string") throw new TypeError(`path: expected a string, got ${typeof path}`);
  if (path === "") throw new RangeError("path: must not be empty");
  return path;
}

/** Bytes as base64 (without Buffer, so that the SDK needs nothing beyond the web platform). */
export function base64(data: Uint8Array): string {
  let bin = "";
  const step = 0x8000;
  for (let i = 0; i < data.length; i += step) {
    bin += String.fromCharCode(...data.subarray(i, i + step));
  }
  return btoa(bin);
}
