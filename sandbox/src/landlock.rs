//! Landlock as the second file-system layer on the process tiers (the native init and
//! bubblewrap's exec helper): even if a mount were wrong, the command can only read what
//! the view marks readable and write what it marks writable.

use std::path::PathBuf;

use landlock::{
    Access, AccessFs, BitFlags, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus, Scope, ABI,
};

/// The newest Landlock ABI this code was written and tested against.
const TARGET_ABI: ABI = ABI::V6;

#[derive(Debug, thiserror::Error)]
pub(crate) enum LandlockError {
    #[error("landlock ruleset")]
    Ruleset(#[from] landlock::RulesetError),
}

/// Restrict the calling process. Returns a warning when the kernel enforces less than
/// asked (or nothing at all).
/// `private` trees get every right; `rw` trees every right but making FIFOs and Unix
/// sockets (a host process could open those to talk to the sandbox).
pub(crate) fn restrict(
    ro: &[PathBuf],
    rw: &[PathBuf],
    private: &[PathBuf],
) -> Result<Option<String>, LandlockError> {
    let read = AccessFs::from_read(TARGET_ABI);
    let all = AccessFs::from_all(TARGET_ABI);
    let write = all & !(AccessFs::MakeFifo | AccessFs::MakeSock);
    let mut ruleset = Ruleset::default()
        .handle_access(all)?
        .scope(Scope::from_all(TARGET_ABI))?
        .create()?;
    // Listing directories is allowed everywhere in the view (so `ls /` works); reading
    // and writing files stays limited to the granted trees.
    let root = [PathBuf::from("/")];
    let list = AccessFs::ReadDir.into();
    for (paths, access) in [(&root[..], list), (ro, read), (rw, write), (private, all)] {
        for path in paths {
            // A path the view did not create (e.g. a missing optional system dir) is
            // simply not granted.
            let Ok(fd) = PathFd::new(path) else {
                continue;
            };
            ruleset = ruleset.add_rule(PathBeneath::new(fd, access))?;
        }
    }
    let status = ruleset.restrict_self()?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => None,
        RulesetStatus::PartiallyEnforced => Some(
            "Landlock is only partially supported by this kernel; the mount namespace \
             remains the primary file-system boundary"
                .into(),
        ),
        RulesetStatus::NotEnforced => Some(
            "Landlock is not available on this kernel; the mount namespace is the only \
             file-system boundary"
                .into(),
        ),
    })
}

/// Confine the calling VMM's file access to what its VM needs: `binds` (the list its jail
/// would hold, `vmm::jail::plan`: read-only, read-write or the device file; of an
/// allowlisted share root only its listing and its allowed entries) and its own `/proc`
/// entry (read): the file boundary of a VMM not run as root, which has no jail. Also
/// scoped: no signal to, and no abstract Unix socket of, a process outside it. (Denied
/// paths inside a share stay readable to it: Landlock only grants; its guest's filter
/// hides them.)
pub(crate) fn restrict_vmm(binds: &[vmm::jail::Bind]) -> Result<Option<String>, LandlockError> {
    use vmm::jail::Access as Use;
    let read = AccessFs::from_read(TARGET_ABI);
    let all = AccessFs::from_all(TARGET_ABI);
    let mut rules: Vec<(PathBuf, BitFlags<AccessFs>)> = vec![("/proc/self".into(), read)];
    for bind in binds {
        let access = match bind.access {
            Use::ReadOnly => read,
            Use::ReadWrite | Use::Device => all,
        };
        match bind.view.as_ref().and_then(|v| v.only.as_ref()) {
            Some(only) => {
                rules.push((bind.path.clone(), AccessFs::ReadDir.into()));
                rules.extend(only.iter().map(|name| (bind.path.join(name), access)));
            }
            None => rules.push((bind.path.clone(), access)),
        }
    }
    let mut ruleset = Ruleset::default()
        .handle_access(all)?
        .scope(Scope::from_all(TARGET_ABI))?
        .create()?;
    for (path, access) in rules {
        // A path that does not exist (an allowed name the host lacks) is not granted.
        let (Ok(fd), Ok(meta)) = (PathFd::new(&path), std::fs::metadata(&path)) else {
            continue;
        };
        // A file's rule holds only the rights that apply to files (for the device: read,
        // write and its ioctls).
        let access = if meta.is_dir() {
            access
        } else {
            access & AccessFs::from_file(TARGET_ABI)
        };
        ruleset = ruleset.add_rule(PathBeneath::new(fd, access))?;
    }
    let status = ruleset.restrict_self()?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => None,
        RulesetStatus::PartiallyEnforced => {
            Some("Landlock is only partially supported by this kernel".into())
        }
        RulesetStatus::NotEnforced => Some("Landlock is not available on this kernel".into()),
    })
}

