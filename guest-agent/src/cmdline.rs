//! Settings the VMM passes on the guest kernel command line (`/proc/cmdline`).
//!
//! | key | meaning | default |
//! |---|---|---|
//! | `mxc.port=N` | vsock port to listen on | 1024 |
//! | `mxc.poweroff_on_disconnect=0\|1` | power off when the first host connection closes without `Shutdown` | 1 |
//! | `mxc.hostname=NAME` | guest host name | `mxc-vm` |
//! | `mxc.bench_poweroff=0\|1` | power off as soon as the agent is ready (boot benchmarks: `mxc-vm bench boot --vs-qemu`) | 0 |
//! | `mxc.mounts=TAG:PATH:ro\|rw,…` | virtio-fs shares to mount before ready ([`proto::mounts`]) | none |
//! | `mxc.links=PATH:TARGET,…` | symbolic links to create first | none |
//! | `mxc.proxy_port=N` | relay 127.0.0.1:N to the host's network proxy (vsock port 1080) | none |
//!
//! Unknown `mxc.*` keys and malformed values are reported as warnings and the default is
//! kept; keys without the `mxc.` prefix belong to the kernel and are ignored. A malformed
//! share list is not a warning: it is kept in [`BootConfig::share_error`] and makes the
//! agent refuse to run commands (the files the policy promised would be missing).

use proto::mounts::{GuestLink, GuestMount};
use proto::AGENT_VSOCK_PORT;

/// What the agent takes from the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootConfig {
    /// vsock port to listen on.
    pub port: u32,
    /// Power off when the first host connection closes without `Shutdown`.
    pub poweroff_on_disconnect: bool,
    /// Host name to set.
    pub hostname: String,
    /// Power off as soon as the agent is ready, without serving (boot benchmarks).
    pub bench_poweroff: bool,
    /// virtio-fs shares to mount.
    pub mounts: Vec<GuestMount>,
    /// Symbolic links to create before mounting.
    pub links: Vec<GuestLink>,
    /// Why `mxc.mounts` or `mxc.links` could not be read.
    pub share_error: Option<String>,
    /// Listen on 127.0.0.1 at this port and relay to the host's network proxy
    /// (see `proxy_forward`); `None`: no relay, the guest has no way out.
    pub proxy_port: Option<u16>,
}

impl Default for BootConfig {
    fn default() -> Self {
        Self {
            port: AGENT_VSOCK_PORT,
            poweroff_on_disconnect: true,
            hostname: "mxc-vm".into(),
            bench_poweroff: false,
            mounts: Vec::new(),
            links: Vec::new(),
            share_error: None,
            proxy_port: None,
        }
    }
}

/// `0` or `1`.
fn flag(value: &str) -> Option<bool> {
    match value {
        "1" => Some(true),
        "0" => Some(false),
        _ => None,
    }
}

