//! Resource limits: a delegated cgroup v2 when the host offers one; else cgroup v1's pids
//! controller for `pids` (with `RLIMIT_AS` for memory); else rlimits.
//!
//! `RLIMIT_NPROC` alone does not hold when mxc-vm runs as root: the kernel exempts the
//! initial namespace's uid 0, so a sandbox of root's could fork without bound.

use std::path::{Path, PathBuf};

use policy::Limits;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum LimitsError {
    #[error("cannot create cgroup {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {value} to {path}")]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: std::io::Error,
    },
}

/// One rlimit to set: (resource, soft = hard value).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    pub resource: u32,
    pub value: u64,
}

/// How the limits of a policy are enforced on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enforcement {
    /// A delegated cgroup v2 directory under which mxc-vm creates one cgroup per sandbox.
    Cgroup2 { parent: PathBuf },
    /// No cgroup v2, but a writable cgroup v1 pids hierarchy: one pids cgroup per sandbox
    /// for `pids`, RLIMIT_AS for memory.
    PidsV1 { parent: PathBuf, why: String },
    /// No usable cgroup: per-process rlimits (RLIMIT_AS for memory, RLIMIT_NPROC inside the
    /// sandbox's own user namespace for pids).
    Rlimits { why: String },
}

impl Enforcement {
    pub fn describe(&self) -> String {
        match self {
            Enforcement::Cgroup2 { parent } => format!("cgroup v2 under {}", parent.display()),
            Enforcement::PidsV1 { parent, why } => format!(
                "pids by the cgroup v1 pids controller under {}, memory by RLIMIT_AS ({why})",
                parent.display()
            ),
            Enforcement::Rlimits { why } => format!("rlimits ({why})"),
        }
    }
}

/// Find out how this host can enforce limits.
pub fn detect() -> Enforcement {
    match delegated_cgroup() {
        Ok(parent) => Enforcement::Cgroup2 { parent },
        Err(why) => match pids_v1_cgroup() {
            Ok(parent) => Enforcement::PidsV1 { parent, why },
            Err(v1) => Enforcement::Rlimits {
                why: format!("{why}; {v1}"),
            },
        },
    }
}

/// Our own cgroup in a writable cgroup v1 hierarchy with the pids controller.
fn pids_v1_cgroup() -> Result<PathBuf, String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
    // Fields: ... mount-point(4) options(5) ... "-" fstype source super-options.
    let mount = mountinfo
        .lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mut r = right.split_whitespace();
            let (fstype, _source, opts) = (r.next()?, r.next()?, r.next()?);
            (fstype == "cgroup" && opts.split(',').any(|o| o == "pids"))
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))
                .flatten()
        })
        .ok_or("no cgroup v1 pids hierarchy is mounted")?;
    let own = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
    let rel = own
        .lines()
        .find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            controllers.split(',').any(|c| c == "pids").then_some(path)
        })
        .ok_or("this process is in no cgroup v1 pids cgroup")?;
    let dir = mount.join(rel.trim_start_matches('/'));
    if !writable(&dir) {
        return Err(format!("{} is not writable", dir.display()));
    }
    Ok(dir)
}

