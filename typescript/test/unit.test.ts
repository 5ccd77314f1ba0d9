// Tests that need no daemon: configuration, argument checks, error mapping, NDJSON parsing.
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  APIConnectionError,
  AuthenticationError,
  BadRequestError,
  CodeError,
  Controller,
  ForkdError,
  GatewayTimeoutError,
  InternalServerError,
  NotFoundError,
  ServiceUnavailableError,
  UnprocessableEntityError,
  ValidationError,
  errorForStatus,
} from "../src/index.js";
import { argvOf, base64, seconds } from "../src/checks.js";
import { DEFAULT_URL, resolveEndpoint } from "../src/config.js";

function withEnv(vars: Record<string, string | undefined>, fn: () => void): void {
  const old: Record<string, string | undefined> = {};
  for (const [k, v] of Object.entries(vars)) {
    old[k] = process.env[k];
    if (v === undefined) delete process.env[k];
    else process.env[k] = v;
  }
  try {
    fn();
  } finally {
    for (const [k, v] of Object.entries(old)) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  }
}

test("the endpoint comes from the options, else FORKD_URL / FORKD_TOKEN, else the default", () => {
  withEnv({ FORKD_URL: undefined, FORKD_TOKEN: undefined }, () => {
    assert.deepEqual(resolveEndpoint(), { url: DEFAULT_URL, baseUrl: "http://127.0.0.1:8889", token: undefined });
  });
  withEnv({ FORKD_URL: "http://10.1.2.3:9000/api/", FORKD_TOKEN: " s3cret \n" }, () => {
    assert.deepEqual(resolveEndpoint(), { url: "http://10.1.2.3:9000/api/", baseUrl: "http://10.1.2.3:9000/api",
                                          token: "s3cret" });
    assert.equal(resolveEndpoint("https://h:1", "t").baseUrl, "https://h:1");
    assert.equal(resolveEndpoint(undefined, "t").token, "t");
  });
  assert.equal(DEFAULT_URL, "http://127.0.0.1:8889"); // the Python SDK's (forkd.sdk._config.DEFAULT_URL)
  assert.throws(() => resolveEndpoint("unix:/run/forkd.sock"), /Unix sockets are not supported/);
  assert.throws(() => resolveEndpoint("ftp://h"), TypeError);
  assert.throws(() => resolveEndpoint("http://h", "a b"), /whitespace/);
});

test("a string command runs under /bin/sh -c; an array is the argv", () => {
  assert.deepEqual(argvOf("echo hi | wc -c"), ["/bin/sh", "-c", "echo hi | wc -c"]);
  assert.deepEqual(argvOf(["ls", "-l"]), ["ls", "-l"]);
  assert.throws(() => argvOf(""), RangeError);
  assert.throws(() => argvOf([]), RangeError);
  assert.throws(() => argvOf(["ls", 3]), TypeError);
});

test("timeouts are milliseconds, sent as seconds", () => {
  assert.equal(seconds(1500, "timeoutMs"), 1.5);
  assert.throws(() => seconds(0, "timeoutMs"), RangeError);
  assert.throws(() => seconds(Number.POSITIVE_INFINITY, "timeoutMs"), RangeError);
  assert.throws(() => seconds("5" as unknown as number, "timeoutMs"), TypeError);
});

test("base64 of every byte value", () => {
  const all = Uint8Array.from({ length: 256 }, (_, i) => i);
  assert.equal(base64(all), Buffer.from(all).toString("base64"));
});

test("HTTP statuses map to typed errors", () => {
  const cases: [number, new (...a: never[]) => Error][] = [
    [400, BadRequestError], [401, AuthenticationError], [404, NotFoundError], [422, UnprocessableEntityError],
    [503, ServiceUnavailableError], [504, GatewayTimeoutError], [502, InternalServerError],
  ];
  for (const [status, cls] of cases) {
    const e = errorForStatus(status, "msg");
    assert.ok(e instanceof cls, `${status} -> ${e.name}`);
    assert.ok(e instanceof ForkdError);
    assert.equal(e.status, status);
    assert.equal(e.message, "msg");
  }
  assert.ok(errorForStatus(400, "x") instanceof ValidationError);
  assert.ok(errorForStatus(422, "x") instanceof ValidationError);
  assert.ok(errorForStatus(503, "x") instanceof InternalServerError);
});

