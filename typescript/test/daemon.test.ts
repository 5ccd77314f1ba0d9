// The SDK against a real forkd-controller: FORKD_URL, FORKD_TOKEN and FORKD_TAG (a snapshot) must be set.
// tests/integration/test_typescript_sdk.py starts the daemon, creates the snapshot and runs this file.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import {
  AuthenticationError,
  CodeError,
  Controller,
  GatewayTimeoutError,
  NotFoundError,
  Sandbox,
} from "../src/index.js";

const TAG = process.env.FORKD_TAG;
if (!process.env.FORKD_URL || !process.env.FORKD_TOKEN || !TAG) {
  throw new Error("set FORKD_URL, FORKD_TOKEN and FORKD_TAG (run tests/integration/test_typescript_sdk.py)");
}
const tag: string = TAG;

// TCG (no KVM) is slow: every limit is generous
const ctl = new Controller({ timeoutMs: 600_000 });
const RUN = `ts-${process.pid}-${Date.now()}`;
const spawned: Sandbox[] = [];
const branches: string[] = [];
let a: Sandbox;
let b: Sandbox;

async function spawn(snapshotTag: string, n: number): Promise<Sandbox[]> {
  const sbs = await ctl.spawn(snapshotTag, { n, timeoutMs: 600_000, lifetimeMs: 3_600_000, metadata: { run: RUN } });
  spawned.push(...sbs);
  return sbs;
}

before(async () => {
  [a, b] = (await spawn(tag, 2)) as [Sandbox, Sandbox];
});

after(async () => {
  for (const sb of spawned) await sb.kill().catch((e) => console.error(`kill ${sb.id}: ${e}`));
  for (const t of branches) await ctl.snapshots.delete(t).catch((e) => console.error(`delete ${t}: ${e}`));
});

test("spawn 2: two running sandboxes, found by their metadata", async () => {
  assert.ok(a.id.startsWith("sb-") && b.id.startsWith("sb-") && a.id !== b.id);
  assert.equal(a.snapshotTag, tag);
  assert.equal(a.info.running, true);
  assert.deepEqual(a.info.metadata, { run: RUN });
  assert.ok(a.info.createdAt > Date.parse("2020-01-01") && a.info.createdAt <= Date.now() + 60_000, "epoch ms");
  const listed = await ctl.list({ metadata: { run: RUN } });
  assert.deepEqual(listed.map((s) => s.id).sort(), [a.id, b.id].sort());
  assert.equal((await ctl.version()).api, "v1");
  assert.equal(await ctl.health(), true);
});

test("eval in both sandboxes", async () => {
  const [x, y] = await Promise.all([a.eval("numpy.zeros(3).tolist()"), b.eval("sum(range(10))")]);
  assert.deepEqual(x, [0, 0, 0]);
  assert.equal(y, 45);
  assert.equal(await a.eval("None"), null);
  assert.equal(await a.eval("object.__name__"), "object");
  assert.match(String(await a.eval("object()")), /^<object object at/); // not JSON: its repr
  await assert.rejects(a.eval("1/0"), (e: unknown) => {
    assert.ok(e instanceof CodeError);
    assert.equal(e.type, "ZeroDivisionError");
    assert.match(e.traceback ?? "", /ZeroDivisionError/);
    return true;
  });
});

test("a streamed command delivers its first chunk before it ends", async () => {
  const chunks: { text: string; at: number }[] = [];
  const errs: string[] = [];
  const r = await a.commands.run("echo first; sleep 2; echo second; echo oops >&2; exit 7", {
    onStdout: (text) => { chunks.push({ text, at: performance.now() }); },
    onStderr: (text) => { errs.push(text); },
    timeoutMs: 120_000,
  });
  const ended = performance.now();
  assert.equal(chunks.map((c) => c.text).join(""), "first\nsecond\n");
  assert.equal(r.stdout, "first\nsecond\n");
  assert.equal(errs.join(""), "oops\n");
  assert.equal(r.stderr, "oops\n");
  assert.equal(r.exitCode, 7);
  assert.equal(r.ok, false);
  const first = chunks[0]!;
  const second = chunks.find((c) => c.text.includes("second"))!;
  assert.ok(first.text.includes("first") && !first.text.includes("second"), JSON.stringify(chunks));
  assert.ok(first.at < second.at, `first chunk at ${first.at}, second at ${second.at}`);
  assert.ok(first.at < ended);
  assert.ok(r.durationMs >= 2000, `durationMs ${r.durationMs}`);

  const plain = await a.commands.run(["sh", "-c", "echo $FOO; pwd; cat"], { env: { FOO: "bar" }, cwd: "/tmp",
                                                                        stdin: "in" });
  assert.deepEqual([plain.stdout, plain.exitCode, plain.ok], ["bar\n/tmp\nin", 0, true]);
});

