//! The network of the microVM tier.
//!
//! The guest has no network device at all. Its only way out is the sandbox's policy
//! proxy on the host:
//!
//! ```text
//! guest program ──TCP──▶ 127.0.0.1:3128 (guest agent's relay, `mxc.proxy_port=3128`)
//!   ──vsock CID 2 port 1080──▶ VMM (hybrid vsock) ──Unix──▶ <runtime>/vsock.sock_1080
//!   ──▶ policy proxy (decides, resolves on the host, logs) ──▶ the destination
//! ```
//!
//! Which policies get the proxy follows the process tiers' rule
//! ([`egress_route`]):
//! - **closed** (deny-all, no upstream proxy, no audit log): no proxy, no relay in the
//!   guest, no proxy variables. Nothing can leave: there is nothing to leave through.
//! - **proxied** (everything else, allow-all included): the proxy, listening on
//!   `<runtime>/vsock.sock_1080` before the VM boots; the agent relays to it and every
//!   command gets the same proxy variables as on the process tiers
//!   ([`crate::proxy::proxy_env`]). Allow-all is the proxy's allow mode: every name and
//!   public address is reachable, by programs that use the proxy variables; special
//!   addresses (loopback, private, link-local, CGNAT, cloud metadata) only when an IP
//!   rule names them, exactly as on the process tiers.
//!
//! The proxy is the authority: the guest's relay forwards bytes and never decides.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use crate::egress::{egress_route, EgressRoute, SandboxNet};
use crate::env::with_proxy_env;
use crate::proxy::{Server, SANDBOX_PROXY_PORT};
use crate::view::NetMode;
use crate::{SandboxError, SandboxSpec};

/// Where the VMM sends the guest's connections to vsock port `port`: `<uds>_<port>`.
pub fn host_port_socket(vsock_uds: &Path, port: u32) -> PathBuf {
    let mut name = vsock_uds.as_os_str().to_owned();
    name.push(format!("_{port}"));
    PathBuf::from(name)
}

/// The proxy of one microVM: configured at provision, listening from before boot to
/// stop.
#[derive(Debug, Default)]
pub(crate) struct VmNet {
    net: SandboxNet,
    /// The guest's relay port; `None` on a closed network.
    pub(crate) port: Option<u16>,
    server: Option<Server>,
    socket: Option<PathBuf>,
}

impl VmNet {
    /// Prepares the proxy the spec needs, if any (opens the audit log).
    pub(crate) fn provision(spec: &SandboxSpec) -> Result<Self, SandboxError> {
        if egress_route(&spec.policy, &spec.net) == EgressRoute::Closed {
            return Ok(Self::default());
        }
        let port = SANDBOX_PROXY_PORT;
        Ok(Self {
            net: SandboxNet::provision(spec, NetMode::Proxied { port })?,
            port: Some(port),
            server: None,
            socket: None,
        })
    }

    /// Whether the guest gets a route to the proxy.
    #[cfg(test)]
    pub(crate) fn proxied(&self) -> bool {
        self.port.is_some()
    }

    /// Starts the proxy on the Unix socket where the VMM will send the guest's
    /// connections to vsock port [`proto::PROXY_VSOCK_PORT`] (the VMM's hybrid vsock
    /// socket is `vsock_uds`). Call before the VM boots.
    pub(crate) fn start(&mut self, vsock_uds: &Path) -> Result<(), SandboxError> {
        if self.port.is_none() || self.server.is_some() {
            return Ok(());
        }
        self.net.start()?;
        let path = host_port_socket(vsock_uds, proto::PROXY_VSOCK_PORT);
        let listener = UnixListener::bind(&path)
            .map_err(|e| SandboxError::io(format!("listening on {}", path.display()), e))?;
        self.socket = Some(path);
        self.server = self.net.serve(listener)?;
        Ok(())
    }

    /// What the guest kernel command line needs (with a leading space), or nothing.
    /// The relay's kernel flag in a VM that starts from a snapshot, whatever its policy:
    /// the relay listens in every such guest, and reaches a proxy only where the host
    /// started one (a connection to the host port of a closed sandbox is refused).
    pub(crate) fn relay_cmdline() -> String {
        format!(" mxc.proxy_port={SANDBOX_PROXY_PORT}")
    }

    pub(crate) fn cmdline(&self) -> String {
        self.port
            .map(|p| format!(" mxc.proxy_port={p}"))
            .unwrap_or_default()
    }

    /// Stops accepting, ends every proxied connection (writing its audit line) and
    /// removes the socket. Idempotent.
    pub(crate) fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop();
        }
        self.net.stop();
        if let Some(path) = self.socket.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A command's environment, with the proxy variables when the guest has a relay on `port`.
pub(crate) fn guest_env(port: Option<u16>, env: Vec<(String, String)>) -> Vec<(String, String)> {
    match port {
        Some(port) => with_proxy_env(env, NetMode::Proxied { port }),
        None => env,
    }
}

impl Drop for VmNet {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use policy::{Action, Policy, PolicySource};

    fn spec(default: Action, audit: Option<PathBuf>) -> SandboxSpec {
        let mut policy = Policy::empty(PolicySource::Cli);
        policy.network.egress.default = default;
        SandboxSpec {
            policy,
            view: policy::FsView::default(),
            id: "t".into(),
            net: crate::proxy::NetOptions {
                audit,
                ..Default::default()
            },
        }
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mxc-vmnet-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn the_proxy_socket_is_the_vsock_socket_with_the_port() {
        let path = host_port_socket(Path::new("/run/x/vsock.sock"), 1080);

        assert_eq!(path, Path::new("/run/x/vsock.sock_1080"));
    }

    #[test]
    fn deny_all_has_no_proxy_no_relay_and_no_variables() {
        let net = VmNet::provision(&spec(Action::Deny, None)).unwrap();

        assert!(!net.proxied());
        assert_eq!(net.cmdline(), "");
        assert!(guest_env(net.port, vec![]).is_empty());
    }

    #[test]
    fn allow_all_goes_through_the_proxy() {
        let net = VmNet::provision(&spec(Action::Allow, None)).unwrap();

        assert!(net.proxied());
        assert_eq!(net.cmdline(), " mxc.proxy_port=3128");
    }

    #[test]
    fn proxied_commands_get_the_process_tiers_variables() {
        let net = VmNet::provision(&spec(Action::Allow, None)).unwrap();

        let env = guest_env(
            net.port,
            vec![("HTTP_PROXY".into(), "http://elsewhere:1".into())],
        );

        assert_eq!(env, crate::proxy::proxy_env(3128));
    }

    #[test]
    fn an_audited_deny_all_is_proxied_and_decided() {
        let dir = temp_dir("audit");
        let audit = dir.join("audit.jsonl");

        let net = VmNet::provision(&spec(Action::Deny, Some(audit.clone()))).unwrap();

        assert!(net.proxied());
        assert!(audit.exists());
        drop(net);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn start_listens_next_to_the_vsock_socket_and_stop_removes_it() {
        let dir = temp_dir("start");
        let uds = dir.join("vsock.sock");
        let mut net = VmNet::provision(&spec(Action::Allow, None)).unwrap();

        net.start(&uds).unwrap();
        let listening = std::os::unix::net::UnixStream::connect(dir.join("vsock.sock_1080"));
        net.stop();

        assert!(listening.is_ok());
        assert!(!dir.join("vsock.sock_1080").exists());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
