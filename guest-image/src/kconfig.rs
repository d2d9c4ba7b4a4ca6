//! Kernel `.config` handling: parse our fragment, merge it over a base `.config`
//! (the result of `make tinyconfig`), and check after `make olddefconfig` that every
//! setting of the fragment survived (Kconfig silently drops options whose
//! dependencies are missing).

use thiserror::Error;

/// One line of a fragment: `CONFIG_X=value` or `# CONFIG_X is not set`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Setting {
    /// `CONFIG_X=value` (value as written: `y`, a number, a quoted string).
    Value(String),
    /// `# CONFIG_X is not set`.
    NotSet,
}

/// Errors of the config step.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum KconfigError {
    /// A fragment line that is neither a setting, a comment nor blank.
    #[error("config fragment line {line}: cannot parse {text:?}")]
    Parse {
        /// 1-based line number.
        line: usize,
        /// The line.
        text: String,
    },
    /// Kconfig did not keep a setting of the fragment.
    #[error("kernel config dropped {option}={wanted} (now {got}); check its dependencies in config.fragment")]
    Dropped {
        /// The option, `CONFIG_X`.
        option: String,
        /// What the fragment asked for.
        wanted: String,
        /// What `.config` has.
        got: String,
    },
}

fn is_symbol(name: &str) -> bool {
    name.strip_prefix("CONFIG_").is_some_and(|rest| {
        !rest.is_empty()
            && rest
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
    })
}

fn parse_line(line: &str) -> Option<Option<(String, Setting)>> {
    let line = line.trim();
    if line.is_empty() {
        return Some(None);
    }
    if let Some(rest) = line.strip_prefix("# ") {
        if let Some(name) = rest.strip_suffix(" is not set") {
            return is_symbol(name).then(|| Some((name.to_owned(), Setting::NotSet)));
        }
        return Some(None);
    }
    if line.starts_with('#') {
        return Some(None);
    }
    let (name, value) = line.split_once('=')?;
    (is_symbol(name) && !value.is_empty())
        .then(|| Some((name.to_owned(), Setting::Value(value.to_owned()))))
}

/// Parses a fragment (or a `.config`) into its settings, in order.
pub(crate) fn parse(text: &str) -> Result<Vec<(String, Setting)>, KconfigError> {
    let mut settings = Vec::new();
    for (index, line) in text.lines().enumerate() {
        match parse_line(line) {
            Some(Some(setting)) => settings.push(setting),
            Some(None) => {}
            None => {
                return Err(KconfigError::Parse {
                    line: index + 1,
                    text: line.to_owned(),
                })
            }
        }
    }
    Ok(settings)
}

/// `base` with every symbol of `fragment` replaced by the fragment's setting.
pub(crate) fn merge(base: &str, fragment: &[(String, Setting)]) -> String {
    let overridden = |line: &str| matches!(parse_line(line), Some(Some((name, _))) if fragment.iter().any(|(n, _)| *n == name));
    let mut out: String = base
        .lines()
        .filter(|line| !overridden(line))
        .map(|line| format!("{line}\n"))
        .collect();
    for (name, setting) in fragment {
        match setting {
            Setting::Value(value) => out.push_str(&format!("{name}={value}\n")),
            Setting::NotSet => out.push_str(&format!("# {name} is not set\n")),
        }
    }
    out
}

