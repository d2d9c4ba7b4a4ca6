//! The file system view of a process-level sandbox, computed once from the policy and
//! realised by both the native `process` backend (as mounts) and `bubblewrap` (as
//! arguments), so the two backends cannot drift apart.

use std::path::{Path, PathBuf};

use policy::{Access, FsView};
use serde::{Deserialize, Serialize};

/// Host directories every program needs, bound read-only (or re-created as the same
/// symlink when the host has merged `/usr`).
pub const SYSTEM_DIRS: &[&str] = &[
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
];

/// What every process-tier sandbox (and, by default, every microVM) sees besides the
/// policy's own paths, for `policy explain`: (path or paths, what the sandbox gets).
pub fn system_view_summary() -> Vec<(String, String)> {
    let present: Vec<&str> = SYSTEM_DIRS
        .iter()
        .copied()
        .filter(|d| std::path::Path::new(d).exists())
        .collect();
    vec![
        (present.join(", "), "read-only (the host's)".into()),
        (
            format!("/etc: {} entries", ETC_ALLOWLIST.len()),
            format!(
                "read-only copies or binds of the host's {}",
                ETC_ALLOWLIST.join(" ")
            ),
        ),
        (
            "/tmp".into(),
            "read-write, the sandbox's own (memory-backed, empty at start)".into(),
        ),
        (
            "/dev".into(),
            "null zero full random urandom tty, shm, pts (the sandbox's own)".into(),
        ),
        ("/proc".into(), "the sandbox's own processes only".into()),
        (SECRET_PATHS.join(" "), "never shown, on any tier".into()),
    ]
}

/// The parts of `/etc` that hold no secrets and that programs commonly read.
pub const ETC_ALLOWLIST: &[&str] = &[
    "alternatives",
    "bash.bashrc",
    "ca-certificates",
    "ca-certificates.conf",
    "debian_version",
    "environment",
    "gai.conf",
    "group",
    "host.conf",
    "hosts",
    "inputrc",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "locale.alias",
    "localtime",
    "mime.types",
    "nsswitch.conf",
    "os-release",
    "passwd",
    "profile",
    "protocols",
    "python3",
    "services",
    "ssl",
    "terminfo",
    "timezone",
];

/// Host paths no sandbox ever sees, on any tier, whatever the policy grants: password
/// hashes, SSH host keys, TLS private keys. The process tiers mask each one that lies
/// inside something they bind (the `/etc` allowlist's `ssl`, or a policy's grant); the
/// microVM refuses to share them and hides them inside every share (`microvm/shares.rs`).
pub const SECRET_PATHS: &[&str] = &[
    "/etc/shadow",
    "/etc/shadow-",
    "/etc/gshadow",
    "/etc/gshadow-",
    "/etc/ssh",
    "/etc/ssl/private",
];

/// The hostname the sandbox sees.
pub const SANDBOX_HOSTNAME: &str = "mxc-sandbox";

/// One step in building the sandbox's root. Paths are absolute paths as the sandbox sees
/// them; `src` paths are host paths.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MountOp {
    /// Bind the host path `src` at `dst` (recursively).
    Bind {
        src: PathBuf,
        dst: PathBuf,
        readonly: bool,
        dir: bool,
    },
    /// Hide `dst`: an empty read-only tmpfs for a directory, `/dev/null` for a file.
    Mask { dst: PathBuf, dir: bool },
    /// A symbolic link at `dst` pointing at `target`.
    Symlink { target: PathBuf, dst: PathBuf },
    /// A fresh writable tmpfs at `dst`.
    Tmpfs {
        dst: PathBuf,
        mode: u32,
        /// Made read-only once everything below it is in place.
        readonly: bool,
        /// Its size limit in bytes (`None`: the kernel's default, half the host's RAM).
        size: Option<u64>,
    },
    /// A small read-only file at `dst`.
    File { dst: PathBuf, contents: String },
    /// A minimal `/dev` (null, zero, full, random, urandom, tty, fd links, shm, pts).
    Dev,
    /// A fresh `/proc` of the sandbox's own PID namespace.
    Proc,
}

/// How the sandbox's network is set up (it changes what `/etc/resolv.conf` says).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetMode {
    /// A private network namespace with only loopback: no network at all.
    LoopbackOnly,
    /// A private network namespace with only loopback, where 127.0.0.1:`port` is the
    /// host's policy proxy (the only way out; names are resolved by the proxy).
    Proxied { port: u16 },
}

