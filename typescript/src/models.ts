/**
 * The SDK's result types, and their conversion from the API's JSON.
 *
 * The wire types come from `schema.d.ts`, generated from `docs/openapi.json` by openapi-typescript:
 * every converter below reads the generated type, so a field renamed or removed in the contract is a
 * compile error here (`tsc --noEmit`), and `npm run check:schema` fails when `schema.d.ts` was not
 * regenerated after `docs/openapi.json` changed.
 *
 * Units, unlike the API: every time is in **milliseconds** (instants as Unix epoch milliseconds, like
 * `Date.now()`; durations as `...Ms`). Sizes are bytes (`...Mib`: MiB). Each result keeps the daemon's
 * answer as it came in `raw`.
 */

import type { components, operations } from "./schema.js";

/** The API's schemas (`components["schemas"]` of `docs/openapi.json`). */
export type Schemas = components["schemas"];

const ms = (seconds: number): number => Math.round(seconds * 1000 * 1000) / 1000;
const msOrNull = (seconds: number | null | undefined): number | null =>
  seconds === null || seconds === undefined ? null : ms(seconds);

/** `GET /version`: the controller's version and how it runs VMs. */
export interface VersionInfo {
  version: string;
  api: string;
  /** `kvm` or `tcg`. */
  accelerator: string;
  acceleratorReason: string;
  qemuVersion: string;
}

export function versionInfo(r: Schemas["Version"]): VersionInfo {
  return {
    version: r.version,
    api: r.api ?? "v1",
    accelerator: r.accelerator,
    acceleratorReason: r.accelerator_reason,
    qemuVersion: r.qemu_version,
  };
}

/** What the controller knows about one sandbox (a child VM). */
export interface SandboxInfo {
  /** `sb-...` */
  id: string;
  /** The snapshot it was forked from. */
  snapshotTag: string;
  status: "running" | "exited";
  /** `status === "running"`. */
  running: boolean;
  exitReason: string | null;
  /** The QEMU process's pid on the host. */
  pid: number;
  /** Epoch milliseconds. */
  createdAt: number;
  /** Milliseconds from launch until the child's agent answered. */
  readyMs: number | null;
  fromPool: boolean;
  network: string;
  memoryLimitMib: number | null;
  netns: string | null;
  /** Guest TCP port (as a string) to host loopback port, for the ports asked with `expose`. */
  ports: Record<string, number>;
  metadata: Record<string, string>;
  /** Epoch milliseconds at which the controller kills it; `null`: never (see `Sandbox.setTimeout`). */
  expiresAt: number | null;
  raw: Schemas["SandboxInfo"];
}

export function sandboxInfo(r: Schemas["SandboxInfo"]): SandboxInfo {
  return {
    id: r.id,
    snapshotTag: r.snapshot_tag,
    status: r.status,
    running: r.status === "running",
    exitReason: r.exit_reason ?? null,
    pid: r.pid,
    createdAt: ms(r.created_at),
    readyMs: r.ready_ms ?? null,
    fromPool: r.from_pool ?? false,
    network: r.network ?? "internet",
    memoryLimitMib: r.memory_limit_mib ?? null,
    netns: r.netns ?? null,
    ports: { ...(r.ports ?? {}) },
    metadata: { ...(r.metadata ?? {}) },
    expiresAt: msOrNull(r.expires_at),
    raw: r,
  };
}

/** A saved, warmed parent VM that sandboxes are forked from. */
export interface SnapshotInfo {
  tag: string;
  status: "ready" | "writing" | "failed";
  /** False for a snapshot that cannot be restored here (`warning` says why). */
  bootable: boolean;
  warning: string | null;
  /** Epoch milliseconds. */
  createdAt: number;
  memoryMib: number;
  vcpus: number;
  accel: string;
  cpu: string;
  machine: string;
  qemuVersion: string | null;
  imageId: string | null;
  vmstateBytes: number;
  memoryBytes: number;
  memoryAllocatedBytes: number;
  guest: Record<string, unknown>;
  /** Milliseconds spent in each creation step. */
  timingsMs: Record<string, number>;
  parent: string | null;
  /** Live sandboxes forked from it. */
  sandboxes: number;
  /** root, flat (a branch with its own memory file) or delta (a branch over its base's memory file). */
  kind: "root" | "flat" | "delta";
  memorySource: string | null;
  depth: number | null;
  /** Root first (only from `snapshots.get`). */
  ancestors: string[] | null;
  dependents: string[] | null;
  logicalBytes: number | null;
  physicalBytes: number | null;
  raw: Schemas["SnapshotInfo"];
}