/// The Landlock ABI version of the running kernel (0 = unsupported).
pub fn kernel_abi() -> i32 {
    // SAFETY: landlock_create_ruleset with a null attr and the VERSION flag only returns
    // the ABI version.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32, // LANDLOCK_CREATE_RULESET_VERSION
        )
    };
    if v < 0 {
        0
    } else {
        v as i32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm::jail::{Access as Use, Bind, ShareView};

    /// Set in the copy of this test binary that the test below starts to be confined.
    const CHILD: &str = "MXC_TEST_LANDLOCK_VMM_CHILD";

    fn bind(path: PathBuf, access: Use, only: Option<&[&str]>) -> Bind {
        Bind {
            path,
            access,
            recursive: true,
            view: only.map(|names| ShareView {
                only: Some(names.iter().map(|n| n.to_string()).collect()),
                masked: Vec::new(),
            }),
        }
    }

    /// A VMM confined by `restrict_vmm` reads what its list grants, writes only where it
    /// grants writing, sees only the allowed entries of an allowlisted root, and nothing
    /// else: run in a copy of this test binary (Landlock confines the process for good).
    #[test]
    fn a_confined_vmm_opens_only_what_its_vm_needs() {
        let Some(dir) = std::env::var_os(CHILD) else {
            if kernel_abi() < 1 {
                eprintln!("skipped: no Landlock on this kernel");
                return;
            }
            let dir = std::env::temp_dir().join(format!("mxc-landlock-vmm-{}", std::process::id()));
            for sub in ["ro", "rw", "etc", "other"] {
                std::fs::create_dir_all(dir.join(sub)).unwrap();
            }
            for file in ["ro/f", "rw/f", "etc/passwd", "etc/shadow", "other/f"] {
                std::fs::write(dir.join(file), "data").unwrap();
            }
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "landlock::tests::a_confined_vmm_opens_only_what_its_vm_needs",
                ])
                .args(["--nocapture", "--test-threads=1"])
                .env(CHILD, &dir)
                .output()
                .unwrap();
            let _ = std::fs::remove_dir_all(&dir);
            assert!(
                out.status.success(),
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            return;
        };
        let dir = PathBuf::from(dir);
        let binds = [
            bind(dir.join("ro"), Use::ReadOnly, None),
            bind(dir.join("rw"), Use::ReadWrite, None),
            bind(dir.join("etc"), Use::ReadOnly, Some(&["passwd", "hosts"])),
        ];
        assert_eq!(restrict_vmm(&binds).unwrap(), None);
        fn denied<T>(r: std::io::Result<T>) -> bool {
            matches!(r.map_err(|e| e.raw_os_error()), Err(Some(libc::EACCES)))
        }
        assert!(std::fs::read(dir.join("ro/f")).is_ok());
        assert!(denied(std::fs::write(dir.join("ro/f"), "x")));
        assert!(std::fs::write(dir.join("rw/new"), "x").is_ok());
        assert!(std::fs::read(dir.join("etc/passwd")).is_ok());
        assert!(denied(std::fs::read(dir.join("etc/shadow"))));
        assert!(std::fs::read_dir(dir.join("etc")).is_ok());
        assert!(denied(std::fs::read(dir.join("other/f"))));
        assert!(denied(std::fs::read("/etc/hostname")));
        assert!(std::fs::read_to_string("/proc/self/status").is_ok());
    }
}