test("runCode: state kept, output streamed as the code prints it, errors typed", async () => {
  const r = await a.runCode("x = 20\nprint('hi')\nx * 2");
  assert.deepEqual([r.stdout, r.value, r.repr], ["hi\n", 40, "40"]);
  assert.equal(await a.eval("x"), 20);

  const chunks: { text: string; at: number }[] = [];
  const s = await a.runCode("import time\nprint('a', flush=True)\ntime.sleep(2)\nprint('b', flush=True)\nx + 1", {
    onStdout: (text) => { chunks.push({ text, at: performance.now() }); },
    timeoutMs: 120_000,
  });
  const ended = performance.now();
  assert.equal(s.stdout, "a\nb\n");
  assert.equal(s.value, 21);
  const first = chunks[0]!;
  const second = chunks.find((c) => c.text.includes("b"))!;
  assert.ok(first.text.startsWith("a") && !first.text.includes("b"), JSON.stringify(chunks));
  assert.ok(first.at < second.at && first.at < ended, JSON.stringify({ chunks, ended }));

  const errs: string[] = [];
  await assert.rejects(a.runCode("import sys\nprint('out')\nprint('err', file=sys.stderr)\n1/0",
                                 { onStdout: () => undefined, onStderr: (t) => { errs.push(t); } }),
    (e: unknown) => {
      assert.ok(e instanceof CodeError);
      assert.equal(e.type, "ZeroDivisionError");
      assert.equal(e.stdout, "out\n");
      assert.equal(e.stderr, "err\n");
      return true;
    });
  assert.equal(errs.join(""), "err\n");
});

test("background processes are listed, fed and killed", async () => {
  const cat = await a.commands.run(["cat"], { background: true, timeoutMs: null });
  const sleeper = await a.commands.run("sleep 600", { background: true, timeoutMs: null });
  const procs = new Map((await a.commands.list()).map((p) => [p.pid, p]));
  assert.ok(procs.has(cat.pid) && procs.has(sleeper.pid));
  assert.equal(procs.get(cat.pid)!.running, true);
  assert.deepEqual(procs.get(cat.pid)!.argv, ["cat"]);
  assert.equal(await cat.sendStdin("hello\n"), 6);
  await cat.sendStdin(new Uint8Array([0x00, 0xff, ...new TextEncoder().encode("bytes")]), { eof: true });
  const r = await cat.wait();
  assert.equal(r.exitCode, 0);
  assert.ok(r.stdout.startsWith("hello\n") && r.stdout.endsWith("bytes"), JSON.stringify(r.stdout));
  assert.equal(await sleeper.kill(), true);
  assert.equal((await sleeper.wait()).exitCode, -9);
  assert.deepEqual(await a.commands.list(), []); // both read to the end: forgotten
  await assert.rejects(a.commands.connect(cat.pid), NotFoundError);
});

test("files: a round trip of all 256 byte values, text, list, stat, remove", async () => {
  const all = Uint8Array.from({ length: 256 }, (_, i) => i);
  assert.equal(await a.files.write("/tmp/ts/dir/bytes.bin", all, { mode: 0o600 }), 256);
  const back = await a.files.read("/tmp/ts/dir/bytes.bin");
  assert.ok(back instanceof Uint8Array);
  assert.deepEqual([...back], [...all]);
  const st = await a.files.stat("/tmp/ts/dir/bytes.bin");
  assert.deepEqual([st.size, st.mode, st.type, st.isFile], [256, 0o600, "file", true]);
  assert.equal((await a.commands.run("wc -c < /tmp/ts/dir/bytes.bin")).stdout.trim(), "256");
  await a.files.write("/tmp/ts/t.txt", "héllo ✓");
  assert.equal(await a.files.readText("/tmp/ts/t.txt"), "héllo ✓");
  await a.files.makeDir("/tmp/ts/empty");
  assert.deepEqual((await a.files.list("/tmp/ts")).map((e) => [e.name, e.type]),
                   [["dir", "dir"], ["empty", "dir"], ["t.txt", "file"]]);
  assert.equal(await a.files.exists("/tmp/ts/t.txt"), true);
  await a.files.remove("/tmp/ts", { recursive: true });
  assert.equal(await a.files.exists("/tmp/ts/t.txt"), false);
  await assert.rejects(a.files.read("/tmp/ts/t.txt"), NotFoundError);
});

