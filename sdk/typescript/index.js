// Client for `mxc-vm serve` (see index.d.ts for the types). No dependencies.
import http from "node:http";
import os from "node:os";
import path from "node:path";

/** An error answered by the service. */
export class MxcVmError extends Error {
  constructor(status, code, message) {
    super(`${code}: ${message} (HTTP ${status})`);
    this.name = "MxcVmError";
    this.status = status;
    this.code = code;
    this.detail = message;
  }
}

/** Where `mxc-vm serve` listens unless told otherwise. */
export function defaultSocket() {
  if (process.env.MXC_VM_SOCKET) return process.env.MXC_VM_SOCKET;
  if (process.env.XDG_RUNTIME_DIR) {
    return path.join(process.env.XDG_RUNTIME_DIR, "mxc-vm", "serve.sock");
  }
  return `/tmp/mxc-vm-${os.userInfo().uid}/serve.sock`;
}

async function errorFrom(res) {
  const body = await readAll(res);
  try {
    const e = JSON.parse(body.toString()).error;
    return new MxcVmError(res.statusCode, e.code, e.message);
  } catch {
    return new MxcVmError(res.statusCode, "http_error", body.toString());
  }
}

function readAll(res) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    res.on("data", (c) => chunks.push(c));
    res.on("end", () => resolve(Buffer.concat(chunks)));
    res.on("error", reject);
  });
}

export class Client {
  /** @param {{socketPath?: string, baseUrl?: string, token?: string}} [options] */
  constructor(options = {}) {
    this.baseUrl = options.baseUrl ? new URL(options.baseUrl) : undefined;
    this.socketPath = this.baseUrl ? undefined : options.socketPath ?? defaultSocket();
    this.token = options.token;
  }

  /** One request; resolves to the response stream (errors reject with MxcVmError). */
  request(method, urlPath, { body, json, query } = {}) {
    let target = urlPath;
    if (query) target += "?" + new URLSearchParams(query).toString();
    const headers = {};
    if (this.token) headers.authorization = `Bearer ${this.token}`;
    let payload = body;
    if (json !== undefined) {
      payload = Buffer.from(JSON.stringify(json));
      headers["content-type"] = "application/json";
    }
    if (typeof payload === "string") payload = Buffer.from(payload);
    headers["content-length"] = payload ? payload.length : 0;
    const options = this.baseUrl
      ? { host: this.baseUrl.hostname, port: this.baseUrl.port || 80 }
      : { socketPath: this.socketPath };
    return new Promise((resolve, reject) => {
      const req = http.request({ ...options, method, path: target, headers, agent: false }, (res) => {
        if (res.statusCode >= 400) errorFrom(res).then(reject, reject);
        else resolve(res);
      });
      req.on("error", reject);
      req.end(payload);
    });
  }

  async json(method, urlPath, options) {
    const res = await this.request(method, urlPath, options);
    return JSON.parse((await readAll(res)).toString());
  }

  health() {
    return this.json("GET", "/v1/health");
  }

  /** @param {{policy?: object|string, backend?: string, ttlS?: number, idleTtlS?: number, labels?: Record<string,string>}} [options] */
  async createSandbox(options = {}) {
    const body = {};
    if (options.policy !== undefined) body.policy = options.policy;
    if (options.backend !== undefined) body.backend = options.backend;
    if (options.ttlS !== undefined) body.ttl_s = options.ttlS;
    if (options.idleTtlS !== undefined) body.idle_ttl_s = options.idleTtlS;
    if (options.labels !== undefined) body.labels = options.labels;
    return new Sandbox(this, await this.json("POST", "/v1/sandboxes", { json: body }));
  }

  async sandboxes() {
    return (await this.json("GET", "/v1/sandboxes")).sandboxes;
  }
}

