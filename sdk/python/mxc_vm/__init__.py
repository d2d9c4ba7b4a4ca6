"""Client for `mxc-vm serve`: long-lived sandboxes, commands with streamed output,
files in and out. Standard library only."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import socket
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

__all__ = [
    "AsyncClient",
    "AsyncSandbox",
    "Client",
    "ExecResult",
    "MxcVmError",
    "Sandbox",
    "default_socket",
]

Output = Callable[[bytes], None]


class MxcVmError(Exception):
    """An error answered by the service: HTTP `status`, `code` and `message`."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{code}: {message} (HTTP {status})")
        self.status = status
        self.code = code
        self.message = message


@dataclass
class ExecResult:
    """How a command ended, with everything it wrote."""

    exit_code: Optional[int]
    signal: Optional[int]
    timed_out: bool
    output_truncated: bool
    duration_ms: float
    stdout: bytes = b""
    stderr: bytes = b""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


def default_socket() -> str:
    """Where `mxc-vm serve` listens unless told otherwise."""
    if os.environ.get("MXC_VM_SOCKET"):
        return os.environ["MXC_VM_SOCKET"]
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "mxc-vm", "serve.sock")
    return f"/tmp/mxc-vm-{os.getuid()}/serve.sock"


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: Optional[float]):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if self.timeout is not None:
            sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def _raise_for(resp: http.client.HTTPResponse) -> None:
    if resp.status < 400:
        return
    body = resp.read()
    try:
        err = json.loads(body)["error"]
        raise MxcVmError(resp.status, err["code"], err["message"])
    except (ValueError, KeyError, TypeError):
        raise MxcVmError(resp.status, "http_error", body.decode(errors="replace")) from None