export function snapshotInfo(r: Schemas["SnapshotInfo"]): SnapshotInfo {
  const timings: Record<string, number> = {};
  for (const [k, v] of Object.entries(r.timings ?? {})) timings[k] = ms(v);
  return {
    tag: r.tag,
    status: r.status ?? "ready",
    bootable: r.bootable ?? true,
    warning: r.warning ?? null,
    createdAt: ms(r.created_at ?? 0),
    memoryMib: r.memory_mib ?? 0,
    vcpus: r.vcpus ?? 0,
    accel: r.accel ?? "",
    cpu: r.cpu ?? "",
    machine: r.machine ?? "",
    qemuVersion: r.qemu_version ?? null,
    imageId: r.image_id ?? null,
    vmstateBytes: r.vmstate_bytes ?? 0,
    memoryBytes: r.memory_bytes ?? 0,
    memoryAllocatedBytes: r.memory_allocated_bytes ?? 0,
    guest: { ...(r.guest ?? {}) },
    timingsMs: timings,
    parent: r.parent ?? null,
    sandboxes: r.sandboxes ?? 0,
    kind: r.kind ?? "root",
    memorySource: r.memory_source ?? null,
    depth: r.depth ?? null,
    ancestors: r.ancestors ?? null,
    dependents: r.dependents ?? null,
    logicalBytes: r.logical_bytes ?? null,
    physicalBytes: r.physical_bytes ?? null,
    raw: r,
  };
}

/** A branch snapshot being written (`status: "writing"`) or that failed (`error`). */
export interface PendingSnapshot {
  tag: string;
  status: string;
  error: string | null;
}

export function pendingSnapshot(r: Schemas["PendingSnapshot"]): PendingSnapshot {
  return { tag: r.tag, status: r.status, error: r.error ?? null };
}

/** The answer to a branch: the new snapshot's tag, the source's pause and the bytes written. */
export interface BranchResult {
  tag: string;
  /** `ready`, or `writing` when the call did not wait. */
  status: string;
  /** The mode chosen: `delta` or `flat`. */
  mode: string | null;
  /** Milliseconds the source sandbox was paused. */
  pauseMs: number | null;
  totalMs: number | null;
  dirtyBytes: number | null;
  bytesWritten: number | null;
  branchedFrom: string | null;
  bootable: boolean;
  raw: Schemas["BranchResponse"];
}

export function branchResult(r: Schemas["BranchResponse"]): BranchResult {
  return {
    tag: r.tag,
    status: r.status,
    mode: r.mode ?? null,
    pauseMs: r.pause_ms ?? null,
    totalMs: r.total_ms ?? null,
    dirtyBytes: r.dirty_bytes ?? null,
    bytesWritten: r.bytes_written ?? null,
    branchedFrom: r.branched_from ?? null,
    bootable: r.bootable ?? true,
    raw: r,
  };
}

/** A background process (`commands.run(..., { background: true })`): `exitCode` once it ended. */
export interface ProcessInfo {
  /** The pid in the guest. */
  pid: number;
  argv: string[];
  /** Epoch milliseconds. */
  startedAt: number;
  running: boolean;
  exitCode: number | null;
  timedOut: boolean;
}

export function processInfo(r: Schemas["ProcessInfo"]): ProcessInfo {
  return {
    pid: r.pid,
    argv: [...r.argv],
    startedAt: ms(r.started_at),
    running: r.running,
    exitCode: r.exit_code ?? null,
    timedOut: r.timed_out ?? false,
  };
}

/** What `Sandbox.interrupt()` reached: running calls found, stopped, and stuck in C code. */
export interface InterruptResult {
  found: number;
  stopped: number;
  stuck: number;
}

export function interruptResult(r: Schemas["InterruptResponse"]): InterruptResult {
  return { found: r.found, stopped: r.stopped, stuck: r.stuck };
}

