//! Helpers shared by the policy integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use policy::{Policy, PolicyError};

/// Parses `text` with relative paths resolved against `/base`.
pub fn parse(text: &str) -> Result<Policy, PolicyError> {
    policy::parse_with_base(text, "policy.json", Path::new("/base"))
}

/// 1-based line and column (in characters) of the first occurrence of `needle`.
pub fn pos_of(text: &str, needle: &str) -> (usize, usize) {
    let at = text
        .find(needle)
        .unwrap_or_else(|| panic!("needle {needle:?} not in test text"));
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, text[line_start..at].chars().count() + 1)
}

/// The MXC reference folder: `$MXC_COMPAT_DIR`, else the first `shared/mxc-compat`
/// found from the workspace root upwards (CI has `../shared/mxc-compat` next to the
/// checkout). It holds microsoft/mxc's schemas and examples; without it these tests
/// cannot run, and they fail saying so.
pub fn mxc_compat_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("MXC_COMPAT_DIR") {
        return PathBuf::from(d);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let found = root
        .ancestors()
        .map(|a| a.join("shared/mxc-compat"))
        .find(|d| d.is_dir());
    found.unwrap_or_else(|| {
        panic!(
            "MXC reference folder missing: no shared/mxc-compat above {} and MXC_COMPAT_DIR \
             unset (it holds microsoft/mxc's schemas and examples; CI provides it as \
             ../shared/mxc-compat next to the checkout)",
            root.display()
        )
    })
}

/// A temporary directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "mxc-policy-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        // Canonical, so tests compare against resolved paths (/tmp may be a symlink).
        Self(std::fs::canonicalize(&p).unwrap())
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
