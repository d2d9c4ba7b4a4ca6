//! A network lab for the egress tests: a network namespace made for one test, joined to
//! the host by a veth pair on a TEST-NET-2 (198.51.100.0/24) /30, with Python test
//! servers inside it (HTTP, HTTPS with a certificate made for the test, UDP), and a
//! hosts file that maps test names onto it for the proxy (`MXC_VM_PROXY_HOSTS`).
//! Nothing leaves this machine. Everything is removed on drop.
//!
//! TEST-NET-2 addresses are ordinary (not private, not loopback) to the proxy, so a
//! domain rule alone reaches them, as it would a public server.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

use crate::TempDir;

/// The Python interpreter the servers run under (the system one: stable startup).
const PYTHON: &str = "/usr/bin/python3";

/// The servers inside the lab's namespace.
const SERVER_PY: &str = r#"
import hashlib, http.server, os, random, socket, ssl, sys, threading, time
addr, out = sys.argv[1], sys.argv[2]
lock = threading.Lock()
state = {"now": 0, "max": 0}
base = random.Random(7).randbytes(1 << 20)

class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def reply(self, body, code=200):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        p = self.path
        if p.startswith("/slow"):
            with lock:
                state["now"] += 1
                state["max"] = max(state["max"], state["now"])
            time.sleep(2.0)
            with lock:
                state["now"] -= 1
            self.reply(b"ok\n")
        elif p == "/max":
            self.reply(str(state["max"]).encode())
        elif p.startswith("/blob/"):
            n = int(p[6:])
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.send_header("Connection", "close")
            self.end_headers()
            h = hashlib.sha256()
            i = 0
            left = n
            while left > 0:
                chunk = (i.to_bytes(8, "little") + base[8:])[:left]
                self.wfile.write(chunk)
                h.update(chunk)
                left -= len(chunk)
                i += 1
            self.wfile.flush()
            with open(os.path.join(out, "blob-%d.sha256" % n), "w") as f:
                f.write(h.hexdigest())
        else:
            host = self.headers.get("Host", "")
            self.reply(("hello from the lab: %s %s\n" % (host, p)).encode())

class S(http.server.ThreadingHTTPServer):
    request_queue_size = 1024
    daemon_threads = True

