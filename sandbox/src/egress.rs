//! How a sandbox's egress is carried, on every tier: the route a policy needs
//! ([`egress_route`]), the network the process tiers give it ([`net_mode`]) and the
//! policy proxy of one sandbox (`SandboxNet`), which the microVM tier serves its
//! guest's vsock connections from as well.
//!
//! No sandbox ever shares the host's network namespace (its loopback services, abstract
//! Unix sockets and listeners would all be reachable, in both directions).
//!
//! - `default: deny` with no allow rules: a private network namespace with only `lo`; no
//!   proxy, nothing leaves.
//! - anything else, allow-all included: a private namespace with only `lo`, where
//!   127.0.0.1:3128 is the host's policy proxy (see [`crate::proxy::handoff`]), and the
//!   command gets the proxy variables. Programs that ignore them have no route at all.
//!   Allow-all is the proxy's allow mode: every name and public address, but loopback,
//!   private, link-local and metadata addresses only when an IP rule names them.

use std::os::fd::OwnedFd;

use policy::Policy;

use crate::proxy::{handoff, Listener, NetOptions, Proxy, ProxyConfig, Server};
use crate::view::NetMode;
use crate::{SandboxError, SandboxSpec};

/// How a policy's egress is carried, whatever the tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EgressRoute {
    /// Nothing may leave and nothing needs deciding or logging: no proxy, no route.
    Closed,
    /// Every connection is decided (and logged) by the sandbox's policy proxy.
    Proxied,
}

/// The route a policy needs: closed for deny-all without an upstream proxy or audit
/// log, else the proxy (allow-all too: there is no unfiltered route).
pub fn egress_route(policy: &Policy, options: &NetOptions) -> EgressRoute {
    let n = &policy.network;
    let plain = n.upstream_proxy.is_none() && options.audit.is_none();
    if plain && n.is_deny_all() {
        EgressRoute::Closed
    } else {
        EgressRoute::Proxied
    }
}

/// The network a policy gets on the process tiers.
pub fn net_mode(policy: &Policy, options: &NetOptions) -> NetMode {
    match egress_route(policy, options) {
        EgressRoute::Closed => NetMode::LoopbackOnly,
        EgressRoute::Proxied => NetMode::Proxied {
            port: handoff::SANDBOX_PROXY_PORT,
        },
    }
}

fn setup_err(e: impl std::error::Error + Send + Sync + 'static) -> SandboxError {
    SandboxError::setup("network proxy", e)
}

/// The proxy of one process-tier sandbox: configured at provision, running from start
/// to stop, handed a fresh listening socket by every exec.
#[derive(Debug, Default)]
pub(crate) struct SandboxNet {
    config: Option<ProxyConfig>,
    proxy: Option<Proxy>,
}

impl SandboxNet {
    /// Prepares the proxy a spec needs, if any (opens the audit log).
    pub(crate) fn provision(spec: &SandboxSpec, net: NetMode) -> Result<Self, SandboxError> {
        if !matches!(net, NetMode::Proxied { .. }) {
            return Ok(Self::default());
        }
        let config =
            ProxyConfig::for_sandbox(&spec.id, &spec.policy, &spec.net).map_err(setup_err)?;
        Ok(Self {
            config: Some(config),
            proxy: None,
        })
    }

    pub(crate) fn start(&mut self) -> Result<(), SandboxError> {
        if let (Some(config), None) = (&self.config, &self.proxy) {
            self.proxy = Some(Proxy::new(config.clone()).map_err(setup_err)?);
        }
        Ok(())
    }

    /// For one exec: the socket the sandbox's init sends its listener over, and the
    /// host side accepting from it. `None` without a proxy.
    pub(crate) fn begin_exec(&self) -> Result<Option<(OwnedFd, Server)>, SandboxError> {
        let Some(proxy) = &self.proxy else {
            return if self.config.is_some() {
                Err(SandboxError::Lifecycle("exec before start"))
            } else {
                Ok(None)
            };
        };
        let (host, sandbox) = handoff::pair().map_err(|e| SandboxError::io("socketpair", e))?;
        let server = proxy.serve_handoff(host).map_err(setup_err)?;
        Ok(Some((sandbox, server)))
    }

    /// Accepts proxy connections from `listener` (e.g. the Unix socket a VMM sends its
    /// guest's vsock connections to). `None` without a proxy.
    pub(crate) fn serve<L: Listener>(&self, listener: L) -> Result<Option<Server>, SandboxError> {
        match (&self.proxy, &self.config) {
            (Some(proxy), _) => proxy.serve(listener).map(Some).map_err(setup_err),
            (None, Some(_)) => Err(SandboxError::Lifecycle("serve before start")),
            (None, None) => Ok(None),
        }
    }

    /// Ends every proxied connection and writes their audit lines.
    pub(crate) fn stop(&mut self) {
        if let Some(p) = self.proxy.take() {
            p.shutdown();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use policy::{Action, PolicySource};

    fn policy(default: Action, allow: &[&str]) -> Policy {
        let mut p = Policy::empty(PolicySource::Cli);
        p.network.egress.default = default;
        for a in allow {
            let spec = policy::parse_rule(a).unwrap();
            p.network.egress.allow.push(policy::NetRule {
                target: spec.target,
                ports: spec.ports,
                protocol: policy::Protocol::Tcp,
                origin: policy::Origin::Flag("t".into()),
            });
        }
        p
    }

    #[test]
    fn each_policy_gets_its_network() {
        let none = NetOptions::default();
        let audited = NetOptions {
            audit: Some("/tmp/a".into()),
            ..NetOptions::default()
        };
        let proxied = NetMode::Proxied { port: 3128 };

        assert_eq!(
            net_mode(&policy(Action::Deny, &[]), &none),
            NetMode::LoopbackOnly
        );
        assert_eq!(net_mode(&policy(Action::Allow, &[]), &none), proxied);
        assert_eq!(
            net_mode(&policy(Action::Deny, &["pypi.org"]), &none),
            proxied
        );
        assert_eq!(net_mode(&policy(Action::Allow, &[]), &audited), proxied);
        assert_eq!(net_mode(&policy(Action::Deny, &[]), &audited), proxied);
    }

    #[test]
    fn each_policy_gets_its_route() {
        let none = NetOptions::default();
        let audited = NetOptions {
            audit: Some("/tmp/a".into()),
            ..NetOptions::default()
        };

        let routes = [
            egress_route(&policy(Action::Deny, &[]), &none),
            egress_route(&policy(Action::Allow, &[]), &none),
            egress_route(&policy(Action::Deny, &["pypi.org"]), &none),
            egress_route(&policy(Action::Deny, &[]), &audited),
        ];

        assert_eq!(
            routes,
            [
                EgressRoute::Closed,
                EgressRoute::Proxied,
                EgressRoute::Proxied,
                EgressRoute::Proxied
            ]
        );
    }

    #[test]
    fn an_upstream_proxy_always_goes_through_the_policy_proxy() {
        let mut p = policy(Action::Allow, &[]);
        p.network.upstream_proxy = Some("http://proxy.test:3128".into());

        assert_eq!(
            net_mode(&p, &NetOptions::default()),
            NetMode::Proxied { port: 3128 }
        );
    }
}
