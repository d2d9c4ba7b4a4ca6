//! One cgroup v2 per exec: the process limit (`pids.max`) and a kill that reaches every
//! descendant, including those that left the exec's process group (`cgroup.kill`).
//!
//! As PID 1 the agent mounts cgroup2 at `/sys/fs/cgroup` and uses its root; as a normal
//! process it uses the directory given with `--cgroup` (and no cgroup without it).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use crate::sys;

/// A cgroup operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The directory is not a cgroup v2 directory we can use.
    #[error("{path} is not a usable cgroup v2 directory")]
    NotCgroup {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Creating or configuring an exec's cgroup failed.
    #[error("cannot set up cgroup {path}")]
    Setup {
        /// The file or directory at fault.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A process limit was asked for, but the pids controller is not available.
    #[error("the pids controller is not enabled under {path}")]
    NoPidsController {
        /// The cgroup root.
        path: PathBuf,
    },
}

/// The directory under which the agent creates one cgroup per exec.
#[derive(Debug)]
pub struct CgroupRoot {
    dir: PathBuf,
    pids: bool,
    seq: u64,
}

impl CgroupRoot {
    /// Uses `dir`, enabling the pids controller for its children where possible.
    pub fn open(dir: &Path) -> Result<Self, CgroupError> {
        let not_cgroup = |source| CgroupError::NotCgroup {
            path: dir.to_owned(),
            source,
        };
        std::fs::metadata(dir.join("cgroup.procs")).map_err(not_cgroup)?;
        let subtree = dir.join("cgroup.subtree_control");
        let _ = std::fs::write(&subtree, "+pids");
        let enabled = std::fs::read_to_string(&subtree).map_err(not_cgroup)?;
        Ok(Self {
            dir: dir.to_owned(),
            pids: enabled.split_ascii_whitespace().any(|c| c == "pids"),
            seq: 0,
        })
    }

    /// Creates the cgroup for one exec, with at most `pids_max` processes if given.
    pub fn create(&mut self, pids_max: Option<u64>) -> Result<ExecCgroup, CgroupError> {
        if pids_max.is_some() && !self.pids {
            return Err(CgroupError::NoPidsController {
                path: self.dir.clone(),
            });
        }
        self.seq += 1;
        let dir = self
            .dir
            .join(format!("mxc-exec-{}-{}", sys::getpid(), self.seq));
        let setup = |path: &Path| {
            let path = path.to_owned();
            move |source| CgroupError::Setup { path, source }
        };
        std::fs::create_dir(&dir).map_err(setup(&dir))?;
        let configure = || {
            if let Some(max) = pids_max {
                let file = dir.join("pids.max");
                std::fs::write(&file, max.to_string()).map_err(setup(&file))?;
            }
            let procs = dir.join("cgroup.procs");
            sys::open(&procs, libc::O_WRONLY).map_err(setup(&procs))
        };
        match configure() {
            Ok(fd) => Ok(ExecCgroup {
                dir,
                procs: Some(fd),
            }),
            Err(e) => {
                let _ = std::fs::remove_dir(&dir);
                Err(e)
            }
        }
    }
}

/// The cgroup of one exec. Dropping it does not remove it: call [`ExecCgroup::kill`]
/// and [`ExecCgroup::try_remove`] (again later while it is still busy).
#[derive(Debug)]
pub struct ExecCgroup {
    dir: PathBuf,
    procs: Option<OwnedFd>,
}

impl ExecCgroup {
    /// The open `cgroup.procs`, which the child writes "0" to in order to join.
    pub fn procs_fd(&self) -> Option<RawFd> {
        self.procs.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// Closes our handle on `cgroup.procs` (after the child has joined).
    pub fn close_procs(&mut self) {
        self.procs = None;
    }

    /// SIGKILLs every process in the cgroup.
    pub fn kill(&self) {
        if std::fs::write(self.dir.join("cgroup.kill"), "1").is_ok() {
            return;
        }
        // Kernels before 5.14 have no cgroup.kill: kill what is listed.
        if let Ok(list) = std::fs::read_to_string(self.dir.join("cgroup.procs")) {
            for pid in list.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                let _ = sys::kill(pid, libc::SIGKILL);
            }
        }
    }

    /// Removes the cgroup; `false` while processes are still in it.
    pub fn try_remove(&self) -> bool {
        match std::fs::remove_dir(&self.dir) {
            Ok(()) => true,
            Err(e) => e.kind() == io::ErrorKind::NotFound,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_directory_is_not_a_cgroup() {
        let dir = std::env::temp_dir();

        let err = CgroupRoot::open(&dir).unwrap_err();

        assert!(matches!(err, CgroupError::NotCgroup { .. }));
    }
}
