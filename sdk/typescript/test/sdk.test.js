// The TypeScript/JavaScript SDK against a real `mxc-vm serve` (process tiers).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import readline from "node:readline";
import { fileURLToPath } from "node:url";

import { Client, MxcVmError, Sandbox } from "../index.js";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..", "..");
const bin = process.env.MXC_VM_BIN || path.join(root, "target", "debug", "mxc-vm");
let server;
let client;
let dir;
let work;
let policy;

before(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "mxc-sdk-ts-"));
  const socketPath = path.join(dir, "api.sock");
  server = spawn(bin, ["serve", "--socket", socketPath], { stdio: ["ignore", "pipe", "inherit"] });
  const line = await new Promise((resolve) => {
    readline.createInterface({ input: server.stdout }).once("line", resolve);
  });
  assert.equal(JSON.parse(line).type, "listening");
  client = new Client({ socketPath });
  work = path.join(dir, "work");
  fs.mkdirSync(path.join(work, "secret"), { recursive: true });
  fs.writeFileSync(path.join(work, "secret", "key"), "top secret");
  policy = { version: "1", filesystem: { readwrite: [work], denied: [path.join(work, "secret")] } };
});

after(async () => {
  const exited = new Promise((resolve) => server.once("exit", (code, signal) => resolve([code, signal])));
  server.kill("SIGTERM");
  assert.deepEqual(await exited, [143, null]);
  fs.rmSync(dir, { recursive: true, force: true });
});

test("health", async () => {
  assert.deepEqual(await client.health(), { status: "ok" });
});

test("exec streams output, passes stdin and exit codes", async () => {
  for (const backend of ["process", "bubblewrap"]) {
    const sb = await Sandbox.create({ client, backend, policy });
    const seen = [];
    const r = await sb.exec(["sh", "-c", "echo one; cat; echo two >&2; exit 3"], {
      stdin: "piped\n",
      onStdout: (c) => seen.push(c),
    });
    assert.equal(r.exitCode, 3);
    assert.equal(r.stdout.toString(), "one\npiped\n");
    assert.equal(r.stderr.toString(), "two\n");
    assert.equal(Buffer.concat(seen).toString(), "one\npiped\n");
    const slow = await sb.exec(["sleep", "5"], { timeoutMs: 200 });
    assert.equal(slow.timedOut, true);
    const [a, b] = await Promise.all([sb.exec(["echo", "a"]), sb.exec(["echo", "b"])]);
    assert.deepEqual([a.stdout.toString(), b.stdout.toString()].sort(), ["a\n", "b\n"]);
    assert.equal((await sb.refresh()).execs, 4);
    await sb.close();
  }
});

test("files follow the policy", async () => {
  const sb = await client.createSandbox({ backend: "process", policy });
  const file = path.join(work, "hello.txt");
  assert.equal(await sb.files.write(file, "hi there"), 8);
  assert.equal((await sb.files.read(file)).toString(), "hi there");
  assert.equal((await sb.exec(["cat", file])).stdout.toString(), "hi there");
  assert.deepEqual((await sb.files.list(work)).map((e) => e.name), ["hello.txt"]);
  await assert.rejects(sb.files.read(path.join(work, "secret", "key")), (e) => {
    assert.ok(e instanceof MxcVmError);
    assert.equal(e.status, 403);
    assert.equal(e.code, "path_denied");
    return true;
  });
  await assert.rejects(sb.files.write("/etc/hostname", "x"), { code: "path_denied" });
  await sb.close();
});

test("errors are typed", async () => {
  await assert.rejects(client.createSandbox({ policy: { version: "1", filesystem: { deny: [] } } }), {
    status: 400,
    code: "policy_validation",
  });
  const sb = await client.createSandbox({ backend: "process" });
  await sb.close();
  await sb.close();
  await assert.rejects(sb.exec(["true"]), { status: 404, code: "not_found" });
});

test("execs run side by side and take signals", async () => {
  const sb = await Sandbox.create({ client, backend: "process" });
  try {
    let started;
    const gotId = new Promise((resolve) => (started = resolve));
    const running = sb.exec(
      ["sh", "-c", "trap 'echo got-term; exit 7' TERM; touch /tmp/t; while :; do sleep 0.05; done"],
      { onStart: started },
    );
    const id = await gotId;
    // Another exec runs while the first one does.
    for (let i = 0; i < 400; i++) {
      if ((await sb.exec(["test", "-e", "/tmp/t"])).exitCode === 0) break;
    }
    assert.deepEqual((await sb.execs()).map((e) => e.id), [id]);
    await sb.signal(id, "TERM");
    const r = await running;
    assert.equal(r.exitCode, 7);
    assert.equal(r.stdout.toString(), "got-term\n");
    await assert.rejects(sb.signal(id, "TERM"), { status: 404 });
    await assert.rejects(sb.signal(id, "SIGFOO"), { status: 400, code: "malformed_request" });
  } finally {
    await sb.close();
  }
});
