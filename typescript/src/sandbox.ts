/**
 * {@link Sandbox}: one child VM forked from a snapshot, with a warmed Python interpreter and a shell;
 * `sandbox.commands` runs processes, `sandbox.files` reaches its file system.
 */

import {
  BRANCH_MODES,
  MAX_LIFETIME_MS,
  SIGNALS,
  argvOf,
  base64,
  checkInt,
  checkString,
  guestPath,
  oneOf,
  seconds,
  secondsOrNull,
  segment,
  stdinText,
  type BranchMode,
  type Signal,
} from "./checks.js";
import { Controller, type ControllerOptions, type SpawnOptions } from "./controller.js";
import { CodeError, ForkdError, NotFoundError, errorForStatus } from "./errors.js";
import { MARGIN_MS, type RequestSpec, type StreamEvent, type Transport } from "./http.js";
import {
  branchResult,
  commandResult,
  evalResult,
  execution,
  fileEntry,
  interruptResult,
  pingResult,
  plainValue,
  processInfo,
  sandboxInfo,
  type BranchResult,
  type CommandResult,
  type EvalResult,
  type Execution,
  type FileEntry,
  type InterruptResult,
  type PingResult,
  type ProcessEvent,
  type ProcessInfo,
  type RunCodeEvent,
  type SandboxInfo,
  type Schemas,
} from "./models.js";

/** Called with each piece of output (text) as it is written. */
export type OutputCallback = (text: string) => void | Promise<void>;

export interface SandboxCreateOptions extends Omit<SpawnOptions, "n"> {
  /** The snapshot to fork from. */
  tag: string;
  /** The controller to use; default: a new one from `url` / `token` (else `FORKD_URL` / `FORKD_TOKEN`). */
  controller?: Controller;
  url?: ControllerOptions["url"];
  token?: ControllerOptions["token"];
}

export interface CodeOptions {
  /**
   * Milliseconds the code may run (default 60 000). After it the code is interrupted in the guest
   * and a GatewayTimeoutError is thrown; the sandbox answers the next call either way.
   */
  timeoutMs?: number;
}

export interface RunCodeOptions extends CodeOptions {
  /** Called with stdout text as the code prints it (the answer is then streamed). */
  onStdout?: OutputCallback;
  /** Called with stderr text as the code prints it (the answer is then streamed). */
  onStderr?: OutputCallback;
}

export interface CommandOptions {
  /** Merged over the guest's environment. */
  env?: Record<string, string>;
  /** The working directory in the guest. */
  cwd?: string;
  /** Text written to the command's stdin (bytes must be UTF-8). */
  stdin?: string | Uint8Array;
  /**
   * Milliseconds after which the process group is killed and `timedOut` set (default 60 000;
   * `null`: no limit).
   */
  timeoutMs?: number | null;
  /** Called with each piece of stdout (text) as it is written; without callbacks it arrives at the end. */
  onStdout?: OutputCallback;
  onStderr?: OutputCallback;
  /** Bytes (characters, when streamed) of each stream kept in the result (default 1 MiB). */
  maxOutput?: number;
}

export interface RunOptions extends CommandOptions {
  /** Start the command and return a {@link CommandHandle} at once. */
  background?: boolean;
}

const MAX_OUTPUT = 1 << 20;

/**
 * One sandbox: a microVM forked from a snapshot. Kill it with {@link Sandbox.kill}, or use
 * {@link Sandbox.with} to have it killed when a function ends.
 */
export class Sandbox {
  /** Processes in the guest. */
  readonly commands: Commands;
  /** The guest's file system. */
  readonly files: Files;
  private readonly ctl: Controller;
  private current: SandboxInfo;

  constructor(controller: Controller, info: SandboxInfo) {
    this.ctl = controller;
    this.current = info;
    this.commands = new Commands(this);
    this.files = new Files(this);
  }

  /** Fork one sandbox from snapshot `options.tag` (SpawnError if it failed to start). */
  static async create(options: SandboxCreateOptions): Promise<Sandbox> {
    const { tag, controller, url, token, ...spawn } = options;
    const ctl = controller ?? new Controller({ url, token });
    const [sb] = await ctl.spawn(tag, { ...spawn, n: 1 });
    if (sb === undefined) throw new ForkdError("the controller answered a spawn of 1 with no sandbox");
    return sb;
  }

