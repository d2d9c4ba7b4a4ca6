/// <reference types="node" />

/** An error answered by the service: HTTP status, error code and message. */
export declare class MxcVmError extends Error {
  readonly status: number;
  readonly code: string;
  readonly detail: string;
}

/** Where `mxc-vm serve` listens unless told otherwise. */
export declare function defaultSocket(): string;

export interface ClientOptions {
  /** The service's Unix socket (default: {@link defaultSocket}). */
  socketPath?: string;
  /** `http://host:port` of a service started with `--listen`. */
  baseUrl?: string;
  /** Bearer token of a TCP service. */
  token?: string;
}

export interface CreateOptions {
  /** A policy in either format (mxc-vm native or MXC ContainerConfig), or its JSON text. */
  policy?: Record<string, unknown> | string;
  backend?: "process" | "bubblewrap" | "microvm" | "auto";
  ttlS?: number;
  idleTtlS?: number;
  labels?: Record<string, string>;
  client?: Client;
}

export interface ExecOptions {
  env?: Record<string, string>;
  cwd?: string;
  stdin?: string | Uint8Array;
  timeoutMs?: number;
  onStdout?: (chunk: Buffer) => void;
  onStderr?: (chunk: Buffer) => void;
  /** The exec's id, once the service accepted it (for `Sandbox.signal`). */
  onStart?: (execId: number) => void;
}

export interface RunningExec {
  id: number;
  argv: string[];
  started_unix_ms: number;
}

export interface ExecResult {
  exitCode: number | null;
  signal: number | null;
  timedOut: boolean;
  outputTruncated: boolean;
  durationMs: number;
  stdout: Buffer;
  stderr: Buffer;
}

export interface DirEntry {
  name: string;
  kind: "file" | "dir" | "symlink" | "other";
  size: number;
}

export interface SandboxInfo {
  id: string;
  backend: string;
  state: string;
  labels: Record<string, string>;
  created_unix_ms: number;
  ttl_s: number | null;
  idle_ttl_s: number | null;
  running_execs: number;
  execs: number;
}

export declare class Client {
  constructor(options?: ClientOptions);
  health(): Promise<{ status: string }>;
  createSandbox(options?: CreateOptions): Promise<Sandbox>;
  sandboxes(): Promise<SandboxInfo[]>;
}

export declare class Files {
  write(path: string, data: string | Uint8Array): Promise<number>;
  read(path: string): Promise<Buffer>;
  list(path: string): Promise<DirEntry[]>;
}

export declare class Sandbox {
  readonly id: string;
  readonly client: Client;
  info: SandboxInfo;
  readonly files: Files;
  static create(options?: CreateOptions): Promise<Sandbox>;
  exec(argv: string[], options?: ExecOptions): Promise<ExecResult>;
  execs(): Promise<RunningExec[]>;
  signal(execId: number, signal?: number | string): Promise<void>;
  refresh(): Promise<SandboxInfo>;
  close(): Promise<void>;
}
