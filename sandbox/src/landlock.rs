//! Landlock as the second file-system layer on the process tiers (the native init and
//! bubblewrap's exec helper): even if a mount were wrong, the command can only read what
//! the view marks readable and write what it marks writable.

use std::path::PathBuf;

use landlock::{
    Access, AccessFs, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus,
    Scope, ABI,
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