  /**
   * Create a sandbox, call `fn` with it and kill it when `fn` settles, whether it returned or threw
   * (a failure to kill is then not allowed to hide `fn`'s error). Resolves to what `fn` returns.
   */
  static async with<T>(options: SandboxCreateOptions, fn: (sandbox: Sandbox) => T | Promise<T>): Promise<T> {
    const sb = await Sandbox.create(options);
    let result: T;
    try {
      result = await fn(sb);
    } catch (err) {
      await sb.kill().catch(() => undefined);
      throw err;
    }
    await sb.kill();
    return result;
  }

  /** The sandbox id (`sb-...`). */
  get id(): string {
    return this.current.id;
  }

  /** The snapshot it was forked from. */
  get snapshotTag(): string {
    return this.current.snapshotTag;
  }

  /** The info as of the spawn or the last {@link refresh} / {@link setTimeout}. */
  get info(): SandboxInfo {
    return this.current;
  }

  get controller(): Controller {
    return this.ctl;
  }

  /** @internal */
  get http(): Transport {
    return this.ctl.http;
  }

  /** @internal */
  path(rest = ""): string {
    return `/v1/sandboxes/${segment(this.id, "sandboxId")}${rest}`;
  }

  toString(): string {
    return `Sandbox(${this.id}, ${this.snapshotTag})`;
  }

  /** Fetch the info again (`.info`), e.g. to see whether it is still running. */
  async refresh(): Promise<SandboxInfo> {
    this.current = sandboxInfo(await this.http.json<Schemas["SandboxInfo"]>({ method: "GET", path: this.path() }));
    return this.current;
  }

  /**
   * Kill this sandbox `lifetimeMs` milliseconds from now (at most 7 days) instead of when it was due;
   * resolves to the new info (`expiresAt`, epoch milliseconds).
   */
  async setTimeout(lifetimeMs: number): Promise<SandboxInfo> {
    const body: Schemas["TimeoutRequest"] = { lifetime_s: seconds(lifetimeMs, "lifetimeMs", MAX_LIFETIME_MS) };
    this.current = sandboxInfo(await this.http.json<Schemas["SandboxInfo"]>(
      { method: "POST", path: this.path("/timeout"), json: body }));
    return this.current;
  }

  /** Kill the VM and remove its files. Idempotent: a sandbox that is gone already is not an error. */
  async kill(): Promise<void> {
    try {
      await this.http.nothing({ method: "DELETE", path: this.path() });
    } catch (err) {
      if (!(err instanceof NotFoundError)) throw err;
    }
  }

  /**
   * Snapshot this running sandbox as `tag` (generated when omitted); it keeps running. `mode` is
   * `auto` (default), `delta` or `flat`; with `wait: false` the call returns at once (status `writing`).
   */
  async branch(tag?: string, options: { mode?: BranchMode; wait?: boolean } = {}): Promise<BranchResult> {
    const body: Schemas["BranchRequest"] = {
      mode: oneOf(options.mode ?? "auto", BRANCH_MODES, "mode"),
      wait: options.wait ?? true,
    };
    if (tag !== undefined) body.tag = checkString(tag, "tag", { empty: false });
    return branchResult(await this.http.json<Schemas["BranchResponse"]>(
      { method: "POST", path: this.path("/branch"), json: body, timeoutMs: 600_000 }));
  }

  /**
   * Interrupt the running `eval` / `runCode` calls (KeyboardInterrupt in the guest); the daemon waits
   * up to 2 s for them to stop. Code blocked in C is counted as `stuck`.
   */
  async interrupt(): Promise<InterruptResult> {
    return interruptResult(await this.http.json<Schemas["InterruptResponse"]>(
      { method: "POST", path: this.path("/interrupt") }));
  }

  /** The guest agent's versions and uptime. */
  async ping(): Promise<PingResult> {
    return pingResult(await this.http.json<Schemas["PingResponse"]>({ method: "POST", path: this.path("/ping") }));
  }