/// Checks that `config` (a `.config` after olddefconfig) honours every fragment line.
pub(crate) fn verify(config: &str, fragment: &[(String, Setting)]) -> Result<(), KconfigError> {
    let actual: Vec<(String, Setting)> = config
        .lines()
        .filter_map(|line| parse_line(line).flatten())
        .collect();
    for (name, wanted) in fragment {
        let got = actual
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s.clone())
            .unwrap_or(Setting::NotSet);
        let ok = match wanted {
            Setting::Value(_) => got == *wanted,
            Setting::NotSet => !matches!(&got, Setting::Value(v) if v != "n"),
        };
        if !ok {
            let show = |s: &Setting| match s {
                Setting::Value(v) => v.clone(),
                Setting::NotSet => "n".to_owned(),
            };
            return Err(KconfigError::Dropped {
                option: name.clone(),
                wanted: show(wanted),
                got: show(&got),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(name: &str, value: &str) -> (String, Setting) {
        (name.to_owned(), Setting::Value(value.to_owned()))
    }

    fn unset(name: &str) -> (String, Setting) {
        (name.to_owned(), Setting::NotSet)
    }

    #[test]
    fn fragment_lines_parse() {
        let text = "# comment\n\nCONFIG_SMP=y\n# CONFIG_PCI is not set\nCONFIG_NR_CPUS=16\nCONFIG_CMDLINE=\"a b\"\n";

        let settings = parse(text);

        assert_eq!(
            settings,
            Ok(vec![
                set("CONFIG_SMP", "y"),
                unset("CONFIG_PCI"),
                set("CONFIG_NR_CPUS", "16"),
                set("CONFIG_CMDLINE", "\"a b\""),
            ])
        );
    }

    #[test]
    fn garbage_line_is_an_error_with_its_number() {
        let settings = parse("CONFIG_SMP=y\nSMP=y\n");

        assert_eq!(
            settings,
            Err(KconfigError::Parse {
                line: 2,
                text: "SMP=y".into()
            })
        );
    }

    #[test]
    fn merge_replaces_and_appends() {
        let base = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=y\n";

        let merged = merge(
            base,
            &[
                set("CONFIG_B", "y"),
                unset("CONFIG_C"),
                set("CONFIG_D", "y"),
            ],
        );

        assert_eq!(
            merged,
            "CONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\nCONFIG_D=y\n"
        );
    }

    #[test]
    fn verify_accepts_a_config_that_kept_everything() {
        let config = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_N=16\n";

        let result = verify(
            config,
            &[
                set("CONFIG_A", "y"),
                unset("CONFIG_B"),
                unset("CONFIG_Z"),
                set("CONFIG_N", "16"),
            ],
        );

        assert_eq!(result, Ok(()));
    }

    #[test]
    fn verify_names_a_dropped_option() {
        let config = "CONFIG_A=y\n# CONFIG_VIRTIO_FS is not set\n";

        let result = verify(
            config,
            &[set("CONFIG_A", "y"), set("CONFIG_VIRTIO_FS", "y")],
        );

        assert_eq!(
            result,
            Err(KconfigError::Dropped {
                option: "CONFIG_VIRTIO_FS".into(),
                wanted: "y".into(),
                got: "n".into(),
            })
        );
    }

    #[test]
    fn verify_names_an_option_that_stayed_on() {
        let config = "CONFIG_PCI=y\n";

        let result = verify(config, &[unset("CONFIG_PCI")]);

        assert!(
            matches!(result, Err(KconfigError::Dropped { option, .. }) if option == "CONFIG_PCI")
        );
    }

    #[test]
    fn committed_fragment_parses_and_has_the_required_options() {
        let settings = parse(crate::kernel::CONFIG_FRAGMENT).unwrap_or_default();

        let missing: Vec<&str> = [
            "64BIT",
            "SMP",
            "PVH",
            "HYPERVISOR_GUEST",
            "PARAVIRT",
            "KVM_GUEST",
            "VIRTIO_MMIO",
            "VIRTIO_MMIO_CMDLINE_DEVICES",
            "VSOCKETS",
            "VIRTIO_VSOCKETS",
            "FUSE_FS",
            "VIRTIO_FS",
            "DEVTMPFS",
            "DEVTMPFS_MOUNT",
            "TMPFS",
            "PROC_FS",
            "UNIX",
            "INET",
            "SECCOMP",
            "SECCOMP_FILTER",
            "CGROUPS",
            "BINFMT_ELF",
            "BINFMT_SCRIPT",
            "SERIAL_8250",
            "SERIAL_8250_CONSOLE",
            "BLK_DEV_INITRD",
            "PRINTK",
            "TTY",
            "DEVMEM",
            "MULTIUSER",
            "FUTEX",
            "EPOLL",
            "EVENTFD",
            "SIGNALFD",
            "TIMERFD",
            "POSIX_TIMERS",
            "SHMEM",
            "FILE_LOCKING",
            "AIO",
            "ADVISE_SYSCALLS",
            "MEMBARRIER",
            "RSEQ",
            "SYSVIPC",
            "POSIX_MQUEUE",
            "UNIX98_PTYS",
            "PROC_SYSCTL",
            "FHANDLE",
            "INOTIFY_USER",
            "NET",
        ]
        .into_iter()
        .filter(|name| !settings.contains(&set(&format!("CONFIG_{name}"), "y")))
        .collect();

        assert!(missing.is_empty(), "fragment lacks {missing:?}");
    }

    #[test]
    fn committed_fragment_keeps_modules_pci_and_acpi_off() {
        let settings = parse(crate::kernel::CONFIG_FRAGMENT).unwrap_or_default();

        let off =
            ["CONFIG_MODULES", "CONFIG_PCI", "CONFIG_ACPI"].map(|n| settings.contains(&unset(n)));

        assert_eq!(off, [true, true, true]);
    }
}