class Files {
  constructor(sandbox) {
    this.sandbox = sandbox;
  }
  async write(filePath, data) {
    const c = this.sandbox.client;
    const res = await c.json("PUT", `/v1/sandboxes/${this.sandbox.id}/files`, {
      body: typeof data === "string" ? Buffer.from(data) : data,
      query: { path: filePath },
    });
    return res.bytes;
  }
  async read(filePath) {
    const res = await this.sandbox.client.request("GET", `/v1/sandboxes/${this.sandbox.id}/files`, {
      query: { path: filePath },
    });
    return readAll(res);
  }
  async list(dirPath) {
    const res = await this.sandbox.client.json("GET", `/v1/sandboxes/${this.sandbox.id}/list`, {
      query: { path: dirPath },
    });
    return res.entries;
  }
}

export class Sandbox {
  constructor(client, info) {
    this.client = client;
    this.info = info;
    this.id = info.id;
    this.files = new Files(this);
  }

  static create(options = {}) {
    return (options.client ?? new Client()).createSandbox(options);
  }

  /**
   * Run a command; output reaches the callbacks as it comes and is kept in the result.
   * `onStart` gets the exec's id once the service accepted it (for `signal`). Persistent
   * process and microVM sandboxes run several execs side by side.
   */
  async exec(argv, options = {}) {
    const body = { argv };
    if (options.env) body.env = options.env;
    if (options.cwd) body.cwd = options.cwd;
    if (options.stdin !== undefined) body.stdin_b64 = Buffer.from(options.stdin).toString("base64");
    if (options.timeoutMs !== undefined) body.timeout_ms = options.timeoutMs;
    const res = await this.client.request("POST", `/v1/sandboxes/${this.id}/exec`, { json: body });
    const execId = res.headers["x-exec-id"];
    if (options.onStart && execId !== undefined) options.onStart(Number(execId));
    const out = [];
    const err = [];
    let end;
    let failure;
    let pending = "";
    const onLine = (line) => {
      if (!line.trim()) return;
      const event = JSON.parse(line);
      if (event.type === "stdout" || event.type === "stderr") {
        const chunk = Buffer.from(event.data_b64, "base64");
        (event.type === "stdout" ? out : err).push(chunk);
        const cb = event.type === "stdout" ? options.onStdout : options.onStderr;
        if (cb) cb(chunk);
      } else if (event.type === "exit") {
        end = event;
      } else if (event.type === "error") {
        failure = new MxcVmError(200, event.error.code, event.error.message);
      }
    };
    for await (const chunk of res) {
      pending += chunk.toString();
      let nl;
      while ((nl = pending.indexOf("\n")) >= 0) {
        onLine(pending.slice(0, nl));
        pending = pending.slice(nl + 1);
      }
    }
    onLine(pending);
    if (failure) throw failure;
    if (!end) throw new MxcVmError(200, "stream_ended", "the exec stream ended without an exit");
    return {
      exitCode: end.exit_code,
      signal: end.signal,
      timedOut: end.timed_out,
      outputTruncated: end.output_truncated,
      durationMs: end.duration_ms,
      stdout: Buffer.concat(out),
      stderr: Buffer.concat(err),
    };
  }

  /** The running execs: `{id, argv, started_unix_ms}` each. */
  async execs() {
    return (await this.client.json("GET", `/v1/sandboxes/${this.id}/execs`)).execs;
  }

  /**
   * Send a signal (a number or a name such as "TERM") to a running exec's command and its
   * process group. A bubblewrap sandbox delivers only KILL.
   */
  async signal(execId, signal = "TERM") {
    await this.client.json("POST", `/v1/sandboxes/${this.id}/execs/${execId}/signal`, {
      json: { signal },
    });
  }

  async refresh() {
    this.info = await this.client.json("GET", `/v1/sandboxes/${this.id}`);
    return this.info;
  }

  async close() {
    try {
      await this.client.json("DELETE", `/v1/sandboxes/${this.id}`);
    } catch (e) {
      if (!(e instanceof MxcVmError) || e.status !== 404) throw e;
    }
  }
}