/// The complete view, ready for a backend to realise.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxView {
    pub ops: Vec<MountOp>,
    /// Paths Landlock grants read (and execute) access beneath.
    pub landlock_ro: Vec<PathBuf>,
    /// Paths Landlock grants write access beneath: every kind of file but FIFOs and Unix
    /// sockets, which a host process could open to talk to the sandbox.
    pub landlock_rw: Vec<PathBuf>,
    /// The sandbox's own directories (its tmpfs `/tmp`, its `/dev`): full access, FIFOs
    /// and sockets included, as no host process sees them.
    pub landlock_private: Vec<PathBuf>,
    /// Working directory when neither the request nor the policy names one.
    pub default_cwd: PathBuf,
}

impl SandboxView {
    /// Compute the view for `fs` on this host. `host_cwd` is where the user ran mxc-vm.
    pub fn build(fs: &FsView, net: NetMode, host_cwd: Option<&Path>) -> Self {
        let mut v = SandboxView {
            ops: Vec::new(),
            landlock_ro: Vec::new(),
            landlock_rw: Vec::new(),
            landlock_private: Vec::new(),
            default_cwd: PathBuf::from("/tmp"),
        };
        v.add_system_dirs();
        v.add_etc(net);
        v.ops.push(MountOp::Dev);
        v.ops.push(MountOp::Tmpfs {
            dst: "/tmp".into(),
            mode: 0o1777,
            readonly: false,
            size: None,
        });
        v.ops.push(MountOp::Proc);
        v.landlock_private.extend(["/tmp".into(), "/dev".into()]);
        v.landlock_ro.push("/proc".into());
        v.add_policy(fs);
        // Landlock rights reach through mount points: where a read-write grant lies
        // below (or above) a private directory, that directory gets the grants' rights.
        let granted = v.landlock_rw.clone();
        let (shared, private): (Vec<PathBuf>, Vec<PathBuf>) = v
            .landlock_private
            .drain(..)
            .partition(|p| granted.iter().any(|g| p.starts_with(g) || g.starts_with(p)));
        v.landlock_private = private;
        v.landlock_rw.extend(shared);
        v.mask_secrets();
        v.default_cwd = default_cwd(fs, host_cwd);
        v
    }

    /// Size the sandbox's RAM-backed `/tmp` within the memory limit, so that writing to it
    /// cannot bypass `limits.memoryMiB` (a tmpfs defaults to half the host's RAM).
    pub fn limit_tmp(&mut self, memory_mib: Option<u64>) {
        for op in &mut self.ops {
            if let MountOp::Tmpfs { dst, size, .. } = op {
                if dst == Path::new("/tmp") {
                    *size = memory_mib.map(|m| m.saturating_mul(1 << 20));
                }
            }
        }
    }

    /// Mask every secret path the binds so far would show (last, so that no later bind
    /// can uncover one).
    fn mask_secrets(&mut self) {
        for secret in SECRET_PATHS.iter().map(Path::new) {
            let Ok(meta) = std::fs::symlink_metadata(secret) else {
                continue;
            };
            if self.is_visible(secret) {
                self.ops.push(MountOp::Mask {
                    dst: secret.to_path_buf(),
                    dir: meta.is_dir(),
                });
            }
        }
    }

    fn add_system_dirs(&mut self) {
        for dir in SYSTEM_DIRS {
            let path = Path::new(dir);
            let Ok(meta) = std::fs::symlink_metadata(path) else {
                continue;
            };
            if meta.file_type().is_symlink() {
                if let Ok(target) = std::fs::read_link(path) {
                    self.ops.push(MountOp::Symlink {
                        target,
                        dst: path.into(),
                    });
                }
            } else if meta.is_dir() {
                self.ops.push(MountOp::Bind {
                    src: path.into(),
                    dst: path.into(),
                    readonly: true,
                    dir: true,
                });
                self.landlock_ro.push(path.into());
            }
        }
    }

    fn add_etc(&mut self, net: NetMode) {
        self.ops.push(MountOp::Tmpfs {
            dst: "/etc".into(),
            mode: 0o755,
            readonly: true,
            size: None,
        });
        for name in ETC_ALLOWLIST {
            let path = Path::new("/etc").join(name);
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.file_type().is_symlink() {
                if let Ok(target) = std::fs::read_link(&path) {
                    self.ops.push(MountOp::Symlink { target, dst: path });
                }
            } else {
                self.ops.push(MountOp::Bind {
                    src: path.clone(),
                    dst: path,
                    readonly: true,
                    dir: meta.is_dir(),
                });
            }
        }
        self.ops.push(MountOp::File {
            dst: "/etc/hostname".into(),
            contents: format!("{SANDBOX_HOSTNAME}\n"),
        });
        let resolv = match net {
            NetMode::LoopbackOnly => {
                "# mxc-vm: this sandbox has no network route; names do not resolve here.\n\
                 nameserver 127.0.0.1\n"
                    .to_string()
            }
            NetMode::Proxied { port } => format!(
                "# mxc-vm: no DNS in this sandbox; the policy proxy on 127.0.0.1:{port} \
                 (HTTP_PROXY, HTTPS_PROXY) resolves allowed names on the host.\n\
                 nameserver 127.0.0.1\n"
            ),
        };
        self.ops.push(MountOp::File {
            dst: "/etc/resolv.conf".into(),
            contents: resolv,
        });
        self.landlock_ro.push("/etc".into());
    }