servers = [S((addr, 80), H), S((addr, 8081), H)]
tls = S((addr, 443), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(os.path.join(out, "cert.pem"), os.path.join(out, "key.pem"))
tls.socket = ctx.wrap_socket(tls.socket, server_side=True)
servers.append(tls)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind((addr, 53))
def udp_loop():
    while True:
        data, peer = udp.recvfrom(2048)
        with open(os.path.join(out, "udp.log"), "a") as f:
            f.write("%s %d\n" % (peer[0], len(data)))
for s in servers:
    threading.Thread(target=s.serve_forever, daemon=True).start()
threading.Thread(target=udp_loop, daemon=True).start()
print("READY", flush=True)
while True:
    time.sleep(3600)
"#;

/// Runs a command, panicking with its output when it fails.
fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", args[0]));
    assert!(
        out.status.success(),
        "`{}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Removes labs left behind by test processes that no longer exist.
fn remove_stale_labs() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix("mxclab") else {
            continue;
        };
        let pid = rest.split('x').next().unwrap_or("");
        if !pid.is_empty() && !Path::new("/proc").join(pid).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}

/// One test's network namespace and servers.
#[derive(Debug)]
pub struct NetLab {
    ns: String,
    veth: String,
    /// The servers' address inside the namespace.
    pub addr: String,
    dir: TempDir,
    server: Option<Child>,
}

impl NetLab {
    /// Creates the namespace, the veth pair, a certificate for `cert_names`, and starts
    /// the servers. Needs root (`ip netns`).
    pub fn new(cert_names: &[&str]) -> Self {
        static CLEAN: Once = Once::new();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        // SAFETY: geteuid has no preconditions and touches no memory.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "the network egress tests need root to create network namespaces (ip netns add); \
             run them as root (CI does)"
        );
        CLEAN.call_once(remove_stale_labs);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let block = (pid.wrapping_mul(7).wrapping_add(n)) % 64;
        let host_addr = format!("198.51.100.{}", block * 4 + 1);
        let addr = format!("198.51.100.{}", block * 4 + 2);
        let ns = format!("mxclab{pid}x{n}");
        let veth = format!("mxv{}x{n}", pid % 100_000);
        let peer = format!("{veth}p");
        let dir = TempDir::new("netlab");
        let lab = NetLab {
            ns: ns.clone(),
            veth: veth.clone(),
            addr: addr.clone(),
            dir,
            server: None,
        };
        sh(&["ip", "netns", "add", &ns]);
        sh(&[
            "ip", "link", "add", &veth, "type", "veth", "peer", "name", &peer,
        ]);
        sh(&["ip", "link", "set", &peer, "netns", &ns]);
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{host_addr}/30"),
            "dev",
            &veth,
        ]);
        sh(&["ip", "link", "set", &veth, "up"]);
        let inside = |args: &[&str]| {
            let mut all = vec!["ip", "netns", "exec", &ns];
            all.extend_from_slice(args);
            sh(&all);
        };
        inside(&["ip", "addr", "add", &format!("{addr}/30"), "dev", &peer]);
        inside(&["ip", "link", "set", &peer, "up"]);
        inside(&["ip", "link", "set", "lo", "up"]);
        lab.make_cert(cert_names);
        let mut lab = lab;
        lab.start_servers();
        lab
    }

    fn make_cert(&self, names: &[&str]) {
        let san: Vec<String> = names.iter().map(|n| format!("DNS:{n}")).collect();
        let cn = format!("/CN={}", names.first().copied().unwrap_or("lab.test"));
        let ext = format!("subjectAltName={}", san.join(","));
        sh(&[
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &cn,
            "-addext",
            &ext,
            "-keyout",
            &self.path("key.pem"),
            "-out",
            &self.path("cert.pem"),
        ]);
    }

    fn start_servers(&mut self) {
        std::fs::write(self.dir.join("server.py"), SERVER_PY).expect("write server.py");
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns, PYTHON])
            .arg(self.dir.join("server.py"))
            .args([&self.addr, &self.dir.s("")])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the lab servers");
        let stdout = child.stdout.take().expect("server stdout");
        self.server = Some(child);
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read from the lab servers");
        assert_eq!(line.trim(), "READY", "the lab servers did not start");
    }

    /// A file in the lab's directory, as a string.
    pub fn path(&self, name: &str) -> String {
        self.dir.s(name)
    }

    /// The lab's directory (certificate, hosts files, server outputs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a hosts file: every name in `lab_names` resolves to the lab's servers,
    /// `others` are `(address, name)` pairs. Returns its path.
    pub fn hosts(&self, lab_names: &[&str], others: &[(&str, &str)]) -> PathBuf {
        let mut text = String::new();
        for n in lab_names {
            text.push_str(&format!("{} {n}\n", self.addr));
        }
        for (a, n) in others {
            text.push_str(&format!("{a} {n}\n"));
        }
        let path = self.dir.join("hosts");
        std::fs::write(&path, text).expect("write hosts");
        path
    }

    /// Waits (up to `timeout`) for a file the servers write and returns its contents.
    pub fn wait_for_file(&self, name: &str, timeout: Duration) -> Option<String> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(text) = std::fs::read_to_string(self.dir.join(name)) {
                if !text.is_empty() {
                    return Some(text);
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// A GET from the host straight to the lab (not through any sandbox).
    pub fn get(&self, path: &str) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect((self.addr.as_str(), 80)).expect("lab");
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n"
        )
        .expect("send");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("read");
        text.split("\r\n\r\n").nth(1).unwrap_or("").to_string()
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        if let Some(mut c) = self.server.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .stderr(Stdio::null())
            .output();
    }
}
