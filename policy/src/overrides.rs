//! CLI flags composed with a policy: the stricter wins on conflicts.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::PolicyError;
use crate::fields::{check_env_name, check_path};
use crate::model::{Access, Command, Containment, Origin, PathRule, Policy};
use crate::resolve::{is_root_lexically, ROOT_RW_HINT, ROOT_RW_MESSAGE};

/// What `mxc-vm run` flags add to or change in a policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `--ro PATH`
    pub ro: Vec<PathBuf>,
    /// `--rw PATH`
    pub rw: Vec<PathBuf>,
    /// `--deny PATH`
    pub deny: Vec<PathBuf>,
    /// `-e KEY=VALUE`
    pub env: Vec<(String, String)>,
    /// `--timeout DUR`
    pub timeout: Option<Duration>,
    /// `--cwd DIR`
    pub cwd: Option<PathBuf>,
    /// The command after `--`.
    pub command: Option<Vec<String>>,
    /// `--backend NAME`
    pub containment: Option<Containment>,
    /// `--guest-root`
    pub guest_root: bool,
}

impl Policy {
    /// Applies CLI flags; relative paths are relative to the current directory.
    ///
    /// Paths are added as rules (so a path both in the file and in a flag gets the
    /// stricter access when resolved); the smaller timeout wins; `--backend` replaces
    /// the containment; a command replaces the policy's command; `--cwd` replaces the
    /// working directory; `-e KEY=…` replaces the same KEY or adds it.
    pub fn apply_overrides(&mut self, o: &Overrides) -> Result<(), PolicyError> {
        let cwd = std::env::current_dir().map_err(|e| {
            PolicyError::invalid("", format!("cannot read the current directory: {e}"))
        })?;
        self.apply_overrides_at(o, &cwd)
    }

    /// [`Policy::apply_overrides`] with relative paths resolved against `base`.
    pub fn apply_overrides_at(&mut self, o: &Overrides, base: &Path) -> Result<(), PolicyError> {
        let abs = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        for (list, access, flag) in [
            (&o.rw, Access::ReadWrite, "--rw"),
            (&o.ro, Access::ReadOnly, "--ro"),
            (&o.deny, Access::Denied, "--deny"),
        ] {
            for p in list {
                check_path(&p.to_string_lossy()).map_err(|m| invalid_with_hint(flag, &m))?;
                let path = abs(p);
                if access == Access::ReadWrite && is_root_lexically(&path) {
                    return Err(PolicyError::invalid(flag, ROOT_RW_MESSAGE).with_hint(ROOT_RW_HINT));
                }
                self.filesystem.rules.push(PathRule {
                    path,
                    access,
                    origin: Origin::Flag(flag.into()),
                });
            }
        }
        for (k, v) in &o.env {
            check_env_name(k).map_err(|m| invalid_with_hint("-e", &m))?;
            if v.contains('\0') {
                return Err(PolicyError::invalid(
                    "-e",
                    format!("{k}: value contains a NUL byte"),
                ));
            }
            match self.process.env.iter_mut().find(|(ek, _)| ek == k) {
                Some(slot) => slot.1 = v.clone(),
                None => self.process.env.push((k.clone(), v.clone())),
            }
        }
        if let Some(t) = o.timeout {
            if t.is_zero() {
                return Err(PolicyError::invalid(
                    "--timeout",
                    "must be greater than zero",
                ));
            }
            self.process.timeout = crate::tighter_timeout(self.process.timeout, Some(t));
        }
        if let Some(c) = &o.cwd {
            check_path(&c.to_string_lossy()).map_err(|m| invalid_with_hint("--cwd", &m))?;
            self.process.cwd = Some(abs(c));
        }
        if let Some(argv) = &o.command {
            match argv.first() {
                None => return Err(PolicyError::invalid("--", "empty command")),
                Some(a) if a.is_empty() => {
                    return Err(PolicyError::invalid("--", "the program name is empty"))
                }
                Some(_) => {}
            }
            if argv.iter().any(|a| a.contains('\0')) {
                return Err(PolicyError::invalid(
                    "--",
                    "an argument contains a NUL byte",
                ));
            }
            self.process.command = Some(Command::Argv(argv.clone()));
        }
        if let Some(c) = o.containment {
            self.containment = c;
        }
        self.process.guest_root |= o.guest_root;
        Ok(())
    }
}

fn invalid_with_hint(flag: &str, msg: &str) -> PolicyError {
    let (m, h) = crate::error::split_hint(msg);
    let e = PolicyError::invalid(flag, m);
    match h {
        Some(h) => e.with_hint(h),
        None => e,
    }
}