test("branch, then spawn from the branch and see the state", async () => {
  await a.commands.run("echo branched > /tmp/mark");
  await a.runCode(`marker = ${JSON.stringify(RUN)}`);
  const branchTag = `ts-branch-${process.pid}`;
  const br = await a.branch(branchTag);
  branches.push(br.tag);
  assert.equal(br.tag, branchTag);
  assert.equal(br.status, "ready");
  assert.equal(br.branchedFrom, a.id);
  assert.ok(br.pauseMs !== null && br.pauseMs >= 0);
  const snap = await ctl.snapshots.get(branchTag);
  assert.ok(snap.kind === "delta" || snap.kind === "flat");
  assert.deepEqual(snap.ancestors?.[0], tag);
  assert.ok((await ctl.snapshots.list()).some((s) => s.tag === branchTag));
  const [g] = (await spawn(branchTag, 1)) as [Sandbox];
  assert.equal(g.snapshotTag, branchTag);
  assert.equal(await g.files.readText("/tmp/mark"), "branched\n");
  assert.equal(await g.eval("marker"), RUN);
  assert.equal(await a.eval("marker"), RUN); // the source keeps running
  await g.kill();
});

test("setTimeout sets the lifetime in milliseconds", async () => {
  const before = Date.now();
  const info = await b.setTimeout(600_000);
  assert.ok(info.expiresAt !== null);
  assert.ok(info.expiresAt >= before + 600_000 - 5_000 && info.expiresAt <= Date.now() + 600_000 + 5_000,
            `expiresAt ${info.expiresAt}, now ${Date.now()}`);
  assert.equal(b.info.expiresAt, info.expiresAt);
});

test("a timed-out eval is a GatewayTimeoutError, and the sandbox answers the next call", async () => {
  await assert.rejects(b.eval("sum(i for i in range(10**12))", { timeoutMs: 2_000 }), GatewayTimeoutError);
  assert.equal(await b.eval("1 + 1"), 2);
  const seen: string[] = [];
  await assert.rejects(b.runCode("print('start', flush=True)\nsum(i for i in range(10**12))",
                                 { timeoutMs: 2_000, onStdout: (t) => { seen.push(t); } }), GatewayTimeoutError);
  assert.equal(seen.join(""), "start\n");
  assert.equal(await b.eval("2 + 2"), 4);
});

test("kill: the sandbox is gone (404), and killing it again is no error", async () => {
  await b.kill();
  await assert.rejects(ctl.get(b.id), (e: unknown) => e instanceof NotFoundError && e.status === 404);
  await b.kill();
});

test("Sandbox.with kills the sandbox when the function throws", async () => {
  let id = "";
  await assert.rejects(Sandbox.with({ tag, controller: ctl, timeoutMs: 600_000 }, async (sb) => {
    id = sb.id;
    assert.equal(await sb.eval("2 * 21"), 42);
    throw new Error("boom");
  }), /boom/);
  assert.ok(id.startsWith("sb-"));
  await assert.rejects(ctl.get(id), NotFoundError);
});

test("a wrong token is an AuthenticationError with status 401", async () => {
  const wrong = new Controller({ token: "definitely-not-the-token" });
  await assert.rejects(wrong.list(), (e: unknown) => {
    assert.ok(e instanceof AuthenticationError, String(e));
    assert.equal(e.status, 401);
    assert.ok(!e.message.includes("definitely-not-the-token"));
    return true;
  });
  assert.equal(await wrong.health(), true); // /healthz needs no token
});

test("a missing sandbox is a NotFoundError", async () => {
  await assert.rejects(ctl.get("sb-does-not-exist"), (e: unknown) => e instanceof NotFoundError && e.status === 404);
  const ghost = new Sandbox(ctl, { ...a.info, id: "sb-does-not-exist" });
  await assert.rejects(ghost.eval("1"), NotFoundError);
});