  /**
   * Evaluate a Python expression in the sandbox's interpreter (state shared with `runCode`). Resolves
   * to the value as JSON when the guest could serialize it, else its `repr` string; a {@link CodeError}
   * if the expression raised.
   */
  async eval(expr: string, options: CodeOptions = {}): Promise<unknown> {
    return plainValue(await this.evalResult(expr, options));
  }

  /** Like {@link eval}, but the whole result: `value`, `repr` and `type`. */
  async evalResult(expr: string, options: CodeOptions = {}): Promise<EvalResult> {
    const t = seconds(options.timeoutMs ?? 60_000, "timeoutMs");
    const body: Schemas["EvalRequest"] = { expr: checkString(expr, "expr", { empty: false }), timeout_s: t };
    const r = await this.http.json<Schemas["EvalResponse"]>(
      { method: "POST", path: this.path("/eval"), json: body, timeoutMs: t * 1000 + MARGIN_MS });
    if (!r.ok) throw codeError(r.error);
    return evalResult(r);
  }

  /**
   * Run Python statements (state persists between calls): stdout, stderr and the last expression's
   * value. A {@link CodeError} (with the traceback and the output so far) if the code raised.
   *
   * With `onStdout` / `onStderr` the output is streamed: each callback gets the text as the code
   * prints it, and the result's `stdout` / `stderr` hold what was streamed.
   */
  async runCode(code: string, options: RunCodeOptions = {}): Promise<Execution> {
    const t = seconds(options.timeoutMs ?? 60_000, "timeoutMs");
    checkString(code, "code");
    const body: Schemas["RunCodeRequest"] = { code, timeout_s: t };
    if (options.onStdout === undefined && options.onStderr === undefined) {
      const r = await this.http.json<Schemas["RunCodeResponse"]>(
        { method: "POST", path: this.path("/run_code"), json: body, timeoutMs: t * 1000 + MARGIN_MS });
      if (!r.ok) throw codeError(r.error, r.stdout, r.stderr);
      return execution(r);
    }
    body.stream = true;
    // the output is kept whole, as in the Python SDK: the guest cannot write more than its timeout allows
    const out = new OutputCollector(options.onStdout, options.onStderr, Number.MAX_SAFE_INTEGER);
    let final: RunCodeEvent | undefined;
    await this.http.stream({ method: "POST", path: this.path("/run_code"), json: body, timeoutMs: t * 1000 + MARGIN_MS },
      async (event) => {
        const ev = event as RunCodeEvent;
        if (final !== undefined) return; // nothing follows the result
        if (ev.type === "stdout" || ev.type === "stderr") {
          await out.output(ev.type, typeof ev.data === "string" ? ev.data : "");
        } else if (ev.type === "result") {
          final = ev;
        } else if (ev.type === "error") {
          throw streamFailure("run_code's output stream", ev);
        }
      });
    const result = final as RunCodeEvent | undefined; // assigned in the callback
    if (result === undefined) throw new ForkdError("run_code's output stream ended before the code did");
    const stdout = out.text("stdout") + (result.stdout ?? "");
    const stderr = out.text("stderr") + (result.stderr ?? "");
    if (result.ok !== true) throw codeError(result.error, stdout, stderr);
    return { stdout, stderr, value: result.value ?? null, repr: result.repr ?? null };
  }
}

/**
 * The error for an `error` event, the last line of a stream that could not go on: typed by its
 * `status` when it has one (a timed-out run_code is a 504, GatewayTimeoutError), else a ForkdError.
 */
function streamFailure(what: string, event: { error?: unknown; status?: unknown }): ForkdError {
  const message = `${what} failed: ${String(event.error)}`;
  const status = event.status;
  if (typeof status === "number" && Number.isInteger(status) && status >= 400 && status <= 599) {
    return errorForStatus(status, message, event);
  }
  return new ForkdError(message, { body: event });
}

function codeError(err: Schemas["CodeError"] | string | null | undefined,
                   stdout?: string | null, stderr?: string | null): CodeError {
  const output = { stdout: stdout ?? "", stderr: stderr ?? "" };
  if (err !== null && typeof err === "object") {
    return new CodeError(err.type || "Error", err.message ?? "", err.traceback ?? null, output);
  }
  return new CodeError("Error", typeof err === "string" ? err : "", null, output);
}