    fn add_policy(&mut self, fs: &FsView) {
        for entry in fs.entries.iter().filter(|e| e.exists) {
            match entry.access {
                Access::Denied => {
                    if self.is_visible(&entry.path) {
                        self.pin_parents(&entry.path);
                        self.ops.push(MountOp::Mask {
                            dst: entry.path.clone(),
                            dir: entry.is_dir,
                        });
                    }
                }
                Access::ReadOnly | Access::ReadWrite => {
                    let readonly = entry.access == Access::ReadOnly;
                    self.ops.push(MountOp::Bind {
                        src: entry.path.clone(),
                        dst: entry.path.clone(),
                        readonly,
                        dir: entry.is_dir,
                    });
                    if readonly {
                        self.landlock_ro.push(entry.path.clone());
                    } else {
                        self.landlock_rw.push(entry.path.clone());
                    }
                }
            }
        }
    }

    /// Make every directory between `path`'s innermost read-write bind and `path` a mount
    /// point of its own (a bind onto itself): the kernel refuses to rename or remove a
    /// mount point (`EBUSY`), so the sandbox cannot move a denied path out from under its
    /// mask (`mv /T/d /T/d2` would carry the mask along and leave the host's file at
    /// `/T/d2/secret`, where the next run's rule does not find it). The mask on the
    /// denied path itself is a mount point already.
    fn pin_parents(&mut self, path: &Path) {
        let Some(MountOp::Bind {
            dst: grant,
            readonly: false,
            ..
        }) =
            self.ops.iter().rev().find(
                |op| matches!(op, MountOp::Bind { dst, dir: true, .. } if path.starts_with(dst)),
            )
        else {
            return; // read-only: nothing below it can be renamed anyway
        };
        let grant = grant.clone();
        let mut parents: Vec<PathBuf> = path
            .ancestors()
            .skip(1)
            .take_while(|p| *p != grant && p.starts_with(&grant))
            .map(Path::to_path_buf)
            .collect();
        parents.reverse();
        for dir in parents {
            if std::fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
                self.ops.push(MountOp::Bind {
                    src: dir.clone(),
                    dst: dir,
                    readonly: false,
                    dir: true,
                });
            }
        }
    }

    /// Whether `path` would be visible in the sandbox given the ops so far.
    /// Refuses, before anything is set up, what a process tier cannot enforce for `spec`:
    /// a deny rule for a missing path a grant would show, and `limits.diskMiB`.
    pub(crate) fn refuse_unenforceable(
        &self,
        spec: &crate::SandboxSpec,
        backend: &'static str,
    ) -> Result<(), crate::SandboxError> {
        self.refuse_missing_denies(&spec.view, backend)?;
        crate::limits::refuse_disk_limit(&spec.policy.limits, backend)
    }

    /// Refuses what the process tiers cannot keep: a deny rule for a path that does not
    /// exist yet, where a grant would show it. A mask needs something to cover; a file
    /// the host creates there during the run would be visible inside. (The microVM's fs
    /// server denies such a path by name.)
    fn refuse_missing_denies(
        &self,
        fs: &FsView,
        backend: &'static str,
    ) -> Result<(), crate::SandboxError> {
        let masked = |p: &Path| {
            self.ops
                .iter()
                .any(|op| matches!(op, MountOp::Mask { dst, .. } if p.starts_with(dst)))
        };
        match fs.entries.iter().find(|e| {
            e.access == Access::Denied && !e.exists && self.is_visible(&e.path) && !masked(&e.path)
        }) {
            None => Ok(()),
            Some(e) => Err(crate::SandboxError::Unenforceable {
                backend,
                what: format!(
                    "the deny rule for {} (from {}): the path does not exist, and a file the \
                     host created there during the run would be visible inside, as a mask \
                     needs something to cover; create it first (an empty file will do), or \
                     use --backend microvm, which denies it by name",
                    e.path.display(),
                    e.origins
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }),
        }
    }

    fn is_visible(&self, path: &Path) -> bool {
        self.ops.iter().any(|op| match op {
            MountOp::Bind { dst, .. } => path.starts_with(dst),
            MountOp::File { dst, .. } => path == dst,
            _ => false,
        })
    }
}

