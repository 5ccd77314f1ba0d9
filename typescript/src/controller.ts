/**
 * {@link Controller}: a client of `forkd-controller`'s REST API v1 (`docs/openapi.json`).
 */

import {
  MAX_CHILDREN,
  MAX_EXPOSE,
  MAX_LIFETIME_MS,
  NETWORKS,
  checkInt,
  checkString,
  labels,
  oneOf,
  seconds,
  segment,
  type Network,
} from "./checks.js";
import { resolveEndpoint } from "./config.js";
import { SpawnError, type SpawnFailure } from "./errors.js";
import { MARGIN_MS, Transport, type FetchLike } from "./http.js";
import {
  pendingSnapshot,
  sandboxInfo,
  snapshotInfo,
  versionInfo,
  type PendingSnapshot,
  type Schemas,
  type SnapshotInfo,
  type VersionInfo,
} from "./models.js";
import { Sandbox } from "./sandbox.js";

export interface ControllerOptions {
  /** `http(s)://host:port[/prefix]`; default `$FORKD_URL`, else `http://127.0.0.1:8889`. */
  url?: string;
  /** The bearer token; default `$FORKD_TOKEN`, else none. */
  token?: string;
  /**
   * The default HTTP request timeout in **milliseconds** (default 60 000; `null`: no limit). Operations
   * with a timeout of their own (eval, runCode, commands, spawn) wait that long plus 30 000 ms.
   */
  timeoutMs?: number | null;
  /** A `fetch` to use instead of the global one (tests, proxies, custom agents). */
  fetch?: FetchLike;
}

export interface SpawnOptions {
  /** How many sandboxes (1..1000; default 1), forked in one request. */
  n?: number;
  /** `internet` (default: public addresses only, with DNS; never this host or private ranges) or `none`. */
  network?: Network;
  /** The memory limit of each child's cgroup, in MiB. */
  memoryLimitMib?: number;
  perChildNetns?: boolean;
  /**
   * Milliseconds allowed for each child's restore (default 120 000). Children restore a few at a time,
   * so the request may take up to `n * timeoutMs + 30 000` ms.
   */
  timeoutMs?: number;
  /** Guest TCP ports to forward from host loopback ports (`info.ports`). */
  expose?: number[];
  /**
   * Milliseconds each sandbox lives before the controller kills it (at most 7 days; default: the
   * controller's, until killed unless configured). Extend it with `Sandbox.setTimeout`.
   */
  lifetimeMs?: number;
  /** Labels; `controller.list({ metadata })` finds them. */
  metadata?: Record<string, string>;
}

export interface CreateSnapshotOptions {
  /** Guest RAM in MiB (default 512). */
  memoryMib?: number;
  vcpus?: number;
  /** Python run in the parent before it is saved. */
  warmCode?: string;
  /** Milliseconds allowed for the guest agent to come up (default 300 000). */
  bootTimeoutMs?: number;
  /** A recipe image's name (`forkd image build --name`); default: the built-in image. */
  image?: string;
}

/** The snapshots of a controller (`controller.snapshots`). */
export class Snapshots {
  private readonly http: Transport;

  constructor(http: Transport) {
    this.http = http;
  }

  /** Every snapshot; one that cannot be restored here has `bootable: false` and a `warning`. */
  async list(): Promise<SnapshotInfo[]> {
    const body = await this.http.json<Schemas["SnapshotInfo"][]>({ method: "GET", path: "/v1/snapshots" });
    return body.map(snapshotInfo);
  }

  /** One snapshot (with `ancestors` and `dependents`); NotFoundError if there is none with that tag. */
  async get(tag: string): Promise<SnapshotInfo> {
    return snapshotInfo(await this.http.json<Schemas["SnapshotInfo"]>(
      { method: "GET", path: `/v1/snapshots/${segment(tag, "tag")}/info` }));
  }