/** Turns a process's events into callbacks and, at its exit event, a {@link CommandResult}. */
class OutputCollector {
  private readonly callbacks: Record<"stdout" | "stderr", OutputCallback | undefined>;
  private readonly kept = { stdout: [] as string[], stderr: [] as string[] };
  private readonly sizes = { stdout: 0, stderr: 0 };
  private readonly truncated = { stdout: false, stderr: false };
  private readonly maxOutput: number;
  pid: number | undefined;
  result: CommandResult | undefined;

  constructor(onStdout: OutputCallback | undefined, onStderr: OutputCallback | undefined, maxOutput: number) {
    this.callbacks = { stdout: onStdout, stderr: onStderr };
    this.maxOutput = checkInt(maxOutput, "maxOutput", 0);
  }

  async output(name: "stdout" | "stderr", data: string): Promise<void> {
    const cb = this.callbacks[name];
    if (cb !== undefined) await cb(data);
    const room = this.maxOutput - this.sizes[name];
    if (room > 0) {
      this.kept[name].push(data.slice(0, room));
      this.sizes[name] += Math.min(room, data.length);
    }
    this.truncated[name] ||= data.length > room;
  }

  text(name: "stdout" | "stderr"): string {
    return this.kept[name].join("");
  }

  async feed(event: StreamEvent): Promise<void> {
    const ev = event as ProcessEvent;
    if (ev.type === "start" && typeof ev.pid === "number") {
      this.pid = ev.pid;
    } else if (ev.type === "stdout" || ev.type === "stderr") {
      await this.output(ev.type, ev.data ?? "");
    } else if (ev.type === "exit") {
      const exitCode = typeof ev.exit_code === "number" ? ev.exit_code : null;
      const timedOut = ev.timed_out === true;
      this.result = {
        exitCode,
        stdout: this.text("stdout"),
        stderr: this.text("stderr"),
        timedOut,
        stdoutTruncated: this.truncated.stdout,
        stderrTruncated: this.truncated.stderr,
        durationMs: typeof ev.duration_s === "number" ? Math.round(ev.duration_s * 1e6) / 1e3 : 0,
        ok: exitCode === 0 && !timedOut,
      };
    } else if (ev.type === "error") {
      throw streamFailure("the command's output stream", ev);
    }
  }

  finish(): CommandResult {
    if (this.result === undefined) throw new ForkdError("the command's output stream ended before the command did");
    return this.result;
  }
}

function commandFields(cmd: string | string[], options: CommandOptions): Pick<Schemas["ExecRequest"], "argv" | "env" | "cwd" | "stdin"> {
  const fields: Pick<Schemas["ExecRequest"], "argv" | "env" | "cwd" | "stdin"> = { argv: argvOf(cmd) };
  if (options.env !== undefined) {
    const env = options.env;
    if (env === null || typeof env !== "object" || !Object.values(env).every((v) => typeof v === "string")) {
      throw new TypeError("env: expected an object of string values");
    }
    fields.env = { ...env };
  }
  if (options.cwd !== undefined) fields.cwd = checkString(options.cwd, "cwd", { empty: false });
  const stdin = stdinText(options.stdin);
  if (stdin !== undefined) fields.stdin = stdin;
  return fields;
}

/** Processes in a sandbox (`sandbox.commands`). */
export class Commands {
  private readonly sb: Sandbox;

  constructor(sandbox: Sandbox) {
    this.sb = sandbox;
  }