/** The guest agent's answer to a ping. */
export interface PingResult {
  agentVersion: string | null;
  python: string | null;
  numpy: string | null;
  /** Milliseconds since the agent started (guest monotonic clock). */
  uptimeMs: number | null;
  pid: number | null;
  /** The guest's wall clock, epoch milliseconds. */
  time: number | null;
}

export function pingResult(r: Schemas["PingResponse"]): PingResult {
  return {
    agentVersion: r.agent_version ?? null,
    python: r.python ?? null,
    numpy: r.numpy ?? null,
    uptimeMs: msOrNull(r.uptime_s),
    pid: r.pid ?? null,
    time: msOrNull(r.time),
  };
}

/**
 * The result of evaluating an expression: `value` is the result as JSON (arrays for tuples, ...) when
 * the guest could serialize it, else `null`; `repr` is always its Python `repr()`, `type` its type name.
 */
export interface EvalResult {
  value: unknown;
  repr: string;
  type: string;
}

export function evalResult(r: Schemas["EvalResponse"]): EvalResult {
  return { value: r.value ?? null, repr: r.repr ?? "", type: r.type ?? "" };
}

/** `value` if the result was JSON-serializable (a Python `None` is `null`), else the `repr` string. */
export function plainValue(r: EvalResult): unknown {
  return r.value !== null || r.type === "NoneType" ? r.value : r.repr;
}

/**
 * The result of `runCode`: the output and the last expression statement's value (`repr` is `null` when
 * the code did not end with an expression, or it was `None`; `value` is it as JSON, when serializable).
 */
export interface Execution {
  stdout: string;
  stderr: string;
  value: unknown;
  repr: string | null;
}

export function execution(r: Schemas["RunCodeResponse"], stdout?: string, stderr?: string): Execution {
  return { stdout: stdout ?? r.stdout ?? "", stderr: stderr ?? r.stderr ?? "", value: r.value ?? null,
           repr: r.repr ?? null };
}

/**
 * The result of `commands.run`. `exitCode` is negative (minus the signal number) for a process killed
 * by a signal, `null` if unknown; output beyond `maxOutput` per stream is dropped (`...Truncated`);
 * `timedOut` means the process group was killed when the timeout expired.
 */
export interface CommandResult {
  exitCode: number | null;
  stdout: string;
  stderr: string;
  timedOut: boolean;
  stdoutTruncated: boolean;
  stderrTruncated: boolean;
  durationMs: number;
  /** Exit code 0 and not timed out. */
  ok: boolean;
}

export function commandResult(r: Schemas["ExecResponse"]): CommandResult {
  return {
    exitCode: r.exit_code ?? null,
    stdout: r.stdout,
    stderr: r.stderr,
    timedOut: r.timed_out,
    stdoutTruncated: r.stdout_truncated,
    stderrTruncated: r.stderr_truncated,
    durationMs: ms(r.duration_s),
    ok: r.exit_code === 0 && !r.timed_out,
  };
}

/** A file in the guest. */
export interface FileEntry {
  name: string;
  path: string;
  /** `file`, `dir`, `symlink` or `other`. */
  type: string;
  /** Bytes. */
  size: number;
  /** Permission bits. */
  mode: number;
  /** Epoch milliseconds. */
  mtime: number;
  isDir: boolean;
  isFile: boolean;
}

export function fileEntry(r: Schemas["FileEntry"]): FileEntry {
  return { name: r.name, path: r.path, type: r.type, size: r.size, mode: r.mode, mtime: ms(r.mtime),
           isDir: r.type === "dir", isFile: r.type === "file" };
}

/** One line of a process's NDJSON stream (`exec` with `stream: true`, `GET .../processes/{pid}/stream`). */
export type ProcessEvent =
  operations["exec__v1_sandboxes__sid__exec_post"]["responses"][200]["content"]["application/x-ndjson"];

/** One line of a streamed `run_code` (`runCode` with `onStdout` / `onStderr`). */
export type RunCodeEvent =
  operations["run_code_v1_sandboxes__sid__run_code_post"]["responses"][200]["content"]["application/x-ndjson"];
