//! Capabilities, which Linux keeps per thread: a VMM thread that handles what the guest
//! sends keeps none (run as root, the VMM would otherwise hold every one of them in the
//! threads a hostile guest talks to).

use std::io;

/// Clear every capability set of the calling thread: ambient, inheritable, effective,
/// permitted. It cannot get them back (the VMM never calls `execve`). Nothing to do for
/// a VMM run as an ordinary user.
pub fn drop_all_capabilities() -> io::Result<()> {
    use caps::CapSet;
    for set in [
        CapSet::Ambient,
        CapSet::Inheritable,
        CapSet::Effective,
        CapSet::Permitted,
    ] {
        caps::clear(None, set).map_err(io::Error::other)?;
    }
    let left = caps::read(None, CapSet::Permitted).map_err(io::Error::other)?;
    if !left.is_empty() {
        return Err(io::Error::from_raw_os_error(libc::EPERM));
    }
    Ok(())
}

/// Whether the calling thread has any effective capability.
pub fn has_effective_capabilities() -> io::Result<bool> {
    caps::read(None, caps::CapSet::Effective)
        .map(|set| !set.is_empty())
        .map_err(io::Error::other)
}