  /**
   * Run a command and wait for it, or (`background: true`) start it and resolve to a
   * {@link CommandHandle} at once.
   *
   * A string runs under `/bin/sh -c`; an array is the program and its arguments (no shell). A non-zero
   * exit is a result, not an error; a program that does not exist is a BadRequestError.
   */
  run(cmd: string | string[], options: CommandOptions & { background: true }): Promise<CommandHandle>;
  run(cmd: string | string[], options?: CommandOptions & { background?: false }): Promise<CommandResult>;
  run(cmd: string | string[], options?: RunOptions): Promise<CommandResult | CommandHandle>;
  async run(cmd: string | string[], options: RunOptions = {}): Promise<CommandResult | CommandHandle> {
    const sb = this.sb;
    const fields = commandFields(cmd, options);
    const timeoutMs = options.timeoutMs === undefined ? 60_000 : options.timeoutMs;
    const t = secondsOrNull(timeoutMs, "timeoutMs");
    const maxOutput = checkInt(options.maxOutput ?? MAX_OUTPUT, "maxOutput", 0);
    if (options.background) {
      const body: Schemas["StartProcessRequest"] = { ...fields, argv: fields.argv ?? [], timeout_s: t, stdin_open: true };
      const info = processInfo(await sb.http.json<Schemas["ProcessInfo"]>(
        { method: "POST", path: sb.path("/processes"), json: body }));
      return new CommandHandle(sb, info.pid, options.onStdout, options.onStderr, maxOutput);
    }
    const limit = t === null ? null : t * 1000 + MARGIN_MS;
    if (options.onStdout === undefined && options.onStderr === undefined) {
      const body: Schemas["ExecRequest"] = { ...fields, timeout_s: t, max_output: maxOutput };
      return commandResult(await sb.http.json<Schemas["ExecResponse"]>(
        { method: "POST", path: sb.path("/exec"), json: body, timeoutMs: limit }));
    }
    const body: Schemas["ExecRequest"] = { ...fields, timeout_s: t, stream: true };
    const out = new OutputCollector(options.onStdout, options.onStderr, maxOutput);
    await sb.http.stream({ method: "POST", path: sb.path("/exec"), json: body, timeoutMs: limit }, (ev) => out.feed(ev));
    return out.finish();
  }

  /** Background processes running, or ended with output not yet read. */
  async list(): Promise<ProcessInfo[]> {
    const body = await this.sb.http.json<Schemas["ProcessInfo"][]>({ method: "GET", path: this.sb.path("/processes") });
    return body.map(processInfo);
  }

  /**
   * A handle on background process `pid`, for instance one started by another client
   * (NotFoundError if the sandbox has no such process).
   */
  async connect(pid: number, options: { onStdout?: OutputCallback; onStderr?: OutputCallback } = {}): Promise<CommandHandle> {
    checkInt(pid, "pid", 1);
    if (!(await this.list()).some((p) => p.pid === pid)) {
      throw new NotFoundError(`no process ${pid} in sandbox ${this.sb.id}`, { status: 404 });
    }
    return new CommandHandle(this.sb, pid, options.onStdout, options.onStderr, MAX_OUTPUT);
  }
}

/**
 * A background process: `wait()` for its result (its output goes to the callbacks as it comes),
 * `sendStdin()`, `kill()`. One reader at a time: output read by one handle is not seen by another.
 */
export class CommandHandle {
  /** The pid in the guest. */
  readonly pid: number;
  private readonly sb: Sandbox;
  private readonly out: OutputCollector;
  private waiting: Promise<CommandResult> | undefined;

  constructor(sandbox: Sandbox, pid: number, onStdout: OutputCallback | undefined,
              onStderr: OutputCallback | undefined, maxOutput: number) {
    this.sb = sandbox;
    this.pid = checkInt(pid, "pid", 1);
    this.out = new OutputCollector(onStdout, onStderr, maxOutput);
  }

  /** Resolves when the process ends: its exit code and the output not read before. */
  wait(): Promise<CommandResult> {
    this.waiting ??= (async () => {
      const spec: RequestSpec = { method: "GET", path: this.sb.path(`/processes/${this.pid}/stream`), timeoutMs: null };
      await this.sb.http.stream(spec, (ev) => this.out.feed(ev));
      return this.out.finish();
    })();
    const current = this.waiting;
    current.catch(() => {
      if (this.waiting === current) this.waiting = undefined; // a failed wait may be tried again
    });
    return current;
  }

  /** Write to the process's stdin (`eof: true` closes it after); resolves to the bytes written. */
  async sendStdin(data: string | Uint8Array, options: { eof?: boolean } = {}): Promise<number> {
    const body: Schemas["StdinRequest"] = { eof: options.eof ?? false };
    if (data instanceof Uint8Array) body.data_b64 = base64(data);
    else body.data = checkString(data, "data");
    const r = await this.sb.http.json<Schemas["StdinResult"]>(
      { method: "POST", path: this.sb.path(`/processes/${this.pid}/stdin`), json: body });
    return r.written;
  }