/// Parses a kernel command line; returns the config and one warning per ignored entry.
pub fn parse(cmdline: &str) -> (BootConfig, Vec<String>) {
    let mut cfg = BootConfig::default();
    let mut warnings = Vec::new();
    for word in cmdline.split_ascii_whitespace() {
        let Some(setting) = word.strip_prefix("mxc.") else {
            continue;
        };
        let (key, value) = setting.split_once('=').unwrap_or((setting, ""));
        let ok = match key {
            "port" => value
                .parse::<u32>()
                .ok()
                .filter(|p| *p != 0 && *p != u32::MAX)
                .map(|p| cfg.port = p)
                .is_some(),
            "poweroff_on_disconnect" => match value {
                "1" => {
                    cfg.poweroff_on_disconnect = true;
                    true
                }
                "0" => {
                    cfg.poweroff_on_disconnect = false;
                    true
                }
                _ => false,
            },
            "bench_poweroff" => flag(value).map(|on| cfg.bench_poweroff = on).is_some(),
            "proxy_port" => value
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .map(|p| cfg.proxy_port = Some(p))
                .is_some(),
            "hostname" => {
                let valid = !value.is_empty()
                    && value.len() <= 64
                    && value
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
                if valid {
                    cfg.hostname = value.to_owned();
                }
                valid
            }
            "mounts" | "links" => {
                let decoded = if key == "mounts" {
                    proto::mounts::decode_mounts(value).map(|m| cfg.mounts = m)
                } else {
                    proto::mounts::decode_links(value).map(|l| cfg.links = l)
                };
                if let Err(e) = decoded {
                    cfg.share_error = Some(format!("mxc.{key}: {e}"));
                }
                true
            }
            _ => false,
        };
        if !ok {
            warnings.push(format!("ignoring kernel parameter {word:?}"));
        }
    }
    (cfg, warnings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_cmdline_gives_defaults() {
        let (cfg, warnings) = parse("");

        assert_eq!(cfg, BootConfig::default());
        assert!(warnings.is_empty());
    }

    #[test]
    fn mxc_keys_are_read_and_kernel_keys_ignored() {
        let line = "console=ttyS0 reboot=k mxc.port=2000 mxc.poweroff_on_disconnect=0 \
                    mxc.hostname=box-1 quiet\n";

        let (cfg, warnings) = parse(line);

        assert_eq!(
            cfg,
            BootConfig {
                port: 2000,
                poweroff_on_disconnect: false,
                hostname: "box-1".into(),
                ..BootConfig::default()
            }
        );
        assert!(warnings.is_empty());
    }

    #[test]
    fn malformed_values_keep_defaults_and_warn() {
        let (cfg, warnings) = parse("mxc.port=abc mxc.poweroff_on_disconnect=yes mxc.hostname=a/b");

        assert_eq!(cfg, BootConfig::default());
        assert_eq!(warnings.len(), 3);
    }

    #[test]
    fn unknown_mxc_key_warns() {
        let (_, warnings) = parse("mxc.frobnicate=1");

        assert_eq!(warnings, ["ignoring kernel parameter \"mxc.frobnicate=1\""]);
    }

    #[test]
    fn bench_poweroff_is_a_flag() {
        let (on, on_warnings) = parse("mxc.bench_poweroff=1");
        let (bad, bad_warnings) = parse("mxc.bench_poweroff=yes");

        assert_eq!((on.bench_poweroff, on_warnings.len()), (true, 0));
        assert_eq!((bad.bench_poweroff, bad_warnings.len()), (false, 1));
    }

    #[test]
    fn shares_and_links_are_read() {
        let (cfg, warnings) =
            parse("mxc.links=/bin:usr/bin mxc.mounts=mxcfs0:/usr:ro,mxcfs1:/w:rw");

        assert!(warnings.is_empty());
        assert_eq!(cfg.share_error, None);
        assert_eq!(
            cfg.mounts,
            [
                GuestMount {
                    tag: "mxcfs0".into(),
                    path: "/usr".into(),
                    readonly: true
                },
                GuestMount {
                    tag: "mxcfs1".into(),
                    path: "/w".into(),
                    readonly: false
                }
            ]
        );
        assert_eq!(cfg.links.len(), 1);
    }

    #[test]
    fn a_malformed_share_list_is_an_error_not_a_warning() {
        let (cfg, warnings) = parse("mxc.mounts=mxcfs0:/a/../etc:rw");

        assert!(warnings.is_empty());
        assert!(cfg.mounts.is_empty());
        assert!(cfg
            .share_error
            .is_some_and(|e| e.starts_with("mxc.mounts: invalid message")));
    }

    #[test]
    fn port_zero_is_refused() {
        let (cfg, warnings) = parse("mxc.port=0");

        assert_eq!((cfg.port, warnings.len()), (AGENT_VSOCK_PORT, 1));
    }

    #[test]
    fn proxy_port_turns_the_relay_on() {
        let (cfg, warnings) = parse("mxc.proxy_port=3128");

        assert_eq!((cfg.proxy_port, warnings.len()), (Some(3128), 0));
    }

    #[test]
    fn bad_proxy_ports_leave_the_relay_off() {
        let (cfg, warnings) = parse("mxc.proxy_port=0 mxc.proxy_port=70000 mxc.proxy_port=");

        assert_eq!((cfg.proxy_port, warnings.len()), (None, 3));
    }
}