/// The host's cwd when the policy grants it, else the first read-write directory, else /tmp.
fn default_cwd(fs: &FsView, host_cwd: Option<&Path>) -> PathBuf {
    if let Some(cwd) = host_cwd {
        if fs.access_for(cwd) != Access::Denied {
            return cwd.to_path_buf();
        }
    }
    first_rw_dir(fs).unwrap_or_else(|| PathBuf::from("/tmp"))
}

/// The first existing read-write directory of the view: where a command runs when the
/// host's cwd is not granted (every backend).
pub(crate) fn first_rw_dir(fs: &FsView) -> Option<PathBuf> {
    fs.entries
        .iter()
        .find(|e| e.access == Access::ReadWrite && e.is_dir && e.exists)
        .map(|e| e.path.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use policy::{Origin, ViewEntry};

    fn entry(path: &str, access: Access, is_dir: bool) -> ViewEntry {
        ViewEntry {
            path: path.into(),
            access,
            exists: true,
            is_dir,
            origins: vec![Origin::Flag("test".into())],
        }
    }

    #[test]
    fn denied_path_inside_a_bound_tree_is_masked() {
        let fs = FsView {
            entries: vec![
                entry("/work", Access::ReadWrite, true),
                entry("/work/.env", Access::Denied, false),
            ],
            warnings: vec![],
        };
        let v = SandboxView::build(&fs, NetMode::LoopbackOnly, None);
        assert!(v.ops.contains(&MountOp::Mask {
            dst: "/work/.env".into(),
            dir: false
        }));
    }

    #[test]
    fn every_secret_a_bind_would_show_is_masked_last() {
        // /etc/ssl is on the /etc allowlist; a policy may also grant all of /etc.
        let fs = FsView {
            entries: vec![entry("/etc", Access::ReadOnly, true)],
            warnings: vec![],
        };
        let v = SandboxView::build(&fs, NetMode::LoopbackOnly, None);
        for secret in SECRET_PATHS {
            let Ok(meta) = std::fs::symlink_metadata(secret) else {
                continue;
            };
            let mask = v.ops.iter().rposition(|o| {
                *o == MountOp::Mask {
                    dst: secret.into(),
                    dir: meta.is_dir(),
                }
            });
            let last_bind = v
                .ops
                .iter()
                .rposition(|o| matches!(o, MountOp::Bind { .. }));
            assert!(mask > last_bind, "{secret} is masked after every bind");
        }
    }

    #[test]
    fn denied_path_outside_every_bind_needs_no_mask() {
        let fs = FsView {
            entries: vec![entry("/srv/secret", Access::Denied, true)],
            warnings: vec![],
        };
        let v = SandboxView::build(&fs, NetMode::LoopbackOnly, None);
        assert!(!v
            .ops
            .iter()
            .any(|o| matches!(o, MountOp::Mask { dst, .. } if dst.starts_with("/srv"))));
    }

    #[test]
    fn cwd_defaults_to_first_rw_dir_when_host_cwd_is_not_granted() {
        let fs = FsView {
            entries: vec![
                entry("/data", Access::ReadOnly, true),
                entry("/work", Access::ReadWrite, true),
            ],
            warnings: vec![],
        };
        let v = SandboxView::build(&fs, NetMode::LoopbackOnly, Some(Path::new("/home/u")));
        assert_eq!(v.default_cwd, PathBuf::from("/work"));
    }

    #[test]
    fn a_proxied_sandbox_has_no_nameserver_but_its_own_loopback() {
        let v = SandboxView::build(&FsView::default(), NetMode::Proxied { port: 3128 }, None);
        let resolv = v.ops.iter().find_map(|o| match o {
            MountOp::File { dst, contents } if dst == Path::new("/etc/resolv.conf") => {
                Some(contents.clone())
            }
            _ => None,
        });
        let servers: Vec<String> = resolv
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("nameserver"))
            .map(str::to_string)
            .collect();
        assert_eq!(servers, vec!["nameserver 127.0.0.1".to_string()]);
    }

    #[test]
    fn secrets_in_etc_are_not_bound() {
        let v = SandboxView::build(&FsView::default(), NetMode::LoopbackOnly, None);
        let bound_shadow = v.ops.iter().any(|o| match o {
            MountOp::Bind { src, .. } => src.starts_with("/etc/shadow"),
            _ => false,
        });
        assert!(!bound_shadow);
    }
}