class Client:
    """A connection to `mxc-vm serve`: a Unix socket (default) or `base_url` with a
    bearer `token`."""

    def __init__(
        self,
        socket_path: Optional[str] = None,
        base_url: Optional[str] = None,
        token: Optional[str] = None,
        timeout: Optional[float] = None,
    ):
        self.socket_path = None if base_url else (socket_path or default_socket())
        self.base_url = urllib.parse.urlsplit(base_url) if base_url else None
        self.token = token
        self.timeout = timeout

    def _connection(self) -> http.client.HTTPConnection:
        if self.base_url is not None:
            return http.client.HTTPConnection(
                self.base_url.hostname or "127.0.0.1", self.base_url.port or 80, timeout=self.timeout
            )
        return _UnixConnection(self.socket_path or default_socket(), self.timeout)

    def request(
        self,
        method: str,
        path: str,
        body: Union[bytes, Any, None] = None,
        json_body: Any = None,
        query: Optional[Dict[str, str]] = None,
    ):
        """Send one request; returns the open response (errors raise MxcVmError)."""
        if query:
            path = f"{path}?{urllib.parse.urlencode(query)}"
        headers = {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if json_body is not None:
            body = json.dumps(json_body).encode()
            headers["Content-Type"] = "application/json"
        conn = self._connection()
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
        except BaseException:
            conn.close()
            raise
        # One connection per request: the response owns the socket from here, and the
        # descriptor goes when the response is read to its end or closed.
        if conn.sock is not None:
            sock, conn.sock = conn.sock, None
            sock.close()
        _raise_for(resp)
        return resp

    def _json(self, method: str, path: str, **kw) -> Any:
        return json.loads(self.request(method, path, **kw).read())

    def health(self) -> Dict[str, Any]:
        return self._json("GET", "/v1/health")

    def create_sandbox(
        self,
        policy: Union[Dict[str, Any], str, None] = None,
        backend: Optional[str] = None,
        ttl_s: Optional[int] = None,
        idle_ttl_s: Optional[int] = None,
        labels: Optional[Dict[str, str]] = None,
    ) -> "Sandbox":
        body: Dict[str, Any] = {}
        for key, value in (
            ("policy", policy),
            ("backend", backend),
            ("ttl_s", ttl_s),
            ("idle_ttl_s", idle_ttl_s),
            ("labels", labels),
        ):
            if value is not None:
                body[key] = value
        info = self._json("POST", "/v1/sandboxes", json_body=body)
        return Sandbox(self, info)

    def sandboxes(self) -> List[Dict[str, Any]]:
        return self._json("GET", "/v1/sandboxes")["sandboxes"]

    def sandbox(self, sandbox_id: str) -> "Sandbox":
        return Sandbox(self, self._json("GET", f"/v1/sandboxes/{sandbox_id}"))


class Files:
    """A sandbox's files, as its policy lets it see them."""

    def __init__(self, sandbox: "Sandbox"):
        self._sb = sandbox

    def write(self, path: str, data: Union[bytes, str]) -> int:
        if isinstance(data, str):
            data = data.encode()
        resp = self._sb.client.request(
            "PUT", f"/v1/sandboxes/{self._sb.id}/files", body=data, query={"path": path}
        )
        return json.loads(resp.read())["bytes"]

    def read(self, path: str) -> bytes:
        return self._sb.client.request(
            "GET", f"/v1/sandboxes/{self._sb.id}/files", query={"path": path}
        ).read()

    def list(self, path: str) -> List[Dict[str, Any]]:
        resp = self._sb.client.request(
            "GET", f"/v1/sandboxes/{self._sb.id}/list", query={"path": path}
        )
        return json.loads(resp.read())["entries"]


class Sandbox:
    """A live sandbox. Use as a context manager, or call `close()`."""

    def __init__(self, client: Client, info: Dict[str, Any]):
        self.client = client
        self.info = info
        self.id: str = info["id"]
        self.files = Files(self)

    @classmethod
    def create(cls, client: Optional[Client] = None, **kw) -> "Sandbox":
        return (client or Client()).create_sandbox(**kw)

    def exec(
        self,
        argv: Sequence[str],
        *,
        env: Optional[Dict[str, str]] = None,
        cwd: Optional[str] = None,
        stdin: Union[bytes, str, None] = None,
        timeout_ms: Optional[int] = None,
        on_stdout: Optional[Output] = None,
        on_stderr: Optional[Output] = None,
        on_start: Optional[Callable[[int], None]] = None,
    ) -> ExecResult:
        """Run a command; output reaches the callbacks as it comes and is also kept in
        the result. `on_start` gets the exec's id as soon as the service accepted it
        (for `signal`). Persistent process and microVM sandboxes run execs from several
        threads side by side."""
        body: Dict[str, Any] = {"argv": list(argv)}
        if env:
            body["env"] = env
        if cwd:
            body["cwd"] = cwd
        if stdin is not None:
            raw = stdin.encode() if isinstance(stdin, str) else stdin
            body["stdin_b64"] = base64.b64encode(raw).decode()
        if timeout_ms is not None:
            body["timeout_ms"] = timeout_ms
        resp = self.client.request("POST", f"/v1/sandboxes/{self.id}/exec", json_body=body)
        exec_id = resp.getheader("x-exec-id")
        if on_start and exec_id is not None:
            on_start(int(exec_id))
        out: List[bytes] = []
        err: List[bytes] = []
        end: Optional[Dict[str, Any]] = None
        for line in resp:
            if not line.strip():
                continue
            event = json.loads(line)
            kind = event.get("type")
            if kind in ("stdout", "stderr"):
                chunk = base64.b64decode(event["data_b64"])
                (out if kind == "stdout" else err).append(chunk)
                callback = on_stdout if kind == "stdout" else on_stderr
                if callback:
                    callback(chunk)
            elif kind == "error":
                e = event["error"]
                raise MxcVmError(200, e["code"], e["message"])
            elif kind == "exit":
                end = event
        if end is None:
            raise MxcVmError(200, "stream_ended", "the exec stream ended without an exit")
        return ExecResult(
            exit_code=end.get("exit_code"),
            signal=end.get("signal"),
            timed_out=end.get("timed_out", False),
            output_truncated=end.get("output_truncated", False),
            duration_ms=end.get("duration_ms", 0.0),
            stdout=b"".join(out),
            stderr=b"".join(err),
        )

    def execs(self) -> List[Dict[str, Any]]:
        """The running execs: `{"id", "argv", "started_unix_ms"}` each."""
        return self.client._json("GET", f"/v1/sandboxes/{self.id}/execs")["execs"]

    def signal(self, exec_id: int, signal: Union[int, str] = "TERM") -> None:
        """Send a signal (a number or a name such as "TERM") to a running exec's
        command and its process group. A bubblewrap sandbox delivers only KILL."""
        self.client._json(
            "POST",
            f"/v1/sandboxes/{self.id}/execs/{exec_id}/signal",
            json_body={"signal": signal},
        )

    def refresh(self) -> Dict[str, Any]:
        self.info = self.client._json("GET", f"/v1/sandboxes/{self.id}")
        return self.info

    def close(self) -> None:
        try:
            self.client.request("DELETE", f"/v1/sandboxes/{self.id}").read()
        except MxcVmError as e:
            if e.status != 404:
                raise

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncFiles:
    def __init__(self, files: Files):
        self._files = files

    async def write(self, path: str, data: Union[bytes, str]) -> int:
        return await asyncio.to_thread(self._files.write, path, data)

    async def read(self, path: str) -> bytes:
        return await asyncio.to_thread(self._files.read, path)

    async def list(self, path: str) -> List[Dict[str, Any]]:
        return await asyncio.to_thread(self._files.list, path)


class AsyncSandbox:
    """The asyncio face of a Sandbox (each call runs on a worker thread)."""

    def __init__(self, sandbox: Sandbox):
        self.sync = sandbox
        self.id = sandbox.id
        self.files = AsyncFiles(sandbox.files)

    async def exec(self, argv: Sequence[str], **kw) -> ExecResult:
        return await asyncio.to_thread(lambda: self.sync.exec(argv, **kw))

    async def execs(self) -> List[Dict[str, Any]]:
        return await asyncio.to_thread(self.sync.execs)

    async def signal(self, exec_id: int, signal: Union[int, str] = "TERM") -> None:
        await asyncio.to_thread(self.sync.signal, exec_id, signal)

    async def close(self) -> None:
        await asyncio.to_thread(self.sync.close)

    async def __aenter__(self) -> "AsyncSandbox":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


@dataclass
class AsyncClient:
    """The asyncio face of a Client."""

    socket_path: Optional[str] = None
    base_url: Optional[str] = None
    token: Optional[str] = None
    timeout: Optional[float] = None
    sync: Client = field(init=False)

    def __post_init__(self) -> None:
        self.sync = Client(self.socket_path, self.base_url, self.token, self.timeout)

    async def health(self) -> Dict[str, Any]:
        return await asyncio.to_thread(self.sync.health)

    async def create_sandbox(self, **kw) -> AsyncSandbox:
        return AsyncSandbox(await asyncio.to_thread(lambda: self.sync.create_sandbox(**kw)))

    async def sandboxes(self) -> List[Dict[str, Any]]:
        return await asyncio.to_thread(self.sync.sandboxes)
