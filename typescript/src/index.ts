/**
 * The forkd TypeScript SDK: a client of `forkd-controller`'s REST API v1 (`docs/openapi.json`).
 *
 * ```ts
 * import { Controller, Sandbox } from "@forkd/sdk";
 *
 * await Sandbox.with({ tag: "pyagent" }, async (sb) => {   // killed at the end, even on error
 *   console.log(await sb.eval("numpy.zeros(5).tolist()"));
 *   await sb.commands.run("pip list", { onStdout: (t) => process.stdout.write(t) });
 * });
 * ```
 *
 * Every timeout and duration is in milliseconds; instants are epoch milliseconds.
 */

export { Controller, Snapshots } from "./controller.js";
export type { ControllerOptions, CreateSnapshotOptions, SpawnOptions } from "./controller.js";
export { CommandHandle, Commands, Files, Sandbox } from "./sandbox.js";
export type {
  CodeOptions,
  CommandOptions,
  OutputCallback,
  RunCodeOptions,
  RunOptions,
  SandboxCreateOptions,
} from "./sandbox.js";
export {
  APIConnectionError,
  APIStatusError,
  APITimeoutError,
  AuthenticationError,
  BadRequestError,
  CodeError,
  ConflictError,
  ForkdError,
  GatewayTimeoutError,
  InternalServerError,
  NotFoundError,
  PayloadTooLargeError,
  PermissionDeniedError,
  ServiceUnavailableError,
  SpawnError,
  UnprocessableEntityError,
  ValidationError,
  errorForStatus,
} from "./errors.js";
export type { SpawnFailure } from "./errors.js";
export { DEFAULT_URL, SDK_VERSION, TOKEN_ENV, URL_ENV } from "./config.js";
export type { BranchMode, Network, Signal } from "./checks.js";
export type {
  BranchResult,
  CommandResult,
  EvalResult,
  Execution,
  FileEntry,
  InterruptResult,
  PendingSnapshot,
  PingResult,
  ProcessEvent,
  ProcessInfo,
  RunCodeEvent,
  SandboxInfo,
  Schemas,
  SnapshotInfo,
  VersionInfo,
} from "./models.js";
export type { components, operations, paths } from "./schema.js";