  /**
   * Boot a parent VM, run `warmCode` in it and save it as snapshot `tag` (ConflictError if it exists).
   * The request may take up to `bootTimeoutMs` + 300 000 ms.
   */
  async create(tag: string, options: CreateSnapshotOptions = {}): Promise<SnapshotInfo> {
    const boot = seconds(options.bootTimeoutMs ?? 300_000, "bootTimeoutMs");
    const body: Schemas["CreateSnapshotRequest"] = {
      tag: checkString(tag, "tag", { empty: false }),
      memory_mib: checkInt(options.memoryMib ?? 512, "memoryMib", 1),
      vcpus: checkInt(options.vcpus ?? 1, "vcpus", 1),
      warm_code: options.warmCode === undefined ? null : checkString(options.warmCode, "warmCode"),
      boot_timeout_s: boot,
    };
    if (options.image !== undefined) body.image = checkString(options.image, "image", { empty: false });
    return snapshotInfo(await this.http.json<Schemas["SnapshotInfo"]>(
      { method: "POST", path: "/v1/snapshots", json: body, timeoutMs: boot * 1000 + 300_000 }));
  }

  /**
   * Delete a snapshot. ConflictError while live sandboxes use it or branches depend on it, unless
   * `force` (orphan them) or `cascade` (delete the branches too).
   */
  async delete(tag: string, options: { force?: boolean; cascade?: boolean } = {}): Promise<void> {
    const force = options.force ?? false;
    const cascade = options.cascade ?? false;
    if (force && cascade) throw new RangeError("force and cascade cannot be used together");
    await this.http.nothing({ method: "DELETE", path: `/v1/snapshots/${segment(tag, "tag")}`,
                              query: { force, cascade } });
  }

  /** Write `to`: a flat, parentless copy of snapshot `tag`. */
  async compact(tag: string, to: string): Promise<SnapshotInfo> {
    const body: Schemas["CompactRequest"] = { to: checkString(to, "to", { empty: false }) };
    return snapshotInfo(await this.http.json<Schemas["SnapshotInfo"]>(
      { method: "POST", path: `/v1/snapshots/${segment(tag, "tag")}/compact`, json: body, timeoutMs: 600_000 }));
  }

  /** Branch snapshots being written (`wait: false`) or that failed. */
  async pending(): Promise<PendingSnapshot[]> {
    const body = await this.http.json<Schemas["PendingSnapshot"][]>({ method: "GET", path: "/v1/snapshots/pending" });
    return body.map(pendingSnapshot);
  }
}

/**
 * A client of `forkd-controller`. It holds no connection of its own (each call is one `fetch`), so
 * there is nothing to close; dropping it kills no sandbox.
 *
 * ```ts
 * const ctl = new Controller();                       // FORKD_URL, FORKD_TOKEN
 * const [a, b] = await ctl.spawn("pyagent", { n: 2, lifetimeMs: 300_000 });
 * ```
 */
export class Controller {
  /** @internal */
  readonly http: Transport;
  /** Snapshots: list, get, create, delete, compact, pending. */
  readonly snapshots: Snapshots;

  constructor(options: ControllerOptions = {}) {
    const timeoutMs = options.timeoutMs === undefined ? 60_000 : options.timeoutMs;
    if (timeoutMs !== null) seconds(timeoutMs, "timeoutMs");
    this.http = new Transport(resolveEndpoint(options.url, options.token), timeoutMs, options.fetch);
    this.snapshots = new Snapshots(this.http);
  }

  /** The controller URL this client talks to. */
  get url(): string {
    return this.http.endpoint.url;
  }

  toString(): string {
    return `Controller(${this.url})`;
  }

  /** Whether the controller is up (`/healthz` needs no token). */
  async health(): Promise<boolean> {
    const body = await this.http.json<Schemas["Health"]>({ method: "GET", path: "/healthz" });
    return body.ok === true;
  }

  /** The controller's version, API version, accelerator (kvm/tcg) and QEMU version. */
  async version(): Promise<VersionInfo> {
    return versionInfo(await this.http.json<Schemas["Version"]>({ method: "GET", path: "/version" }));
  }

