//! What the guest agent mounts at boot, as the host writes it on the kernel command line.
//!
//! The agent must mount every share before it reports ready, so the list travels with the
//! boot itself, in two kernel parameters the host appends:
//!
//! ```text
//! mxc.mounts=mxcfs0:/usr:ro,mxcfs1:/home/u/my%20project:rw
//! mxc.links=/bin:usr/bin,/lib:usr/lib
//! ```
//!
//! `mxc.mounts` lists virtio-fs tags, guest paths and `ro`/`rw`; `mxc.links` lists symbolic
//! links the agent creates first (a merged-`/usr` host's `/bin -> usr/bin`), replacing what
//! the initramfs has at that path. Paths are absolute, without `.` or `..` components; every
//! byte other than ASCII letters, digits and `/._+-` is written `%XX`, so no path can
//! break the list apart or the kernel's own parsing (which splits at spaces and honours
//! quotes). The kernel limits the whole command line to 2 KiB: the host fails the boot
//! with an error when the list does not fit.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use crate::ProtoError;

/// The kernel parameter with the shares to mount.
pub const MOUNTS_PARAM: &str = "mxc.mounts";
/// The kernel parameter with the symbolic links to create.
pub const LINKS_PARAM: &str = "mxc.links";
/// Most entries either list may hold.
pub const MAX_ENTRIES: usize = 64;
/// Longest virtio-fs tag (the device's config space holds 36 bytes).
pub const MAX_TAG_LEN: usize = 36;

/// One share for the agent to mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestMount {
    /// The virtio-fs tag.
    pub tag: String,
    /// Where to mount it (absolute).
    pub path: PathBuf,
    /// Mount read-only (the host refuses changes anyway).
    pub readonly: bool,
}

/// One symbolic link for the agent to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestLink {
    /// The link (absolute).
    pub path: PathBuf,
    /// What it points at, as `readlink` would show it.
    pub target: PathBuf,
}

fn invalid(what: impl Into<String>) -> ProtoError {
    ProtoError::Invalid(what.into())
}

fn plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'/' | b'.' | b'_' | b'+' | b'-')
}

/// `bytes` with every byte outside the plain set as `%XX`.
fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if plain(b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn unescape(text: &str) -> Result<Vec<u8>, ProtoError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| invalid(format!("bad escape in {text:?}")))?;
            out.push(hex);
            i += 3;
        } else if plain(b) {
            out.push(b);
            i += 1;
        } else {
            return Err(invalid(format!("unescaped byte {b:#04x} in {text:?}")));
        }
    }
    Ok(out)
}

/// An absolute path without `.`/`..` components or NUL bytes.
fn check_path(path: &Path) -> Result<(), ProtoError> {
    let bytes = path.as_os_str().as_bytes();
    let ok = path.is_absolute()
        && !bytes.contains(&0)
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
        && !bytes.split(|b| *b == b'/').any(|p| p == b"." || p == b"..");
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "{} is not a plain absolute path",
            path.display()
        )))
    }
}

fn check_tag(tag: &str) -> Result<(), ProtoError> {
    let ok = !tag.is_empty()
        && tag.len() <= MAX_TAG_LEN
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(invalid(format!("bad share tag {tag:?}")))
    }
}

fn decode_path(text: &str) -> Result<PathBuf, ProtoError> {
    let path = PathBuf::from(OsStr::from_bytes(&unescape(text)?));
    check_path(&path)?;
    Ok(path)
}

/// The `mxc.mounts` value for `mounts` (checked: tags and paths must be valid).
pub fn encode_mounts(mounts: &[GuestMount]) -> Result<String, ProtoError> {
    if mounts.len() > MAX_ENTRIES {
        return Err(invalid(format!("more than {MAX_ENTRIES} mounts")));
    }
    let mut parts = Vec::with_capacity(mounts.len());
    for m in mounts {
        check_tag(&m.tag)?;
        check_path(&m.path)?;
        let mode = if m.readonly { "ro" } else { "rw" };
        parts.push(format!(
            "{}:{}:{mode}",
            m.tag,
            escape(m.path.as_os_str().as_bytes())
        ));
    }
    Ok(parts.join(","))
}