test("an error body is parsed, the token redacted, and a stream read line by line", async () => {
  const token = "tok-123456";
  let seen: RequestInit | undefined;
  const ctl = new Controller({
    url: "http://forkd.invalid:1", token,
    fetch: async (_url, init) => {
      seen = init;
      return new Response(JSON.stringify({ error: `bad token ${token}` }), { status: 401 });
    },
  });
  await assert.rejects(ctl.list(), (e: unknown) => {
    assert.ok(e instanceof AuthenticationError);
    assert.equal(e.status, 401);
    assert.equal(e.message, "bad token [REDACTED]");
    return true;
  });
  assert.equal((seen?.headers as Record<string, string>).Authorization, `Bearer ${token}`);

  // an NDJSON answer split across chunks at awkward places, multi-byte characters included
  const lines = [{ type: "start", pid: 7 }, { type: "stdout", data: "héllo ✓\n" }, { type: "stderr", data: "e" },
                 { type: "exit", exit_code: 3, timed_out: false, duration_s: 0.25 }];
  const bytes = new TextEncoder().encode(lines.map((l) => JSON.stringify(l)).join("\n") + "\n");
  const streaming = new Controller({
    url: "http://forkd.invalid:1",
    fetch: async (url, init) => {
      if (String(url).endsWith("/v1/sandboxes/sb-1")) {
        return new Response(JSON.stringify({ id: "sb-1", snapshot_tag: "t", status: "running", pid: 1, created_at: 1 }), { status: 200 });
      }
      assert.equal(JSON.parse(String(init.body)).stream, true);
      const body = new ReadableStream<Uint8Array>({
        start(c) {
          for (let i = 0; i < bytes.length; i += 5) c.enqueue(bytes.subarray(i, i + 5));
          c.close();
        },
      });
      return new Response(body, { status: 200, headers: { "Content-Type": "application/x-ndjson" } });
    },
  });
  const sb = await streaming.get("sb-1");
  const out: string[] = [];
  const r = await sb.commands.run("x", { onStdout: (t) => { out.push(t); } });
  assert.deepEqual(out, ["héllo ✓\n"]);
  // what a callback throws comes out as it was (not as a transport failure)
  await assert.rejects(sb.commands.run("x", { onStdout: () => { throw new TypeError("mine"); } }),
                       (e: unknown) => e instanceof TypeError && e.message === "mine");
  assert.deepEqual({ ...r }, { exitCode: 3, stdout: "héllo ✓\n", stderr: "e", timedOut: false, stdoutTruncated: false,
                               stderrTruncated: false, durationMs: 250, ok: false });
});

test("a streamed runCode: chunks to the callbacks, the result last, an error event typed by its status", async () => {
  let answer: object[] = [];
  const ctl = new Controller({
    url: "http://forkd.invalid:1",
    fetch: async (url, init) => {
      if (String(url).endsWith("/v1/sandboxes/sb-1")) {
        return new Response(JSON.stringify({ id: "sb-1", snapshot_tag: "t", status: "running", pid: 1, created_at: 1 }), { status: 200 });
      }
      assert.deepEqual(JSON.parse(String(init.body)), { code: "c", timeout_s: 5, stream: true });
      return new Response(answer.map((l) => JSON.stringify(l) + "\n").join(""), { status: 200 });
    },
  });
  const sb = await ctl.get("sb-1");
  answer = [{ type: "stdout", data: "a\n" }, { type: "stderr", data: "w\n" }, { type: "stdout", data: "b\n" },
            { type: "result", ok: true, repr: "42", value: 42, error: null, stdout: "", stderr: "" }];
  const out: string[] = [];
  const r = await sb.runCode("c", { timeoutMs: 5_000, onStdout: (t) => { out.push(t); } });
  assert.deepEqual(out, ["a\n", "b\n"]);
  assert.deepEqual(r, { stdout: "a\nb\n", stderr: "w\n", value: 42, repr: "42" });

  answer = [{ type: "stdout", data: "x" },
            { type: "result", ok: false, error: { type: "ValueError", message: "no", traceback: "tb" }, stdout: "", stderr: "" }];
  await assert.rejects(sb.runCode("c", { timeoutMs: 5_000, onStdout: () => undefined }), (e: unknown) => {
    assert.ok(e instanceof CodeError);
    assert.deepEqual([e.type, e.errorMessage, e.traceback, e.stdout, e.message], ["ValueError", "no", "tb", "x", "ValueError: no"]);
    return true;
  });

  answer = [{ type: "stdout", data: "x" }, { type: "error", error: "timed out after 5 s", status: 504 }];
  await assert.rejects(sb.runCode("c", { timeoutMs: 5_000, onStderr: () => undefined }), GatewayTimeoutError);
  answer = [{ type: "stdout", data: "x" }];
  await assert.rejects(sb.runCode("c", { timeoutMs: 5_000, onStderr: () => undefined }), /ended before/);
});

test("no daemon listening is an APIConnectionError", async () => {
  const ctl = new Controller({ url: "http://127.0.0.1:9", timeoutMs: 10_000 });
  await assert.rejects(ctl.health(), APIConnectionError);
});