  /** Signal the process's group (KILL, TERM, INT, HUP); `false` if it had already ended. */
  async kill(signal: Signal = "KILL"): Promise<boolean> {
    const body: Schemas["KillRequest"] = { signal: oneOf(signal, SIGNALS, "signal") };
    const r = await this.sb.http.json<Schemas["KillResult"]>(
      { method: "POST", path: this.sb.path(`/processes/${this.pid}/kill`), json: body });
    return r.signalled;
  }
}

/** The file system of a sandbox (`sandbox.files`). Paths are absolute guest paths. */
export class Files {
  private readonly sb: Sandbox;

  constructor(sandbox: Sandbox) {
    this.sb = sandbox;
  }

  /** The file's bytes; NotFoundError if it does not exist, PayloadTooLargeError past 256 MiB. */
  read(path: string): Promise<Uint8Array> {
    return this.sb.http.bytes({ method: "GET", path: this.sb.path("/files"), query: { path: guestPath(path) } });
  }

  /** The file decoded as UTF-8. */
  async readText(path: string): Promise<string> {
    return new TextDecoder("utf-8").decode(await this.read(path));
  }

  /**
   * Write `data` (a string is UTF-8 encoded) to `path`, replacing it atomically; missing parent
   * directories are created. `mode` is the permission bits (default 0o644). Resolves to the bytes
   * written. The controller accepts at most 256 MiB (PayloadTooLargeError).
   */
  async write(path: string, data: Uint8Array | ArrayBuffer | string, options: { mode?: number } = {}): Promise<number> {
    let raw: Uint8Array;
    if (typeof data === "string") raw = new TextEncoder().encode(data);
    else if (data instanceof Uint8Array) raw = data;
    else if (data instanceof ArrayBuffer) raw = new Uint8Array(data);
    else throw new TypeError(`data: expected a Uint8Array, an ArrayBuffer or a string, got ${typeof data}`);
    const mode = checkInt(options.mode ?? 0o644, "mode", 0, 0o7777);
    const r = await this.sb.http.json<Schemas["WriteResult"]>(
      { method: "PUT", path: this.sb.path("/files"), query: { path: guestPath(path), mode }, body: raw });
    return r.bytes_written;
  }

  /** The entries of a directory, sorted by name. */
  async list(path: string): Promise<FileEntry[]> {
    const r = await this.sb.http.json<Schemas["FileList"]>(
      { method: "GET", path: this.sb.path("/files/list"), query: { path: guestPath(path) } });
    return r.entries.map(fileEntry);
  }

  /** One file's type, size, mode and mtime; NotFoundError if it does not exist. */
  async stat(path: string): Promise<FileEntry> {
    return fileEntry(await this.sb.http.json<Schemas["FileEntry"]>(
      { method: "GET", path: this.sb.path("/files/stat"), query: { path: guestPath(path) } }));
  }

  /** Create a directory and its missing parents (no error if it exists). */
  async makeDir(path: string): Promise<void> {
    const body: Schemas["MkdirRequest"] = { path: guestPath(path), parents: true };
    await this.sb.http.nothing({ method: "POST", path: this.sb.path("/files/mkdir"), json: body });
  }

  /** Remove a file, or a directory (which must be empty unless `recursive`). */
  async remove(path: string, options: { recursive?: boolean } = {}): Promise<void> {
    await this.sb.http.nothing({ method: "DELETE", path: this.sb.path("/files"),
                                 query: { path: guestPath(path), recursive: options.recursive ?? false } });
  }

  /** Whether `path` exists. A NotFoundError still means the *sandbox* is gone. */
  async exists(path: string): Promise<boolean> {
    try {
      await this.stat(path);
      return true;
    } catch (err) {
      if (!(err instanceof NotFoundError)) throw err;
      await this.sb.refresh(); // 404 is both "no such file" and "no such sandbox": tell them apart
      return false;
    }
  }
}