  /** The Prometheus metrics, as text. */
  metrics(): Promise<string> {
    return this.http.text({ method: "GET", path: "/metrics" });
  }

  /**
   * Fork `options.n` (default 1) sandboxes from snapshot `snapshotTag`, in one request. Each child
   * succeeds or fails on its own: if any fails, a {@link SpawnError} is thrown with the ones that
   * started in `.sandboxes` (still running: kill them or use them) and the failures in `.errors`.
   */
  async spawn(snapshotTag: string, options: SpawnOptions = {}): Promise<Sandbox[]> {
    const n = checkInt(options.n ?? 1, "n", 1, MAX_CHILDREN);
    const restoreMs = options.timeoutMs ?? 120_000;
    const body: Schemas["CreateSandboxesRequest"] = {
      snapshot_tag: checkString(snapshotTag, "snapshotTag", { empty: false }),
      n,
      network: oneOf(options.network ?? "internet", NETWORKS, "network"),
      memory_limit_mib: options.memoryLimitMib === undefined ? null : checkInt(options.memoryLimitMib, "memoryLimitMib", 1),
      per_child_netns: options.perChildNetns ?? false,
      timeout_s: seconds(restoreMs, "timeoutMs"),
    };
    const ports = [...(options.expose ?? [])];
    ports.forEach((p) => checkInt(p, "expose", 1, 65535));
    if (ports.length > MAX_EXPOSE) throw new RangeError(`expose: at most ${MAX_EXPOSE} ports`);
    if (ports.length > 0) body.expose = ports;
    if (options.metadata !== undefined && Object.keys(options.metadata).length > 0) {
      body.metadata = labels(options.metadata);
    }
    if (options.lifetimeMs !== undefined) body.lifetime_s = seconds(options.lifetimeMs, "lifetimeMs", MAX_LIFETIME_MS);
    // restoreMs bounds each child's restore and children restore a few at a time, so n * restoreMs bounds
    // the request: giving up earlier would leave started sandboxes that nobody knows the ids of.
    const entries = await this.http.json<Schemas["SpawnEntry"][]>(
      { method: "POST", path: "/v1/sandboxes", json: body, timeoutMs: n * restoreMs + MARGIN_MS });
    const started: Sandbox[] = [];
    const errors: SpawnFailure[] = [];
    for (const e of [...entries].sort((x, y) => x.index - y.index)) {
      if (e.sandbox) started.push(new Sandbox(this, sandboxInfo(e.sandbox)));
      else errors.push({ index: e.index, error: e.error ?? "the controller reported neither a sandbox nor an error" });
    }
    if (errors.length > 0) {
      const shown = errors.slice(0, 5).map((f) => `[${f.index}] ${f.error}`).join("; ") + (errors.length > 5 ? "; ..." : "");
      throw new SpawnError(`${errors.length} of ${entries.length} sandboxes failed to start ` +
                           `(${started.length} started and still running): ${shown}`, started, errors);
    }
    return started;
  }

  /** Every sandbox the controller manages, or those labelled with all of `metadata`. */
  async list(options: { metadata?: Record<string, string> } = {}): Promise<Sandbox[]> {
    const want = labels(options.metadata);
    const filter = Object.entries(want).map(([k, v]) => `${k}:${v}`);
    const body = await this.http.json<Schemas["SandboxInfo"][]>(
      { method: "GET", path: "/v1/sandboxes", query: { metadata: filter.length > 0 ? filter : undefined } });
    return body.map((info) => new Sandbox(this, sandboxInfo(info)));
  }

  /** The sandbox with that id; NotFoundError if there is none. */
  async get(sandboxId: string): Promise<Sandbox> {
    const info = await this.http.json<Schemas["SandboxInfo"]>(
      { method: "GET", path: `/v1/sandboxes/${segment(sandboxId, "sandboxId")}` });
    return new Sandbox(this, sandboxInfo(info));
  }
}