fn writable(dir: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: access() only reads the NUL-terminated path we pass.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

/// Our own cgroup v2 directory if it is writable and offers the memory and pids
/// controllers to its children.
fn delegated_cgroup() -> Result<PathBuf, String> {
    let root = Path::new("/sys/fs/cgroup");
    let is_v2 = root.join("cgroup.controllers").exists();
    if !is_v2 {
        return Err("no unified cgroup v2 hierarchy at /sys/fs/cgroup".into());
    }
    let own = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
    let rel = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("this process is in no cgroup v2")?;
    let dir = root.join(rel.trim_start_matches('/'));
    let controllers =
        std::fs::read_to_string(dir.join("cgroup.controllers")).map_err(|e| e.to_string())?;
    for needed in ["memory", "pids"] {
        if !controllers.split_whitespace().any(|c| c == needed) {
            return Err(format!(
                "the {needed} controller is not delegated to {}",
                dir.display()
            ));
        }
    }
    if !writable(&dir) {
        return Err(format!("{} is not writable", dir.display()));
    }
    enable_for_children(&dir, &["memory", "pids"])?;
    Ok(dir)
}

/// Make sure `dir`'s children get `controllers` (its `cgroup.subtree_control`): a child
/// cgroup has a controller's files (`pids.max`, ...) only when its parent enables it.
/// Enabling them is refused in a non-root cgroup that holds processes itself (the "no
/// internal processes" rule): then `dir` is no cgroup to make sandboxes under.
fn enable_for_children(dir: &Path, controllers: &[&str]) -> Result<(), String> {
    let control = dir.join("cgroup.subtree_control");
    let enabled = std::fs::read_to_string(&control).map_err(|e| e.to_string())?;
    let missing: Vec<String> = controllers
        .iter()
        .filter(|c| !enabled.split_whitespace().any(|e| e == **c))
        .map(|c| format!("+{c}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    std::fs::write(&control, missing.join(" ")).map_err(|e| {
        format!(
            "the {} controllers are not enabled for the children of {} and cannot be \
             ({}: {e})",
            controllers.join(" and "),
            dir.display(),
            control.display()
        )
    })
}

/// The rlimits that carry the policy's limits a cgroup does not (`cgroup`: the sandbox
/// has one, made under `enforcement`), plus the ones every sandbox gets (no core dumps).
pub fn rlimits(limits: &Limits, enforcement: &Enforcement, cgroup: bool) -> Vec<Rlimit> {
    let mut v = vec![Rlimit {
        resource: libc::RLIMIT_CORE as _,
        value: 0,
    }];
    let (memory_by_cgroup, pids_by_cgroup) = match enforcement {
        Enforcement::Cgroup2 { .. } => (cgroup, cgroup),
        Enforcement::PidsV1 { .. } => (false, cgroup),
        Enforcement::Rlimits { .. } => (false, false),
    };
    if !memory_by_cgroup {
        if let Some(mib) = limits.memory_mib {
            v.push(Rlimit {
                resource: libc::RLIMIT_AS as _,
                value: mib.saturating_mul(1024 * 1024),
            });
        }
    }
    if !pids_by_cgroup {
        if let Some(pids) = limits.pids {
            v.push(Rlimit {
                resource: libc::RLIMIT_NPROC as _,
                value: u64::from(pids),
            });
        }
    }
    v
}

/// Apply rlimits to the calling process.
pub fn apply_rlimits(limits: &[Rlimit]) -> std::io::Result<()> {
    for l in limits {
        let rl = libc::rlimit {
            rlim_cur: l.value,
            rlim_max: l.value,
        };
        // SAFETY: setrlimit reads the struct we pass by pointer.
        if unsafe { libc::setrlimit(l.resource as _, &rl) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A per-sandbox cgroup; removed on drop.
#[derive(Debug)]
pub struct SandboxCgroup {
    path: PathBuf,
    /// A cgroup v1 pids cgroup (no `cgroup.kill`, only `pids.max`).
    v1: bool,
}

impl SandboxCgroup {
    /// The sandbox's cgroup for `enforcement`, or `None` where limits are rlimits only
    /// (or a v1 pids cgroup would hold no limit).
    pub fn for_sandbox(
        enforcement: &Enforcement,
        id: &str,
        limits: &Limits,
    ) -> Result<Option<Self>, LimitsError> {
        if let Enforcement::Cgroup2 { parent } | Enforcement::PidsV1 { parent, .. } = enforcement {
            // Once per process: a service creating many sandboxes reads the parent once.
            static SWEPT: std::sync::Once = std::sync::Once::new();
            SWEPT.call_once(|| {
                sweep_stale(parent);
            });
        }
        match enforcement {
            Enforcement::Cgroup2 { parent } => Self::create(parent, id, limits).map(Some),
            // A v1 pids cgroup holds nothing but `pids.max`: without a pids limit there
            // is no cgroup to make (joining one costs the sandbox's first process an RCU
            // grace period, ~1 ms here).
            Enforcement::PidsV1 { parent, .. } if limits.pids.is_some() => {
                Self::create_pids_v1(parent, id, limits).map(Some)
            }
            Enforcement::PidsV1 { .. } | Enforcement::Rlimits { .. } => Ok(None),
        }
    }

    /// A new, empty cgroup `mxc-vm-<id>` under `parent`.
    fn make(parent: &Path, id: &str, v1: bool) -> Result<Self, LimitsError> {
        let path = parent.join(format!("mxc-vm-{id}"));
        std::fs::create_dir(&path).map_err(|source| LimitsError::Create {
            path: path.clone(),
            source,
        })?;
        Ok(SandboxCgroup { path, v1 })
    }

    fn create_pids_v1(parent: &Path, id: &str, limits: &Limits) -> Result<Self, LimitsError> {
        let cg = Self::make(parent, id, true)?;
        if let Some(pids) = limits.pids {
            cg.write("pids.max", &pids.to_string())?;
        }
        Ok(cg)
    }

    pub fn create(parent: &Path, id: &str, limits: &Limits) -> Result<Self, LimitsError> {
        let cg = Self::make(parent, id, false)?;
        if let Some(mib) = limits.memory_mib {
            let bytes = mib.saturating_mul(1024 * 1024).to_string();
            cg.write("memory.max", &bytes)?;
            cg.write("memory.swap.max", "0").ok();
        }
        if let Some(pids) = limits.pids {
            cg.write("pids.max", &pids.to_string())?;
        }
        if let Some(cpus) = limits.vcpus {
            cg.write("cpu.max", &format!("{} 100000", u64::from(cpus) * 100_000))
                .ok();
        }
        Ok(cg)
    }

    fn write(&self, file: &str, value: &str) -> Result<(), LimitsError> {
        let path = self.path.join(file);
        std::fs::write(&path, value).map_err(|source| LimitsError::Write {
            path,
            value: value.into(),
            source,
        })
    }

    /// The cgroup's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether this is a cgroup v1 pids cgroup (else a cgroup v2 one).
    pub fn is_v1(&self) -> bool {
        self.v1
    }

    /// The file a freshly forked (so single-threaded) child writes "0" to, to join this
    /// cgroup. cgroup v1: `tasks`, which moves the calling thread only (in a
    /// single-threaded process, the whole process) and so skips the global thread-group
    /// lock that a `cgroup.procs` write takes, whose first writer waits for an RCU grace
    /// period (~10 ms on a busy host, 0.4 ms by `tasks`). cgroup v2 moves only whole
    /// processes between domain cgroups: `cgroup.procs`.
    pub fn join_file(&self) -> PathBuf {
        self.path
            .join(if self.v1 { "tasks" } else { "cgroup.procs" })
    }
}

/// Removes the empty cgroups that runs of mxc-vm which are gone left under `parent` (a
/// killed `mxc-vm` or service cannot remove its own; done once per process, at its
/// first sandbox cgroup): `mxc-vm-<pid>-<suffix>` whose pid
/// no longer runs. A cgroup that still holds processes, or whose pid runs (perhaps
/// reused), is left alone. Returns how many were removed.
pub fn sweep_stale(parent: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("mxc-vm-"))
            // (Services before ids became `<pid>-<hex>` named theirs `sb-<pid>-<n>`.)
            .map(|rest| rest.strip_prefix("sb-").unwrap_or(rest))
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<libc::pid_t>().ok())
            .filter(|&p| p > 0)
        else {
            continue;
        };
        // SAFETY: kill with signal 0 only checks whether the process exists.
        let gone = unsafe { libc::kill(pid, 0) } == -1
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone && std::fs::remove_dir(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

impl Drop for SandboxCgroup {
    fn drop(&mut self) {
        // Killing the members first lets rmdir succeed even if something escaped the wait.
        if self.v1 {
            let procs = std::fs::read_to_string(self.path.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                // SAFETY: kill() has no memory effects; these are the sandbox's processes.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        } else {
            let _ = std::fs::write(self.path.join("cgroup.kill"), "1");
        }
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
}

/// The process tiers cannot count what a command writes into its grants (`RLIMIT_FSIZE`
/// bounds one file, not the total): `limits.diskMiB` is refused there.
pub(crate) fn refuse_disk_limit(
    limits: &Limits,
    backend: &'static str,
) -> Result<(), crate::SandboxError> {
    match limits.disk_mib {
        None => Ok(()),
        Some(mib) => Err(crate::SandboxError::Unenforceable {
            backend,
            what: format!(
                "limits.diskMiB ({mib} MiB): only the microVM counts what a command writes \
                 into its grants; use --backend microvm"
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rlimits_carry_memory_and_pids_without_cgroup() {
        let limits = Limits {
            memory_mib: Some(64),
            pids: Some(32),
            ..Limits::default()
        };
        let v = rlimits(&limits, &Enforcement::Rlimits { why: String::new() }, false);
        assert!(v.contains(&Rlimit {
            resource: libc::RLIMIT_AS as _,
            value: 64 << 20
        }));
        assert!(v.contains(&Rlimit {
            resource: libc::RLIMIT_NPROC as _,
            value: 32
        }));
    }

    #[test]
    fn rlimits_leave_memory_to_the_cgroup() {
        let limits = Limits {
            memory_mib: Some(64),
            ..Limits::default()
        };
        let v = rlimits(
            &limits,
            &Enforcement::Cgroup2 {
                parent: PathBuf::new(),
            },
            true,
        );
        assert!(!v.iter().any(|r| r.resource == libc::RLIMIT_AS));
    }

    /// Ordinary directories stand in for cgroups (`rmdir` removes an empty one either
    /// way): a dead run's empty one goes, a live run's and a non-empty one stay.
    #[test]
    fn a_sweep_removes_only_empty_cgroups_of_runs_that_are_gone() {
        let parent = std::env::temp_dir().join(format!("mxc-sweep-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&parent);
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let me = std::process::id();
        for name in [
            format!("mxc-vm-{dead}-00c0ffee"),
            format!("mxc-vm-{me}-00c0ffee"),
            format!("mxc-vm-{dead}-busy"),
            format!("mxc-vm-sb-{dead}-1"),
            "other".into(),
        ] {
            std::fs::create_dir_all(parent.join(name)).unwrap();
        }
        std::fs::write(parent.join(format!("mxc-vm-{dead}-busy/member")), "").unwrap();

        let removed = sweep_stale(&parent);

        let left: std::collections::BTreeSet<String> = std::fs::read_dir(&parent)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        std::fs::remove_dir_all(&parent).unwrap();
        assert_eq!(removed, 2);
        assert!(
            !left.contains(&format!("mxc-vm-{dead}-00c0ffee")),
            "{left:?}"
        );
        assert!(left.contains(&format!("mxc-vm-{me}-00c0ffee")), "{left:?}");
        assert!(left.contains(&format!("mxc-vm-{dead}-busy")) && left.contains("other"));
    }
}