/// Parse an `mxc.mounts` value.
pub fn decode_mounts(value: &str) -> Result<Vec<GuestMount>, ProtoError> {
    let mut out = Vec::new();
    for entry in value.split(',').filter(|e| !e.is_empty()) {
        if out.len() == MAX_ENTRIES {
            return Err(invalid(format!("more than {MAX_ENTRIES} mounts")));
        }
        let mut fields = entry.split(':');
        let (Some(tag), Some(path), Some(mode), None) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(invalid(format!(
                "mount entry {entry:?} is not TAG:PATH:ro|rw"
            )));
        };
        check_tag(tag)?;
        let readonly = match mode {
            "ro" => true,
            "rw" => false,
            _ => return Err(invalid(format!("mount mode {mode:?} is not ro or rw"))),
        };
        out.push(GuestMount {
            tag: tag.to_owned(),
            path: decode_path(path)?,
            readonly,
        });
    }
    Ok(out)
}

/// The `mxc.links` value for `links`.
pub fn encode_links(links: &[GuestLink]) -> Result<String, ProtoError> {
    if links.len() > MAX_ENTRIES {
        return Err(invalid(format!("more than {MAX_ENTRIES} links")));
    }
    let mut parts = Vec::with_capacity(links.len());
    for l in links {
        check_path(&l.path)?;
        let target = l.target.as_os_str().as_bytes();
        if target.is_empty() || target.contains(&0) {
            return Err(invalid(format!("bad link target for {}", l.path.display())));
        }
        parts.push(format!(
            "{}:{}",
            escape(l.path.as_os_str().as_bytes()),
            escape(target)
        ));
    }
    Ok(parts.join(","))
}

/// Parse an `mxc.links` value.
pub fn decode_links(value: &str) -> Result<Vec<GuestLink>, ProtoError> {
    let mut out = Vec::new();
    for entry in value.split(',').filter(|e| !e.is_empty()) {
        if out.len() == MAX_ENTRIES {
            return Err(invalid(format!("more than {MAX_ENTRIES} links")));
        }
        let Some((path, target)) = entry.split_once(':') else {
            return Err(invalid(format!("link entry {entry:?} is not PATH:TARGET")));
        };
        let target = unescape(target)?;
        if target.is_empty() || target.contains(&0) {
            return Err(invalid(format!("bad link target in {entry:?}")));
        }
        out.push(GuestLink {
            path: decode_path(path)?,
            target: PathBuf::from(OsStr::from_bytes(&target)),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(tag: &str, path: &str, readonly: bool) -> GuestMount {
        GuestMount {
            tag: tag.into(),
            path: path.into(),
            readonly,
        }
    }

    #[test]
    fn mounts_round_trip_with_awkward_paths() {
        let mounts = vec![
            mount("mxcfs0", "/usr", true),
            mount("mxcfs1", "/home/u/my project,v2:x%y\"q", false),
            mount("mxcfs2", "/tmp/ünï", false),
        ];

        let value = encode_mounts(&mounts).unwrap();
        let back = decode_mounts(&value).unwrap();

        assert_eq!(back, mounts);
        assert!(value
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b' '));
    }

    #[test]
    fn links_round_trip() {
        let links = vec![
            GuestLink {
                path: "/bin".into(),
                target: "usr/bin".into(),
            },
            GuestLink {
                path: "/lib64".into(),
                target: "/usr/lib64".into(),
            },
        ];

        let value = encode_links(&links).unwrap();

        assert_eq!(value, "/bin:usr/bin,/lib64:/usr/lib64");
        assert_eq!(decode_links(&value).unwrap(), links);
    }

    #[test]
    fn malformed_mount_lists_are_refused() {
        let bad = [
            "mxcfs0:/usr",
            "mxcfs0:/usr:rx",
            "mxcfs0:usr:ro",
            "mxcfs0:/a/../etc:ro",
            "mxcfs0:/a/%2E%2E/etc:ro",
            "mx cfs:/a:ro",
            "mxcfs0:/a%zz:ro",
            "mxcfs0:/a%00b:ro",
            "mxcfs0:/a b:ro",
            ":/a:ro",
            "mxcfs0:/a:ro:extra",
        ];

        let refused = bad.iter().filter(|v| decode_mounts(v).is_err()).count();

        assert_eq!(refused, bad.len());
    }

    #[test]
    fn lists_are_bounded() {
        let many = vec!["t:/a:ro"; MAX_ENTRIES + 1].join(",");

        assert!(decode_mounts(&many).is_err());
        assert_eq!(decode_mounts("").unwrap(), vec![]);
    }

    #[test]
    fn encoding_refuses_what_decoding_would() {
        assert!(encode_mounts(&[mount("mxcfs0", "relative", true)]).is_err());
        assert!(encode_mounts(&[mount("", "/a", true)]).is_err());
        assert!(encode_mounts(&[mount("mxcfs0", "/a/../b", true)]).is_err());
    }
}
