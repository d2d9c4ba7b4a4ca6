//! A client of `mxc-vm serve` for tests: the server started on a socket of its own, one
//! HTTP/1.1 request per connection (`Connection: close`), chunked replies decoded.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use crate::TempDir;

/// `mxc-vm serve` on a socket in a temporary directory; killed when dropped.
#[derive(Debug)]
pub struct Server {
    pub child: Child,
    pub socket: PathBuf,
    pub tcp: Option<String>,
    _dir: TempDir,
}

impl Server {
    pub fn start(extra: &[&str]) -> Self {
        Self::start_with_env(extra, &[])
    }

    /// [`Server::start`] with these environment variables set.
    pub fn start_with_env(extra: &[&str], env: &[(&str, &std::path::Path)]) -> Self {
        let dir = TempDir::new("serve");
        let socket = dir.join("api.sock");
        let mut child = Command::new(crate::mxc_vm_bin())
            .arg("serve")
            .arg("--socket")
            .arg(&socket)
            .args(extra)
            .envs(env.iter().map(|(k, v)| (*k, *v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).expect("a listening line");
        assert_eq!(v["type"], "listening", "{line}");
        Self {
            child,
            socket,
            tcp: v["tcp"].as_str().map(str::to_string),
            _dir: dir,
        }
    }

    /// Descriptors the service process holds open now.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Waits up to 10 s for the service's descriptors to fall to `at_most`; returns the
    /// last count.
    pub fn fds_settle_to(&self, at_most: usize) -> usize {
        let give_up = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let n = self.open_fds();
            if n <= at_most || std::time::Instant::now() > give_up {
                return n;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    pub fn call(&self, method: &str, path: &str, body: &[u8]) -> Reply {
        let stream = UnixStream::connect(&self.socket).unwrap();
        exchange(stream, method, path, body, &[])
    }

    pub fn json(&self, method: &str, path: &str, body: serde_json::Value) -> Reply {
        self.call(method, path, body.to_string().as_bytes())
    }

    /// Start `argv` in sandbox `id`, delete the sandbox `after` later; the delete's
    /// status, the exec's last event, and the time from the start to that event.
    pub fn delete_during_exec(
        &self,
        id: &str,
        argv: &[&str],
        after: std::time::Duration,
    ) -> (u16, serde_json::Value, std::time::Duration) {
        let started = std::time::Instant::now();
        std::thread::scope(|s| {
            let running = s.spawn(|| {
                self.json(
                    "POST",
                    &format!("/v1/sandboxes/{id}/exec"),
                    serde_json::json!({ "argv": argv }),
                )
            });
            std::thread::sleep(after);
            let deleted = self
                .call("DELETE", &format!("/v1/sandboxes/{id}"), b"")
                .status;
            let last = running
                .join()
                .ok()
                .and_then(|r| r.lines().pop())
                .unwrap_or_default();
            (deleted, last, started.elapsed())
        })
    }

    /// SIGTERM, then the exit code.
    pub fn stop(mut self) -> i32 {
        // SAFETY: kill() on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        std::os::unix::process::ExitStatusExt::into_raw(status) >> 8
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A whole reply: status and body (chunked transfer decoded).
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }
    /// The `{"error": {"code", "message"}}` of an error reply.
    pub fn error(&self) -> (u16, String, String) {
        let v = self.json();
        (
            self.status,
            v["error"]["code"].as_str().unwrap_or("?").to_string(),
            v["error"]["message"].as_str().unwrap_or("?").to_string(),
        )
    }
    pub fn lines(&self) -> Vec<serde_json::Value> {
        self.body
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect()
    }
}

/// One HTTP/1.1 request (`Connection: close`), the whole reply read, chunked bodies
/// decoded.
pub fn exchange<S: Read + Write>(
    mut stream: S,
    method: &str,
    path: &str,
    body: &[u8],
    headers: &[(&str, &str)],
) -> Reply {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: mxc\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a reply head");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut rest = raw[split + 4..].to_vec();
    let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = Vec::new();
        loop {
            let eol = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let size = usize::from_str_radix(std::str::from_utf8(&rest[..eol]).unwrap().trim(), 16)
                .unwrap();
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[eol + 2..eol + 2 + size]);
            rest = rest[eol + 2 + size + 2..].to_vec();
        }
        rest = out;
    }
    Reply { status, body: rest }
}

/// Standard base64 (the API's `stdin_b64`).
pub fn b64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard base64 (the API's `data_b64`).
pub fn unb64(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let mut out = Vec::new();
    for chunk in s.as_bytes().chunks(4) {
        let pad = chunk.iter().filter(|c| **c == b'=').count();
        let n = chunk
            .iter()
            .filter(|c| **c != b'=')
            .enumerate()
            .fold(0u32, |acc, (i, c)| {
                acc | (u32::from(val(*c)) << (18 - 6 * i))
            });
        for i in 0..3 - pad {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}
