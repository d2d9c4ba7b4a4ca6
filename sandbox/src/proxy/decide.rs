//! The proxy's decisions: the policy's egress rules for the requested host (deny rules,
//! then allow rules, then the default), then a second check of every address the
//! connection would go to.
//!
//! Special addresses (loopback, private RFC 1918 and ULA, link-local, CGNAT, cloud
//! metadata, unspecified, multicast, reserved) are refused unless a rule names them
//! explicitly. "Explicitly" means an IP/CIDR **allow** rule that contains the address,
//! matches the port, and lies entirely inside the special range the address belongs to:
//! `10.0.0.0/8`, `10.1.2.3` or `127.0.0.1:8080` name their ranges; `0.0.0.0/0`, a
//! `default: allow`, or a domain rule do not. A domain rule alone never reaches a special
//! address: a name allowed by a domain rule that resolves to one is refused unless an IP
//! rule opts that address in as well (this is also what stops DNS rebinding of an
//! allowed name onto the host or the metadata service). IP deny rules apply to resolved
//! addresses too, so `deny: ["203.0.113.0/24"]` holds even for allowed names.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use policy::{Action, Destination, Egress, IpNet, NetRule, NetTarget, Protocol};

/// A range of special addresses and what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialRange {
    /// `loopback`, `private`, `link-local`, `cgnat`, `metadata`, `unspecified`,
    /// `multicast`, `reserved`, or `host` (an address of the host's own interfaces).
    pub kind: &'static str,
    /// The whole range (the most specific one that contains the address).
    pub block: IpNet,
}

const fn v4(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> (IpAddr, u8) {
    (IpAddr::V4(Ipv4Addr::new(a, b, c, d)), prefix)
}

/// IPv4 special ranges, most specific first.
const V4_SPECIAL: &[((IpAddr, u8), &str)] = &[
    // Cloud metadata and platform services: AWS, GCP, Azure IMDS and OpenStack; Azure's
    // wire server (a public address); Alibaba Cloud (inside the CGNAT range); Oracle
    // Cloud's (inside 192.0.0.0/24).
    (v4(169, 254, 169, 254, 32), "metadata"),
    (v4(168, 63, 129, 16, 32), "metadata"),
    (v4(100, 100, 100, 200, 32), "metadata"),
    (v4(192, 0, 0, 192, 32), "metadata"),
    (v4(0, 0, 0, 0, 8), "unspecified"),
    (v4(127, 0, 0, 0, 8), "loopback"),
    (v4(10, 0, 0, 0, 8), "private"),
    (v4(172, 16, 0, 0, 12), "private"),
    (v4(192, 168, 0, 0, 16), "private"),
    (v4(100, 64, 0, 0, 10), "cgnat"),
    (v4(169, 254, 0, 0, 16), "link-local"),
    (v4(192, 0, 0, 0, 24), "reserved"),
    (v4(224, 0, 0, 0, 4), "multicast"),
    (v4(240, 0, 0, 0, 4), "reserved"),
];

const fn v6(segments: [u16; 8], prefix: u8) -> (IpAddr, u8) {
    let [a, b, c, d, e, f, g, h] = segments;
    (IpAddr::V6(Ipv6Addr::new(a, b, c, d, e, f, g, h)), prefix)
}

/// IPv6 special ranges, most specific first (IPv4-mapped, NAT64 and 6to4 addresses are
/// judged by the IPv4 address they carry, see [`special_range`]).
const V6_SPECIAL: &[((IpAddr, u8), &str)] = &[
    (v6([0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254], 128), "metadata"),
    (v6([0, 0, 0, 0, 0, 0, 0, 0], 128), "unspecified"),
    (v6([0, 0, 0, 0, 0, 0, 0, 1], 128), "loopback"),
    (v6([0, 0, 0, 0, 0, 0, 0, 0], 96), "reserved"),
    (v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48), "reserved"),
    (v6([0x100, 0, 0, 0, 0, 0, 0, 0], 64), "reserved"),
    (v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7), "private"),
    (v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10), "link-local"),
    (v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10), "private"),
    (v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8), "multicast"),
];

fn net((addr, prefix): (IpAddr, u8)) -> IpNet {
    IpNet { addr, prefix }
}

/// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) as the IPv4 address it is; others as
/// they are. Every decision is made on this form.
pub fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => addr,
        },
        v4 => v4,
    }
}

/// The special range `addr` lies in, or `None` for an ordinary (public) address.
pub fn special_range(addr: IpAddr) -> Option<SpecialRange> {
    let addr = canonical(addr);
    let table = if addr.is_ipv4() {
        V4_SPECIAL
    } else {
        V6_SPECIAL
    };
    if let Some((r, kind)) = table.iter().find(|(r, _)| net(*r).contains(addr)) {
        return Some(SpecialRange {
            kind,
            block: net(*r),
        });
    }
    // NAT64 (64:ff9b::/96) and 6to4 (2002::/16) carry an IPv4 address that a gateway
    // may reach: judge them by it, inside the IPv6 range that maps onto its range.
    let IpAddr::V6(a) = addr else {
        return None;
    };
    let bits = u128::from(a);
    let (outer, embedded) = if net(v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96)).contains(addr) {
        (96u8, bits as u32)
    } else if net(v6([0x2002, 0, 0, 0, 0, 0, 0, 0], 16)).contains(addr) {
        (16u8, (bits >> 80) as u32)
    } else {
        return None;
    };
    let inner = special_range(IpAddr::V4(Ipv4Addr::from(embedded)))?;
    Some(SpecialRange {
        kind: inner.kind,
        block: IpNet {
            addr,
            prefix: outer + inner.block.prefix,
        }
        .network(),
    })
}

/// Why a connection was refused, for the response header, the body and the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub status: u16,
    /// Short machine-readable reason: the rule (`network.egress.deny[0] evil.test`),
    /// `default deny`, `private-address 10.0.0.5`, ...
    pub rule: String,
    /// One human sentence.
    pub message: String,
}

/// The label of a rule in responses and audit lines: its origin and its text.
pub(crate) fn rule_label(rule: &NetRule) -> String {
    format!("{} {}", rule.origin, rule.rule_string())
}

/// What a request names: a host name (before resolution) or an address.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Target<'a> {
    Name(&'a str),
    Ip(IpAddr),
}

/// The policy's decision for the requested host and port. `Ok` carries the label of
/// the allowing rule (`default allow` when the default allowed it).
pub(crate) fn decide(egress: &Egress, target: Target<'_>, port: u16) -> Result<String, Refusal> {
    let (dest, shown) = match target {
        Target::Name(n) => (Destination::Name(n), n.to_string()),
        Target::Ip(a) => {
            let a = canonical(a);
            (Destination::Ip(a), show_addr(a))
        }
    };
    let d = egress.decide(dest, port, Protocol::Tcp);
    match (d.action, d.rule) {
        (Action::Allow, Some(r)) => Ok(rule_label(r)),
        (Action::Allow, None) => Ok("default allow".into()),
        (Action::Deny, Some(r)) => Err(Refusal {
            status: 403,
            rule: rule_label(r),
            message: format!(
                "egress to {shown}:{port} is denied by {} ({})",
                r.origin,
                r.rule_string()
            ),
        }),
        (Action::Deny, None) => Err(Refusal {
            status: 403,
            rule: "default deny".into(),
            message: format!(
                "egress to {shown}:{port} is denied: no network.egress allow rule matches it"
            ),
        }),
    }
}

fn show_addr(a: IpAddr) -> String {
    match a {
        IpAddr::V6(v6) => format!("[{v6}]"),
        v4 => v4.to_string(),
    }
}

/// The second check, for every address a connection would go to (resolved from an
/// allowed name, or the literal address the request gave): IP deny rules, then the
/// special-address rule. `Ok` carries the label of the IP rule that opted a special
/// address in, if one was needed.
pub(crate) fn check_address(
    egress: &Egress,
    addr: IpAddr,
    port: u16,
) -> Result<Option<String>, Refusal> {
    let addr = canonical(addr);
    let dest = Destination::Ip(addr);
    if let Some(r) = egress
        .deny
        .iter()
        .find(|r| matches!(r.target, NetTarget::Ip(_)) && r.matches(dest, port, Protocol::Tcp))
    {
        return Err(Refusal {
            status: 403,
            rule: rule_label(r),
            message: format!(
                "egress to {}:{port} is denied by {} ({})",
                show_addr(addr),
                r.origin,
                r.rule_string()
            ),
        });
    }
    // One of the host's own addresses reaches its services as loopback would, whatever
    // range it is in (a public address of the host included): only a rule for that very
    // address opens it, not one for its range.
    let own = || {
        crate::proxy::sys::host_address(addr).then(|| SpecialRange {
            kind: "host",
            block: IpNet {
                addr,
                prefix: if addr.is_ipv4() { 32 } else { 128 },
            },
        })
    };
    let special = match special_range(addr) {
        Some(s) if s.kind == "loopback" => Some(s),
        other => own().or(other),
    };
    let Some(special) = special else {
        return Ok(None);
    };
    let explicit = egress.allow.iter().find(|r| match r.target {
        NetTarget::Ip(n) => special.block.covers(&n) && r.matches(dest, port, Protocol::Tcp),
        _ => false,
    });
    match explicit {
        Some(r) => Ok(Some(rule_label(r))),
        None => Err(Refusal {
            status: 403,
            rule: format!("{}-address {}", special.kind, show_addr(addr)),
            message: format!(
                "{}:{port} is a {} address ({}); only an IP allow rule inside {} can \
                 open it",
                show_addr(addr),
                special.kind,
                special.block,
                special.block
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use policy::{parse_rule, Origin};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn rules(list: &[&str], field: &str) -> Vec<NetRule> {
        list.iter()
            .enumerate()
            .map(|(i, s)| {
                let spec = parse_rule(s).unwrap();
                NetRule {
                    target: spec.target,
                    ports: spec.ports,
                    protocol: Protocol::Tcp,
                    origin: Origin::Field(format!("{field}[{i}]")),
                }
            })
            .collect()
    }

    fn egress(default: Action, allow: &[&str], deny: &[&str]) -> Egress {
        Egress {
            default,
            allow: rules(allow, "network.egress.allow"),
            deny: rules(deny, "network.egress.deny"),
        }
    }

    #[test]
    fn special_ranges_are_classified() {
        let cases = [
            ("127.0.0.1", Some("loopback")),
            ("10.1.2.3", Some("private")),
            ("172.31.255.255", Some("private")),
            ("192.168.0.1", Some("private")),
            ("100.64.0.1", Some("cgnat")),
            ("100.100.100.199", Some("cgnat")),
            ("100.100.100.200", Some("metadata")),
            ("168.63.129.16", Some("metadata")),
            ("168.63.129.17", None),
            ("192.0.0.192", Some("metadata")),
            ("169.254.169.254", Some("metadata")),
            ("169.254.170.2", Some("link-local")),
            ("0.0.0.0", Some("unspecified")),
            ("224.0.0.251", Some("multicast")),
            ("255.255.255.255", Some("reserved")),
            ("::1", Some("loopback")),
            ("::", Some("unspecified")),
            ("fd00:ec2::254", Some("metadata")),
            ("fd12::1", Some("private")),
            ("fe80::1", Some("link-local")),
            ("ff02::1", Some("multicast")),
            ("::ffff:127.0.0.1", Some("loopback")),
            ("::ffff:169.254.169.254", Some("metadata")),
            ("64:ff9b::a9fe:a9fe", Some("metadata")),
            ("64:ff9b::7f00:1", Some("loopback")),
            ("2002:7f00:1::", Some("loopback")),
            ("::127.0.0.1", Some("reserved")),
            ("8.8.8.8", None),
            ("198.51.100.2", None),
            ("172.32.0.1", None),
            ("2001:db8::1", None),
            ("2606:4700::1111", None),
            ("64:ff9b::808:808", None),
        ];

        for (addr, kind) in cases {
            assert_eq!(special_range(ip(addr)).map(|s| s.kind), kind, "{addr}");
        }
    }

    #[test]
    fn nat64_ranges_map_onto_the_embedded_block() {
        let r = special_range(ip("64:ff9b::a00:1")).unwrap();

        assert_eq!(r.block.to_string(), "64:ff9b::a00:0/104");
    }

    #[test]
    fn deny_rules_beat_allow_rules_then_the_default() {
        let e = egress(Action::Deny, &["*.mix.test"], &["bad.mix.test"]);

        let good = decide(&e, Target::Name("a.b.mix.test"), 443);
        let bad = decide(&e, Target::Name("bad.mix.test"), 443);
        let other = decide(&e, Target::Name("other.test"), 443);

        assert_eq!(good, Ok("network.egress.allow[0] *.mix.test".to_string()));
        assert_eq!(bad.unwrap_err().rule, "network.egress.deny[0] bad.mix.test");
        assert_eq!(other.unwrap_err().rule, "default deny");
    }

    #[test]
    fn a_mapped_address_is_judged_as_ipv4() {
        let e = egress(Action::Deny, &["198.51.100.0/24"], &[]);

        assert!(decide(&e, Target::Ip(ip("::ffff:198.51.100.7")), 80).is_ok());
    }

    #[test]
    fn special_addresses_need_an_ip_rule_inside_their_range() {
        let narrow = egress(Action::Deny, &["127.0.0.1:8080", "10.0.0.0/8"], &[]);
        let wide = egress(Action::Deny, &["0.0.0.0/0"], &[]);
        let default_allow = egress(Action::Allow, &[], &["evil.test"]);

        assert_eq!(
            check_address(&narrow, ip("127.0.0.1"), 8080),
            Ok(Some("network.egress.allow[0] 127.0.0.1:8080".into()))
        );
        assert!(check_address(&narrow, ip("127.0.0.1"), 8081).is_err());
        assert!(check_address(&narrow, ip("10.9.8.7"), 22).is_ok());
        assert_eq!(
            check_address(&wide, ip("10.9.8.7"), 22).unwrap_err().rule,
            "private-address 10.9.8.7"
        );
        assert_eq!(
            check_address(&default_allow, ip("169.254.169.254"), 80)
                .unwrap_err()
                .rule,
            "metadata-address 169.254.169.254"
        );
        assert_eq!(check_address(&wide, ip("198.51.100.2"), 80), Ok(None));
    }

    #[test]
    fn link_local_rule_does_not_open_the_metadata_address() {
        let e = egress(Action::Deny, &["169.254.0.0/16"], &[]);

        assert!(check_address(&e, ip("169.254.1.1"), 80).is_ok());
        assert!(check_address(&e, ip("169.254.169.254"), 80).is_err());
    }

    #[test]
    fn ip_deny_rules_apply_to_resolved_addresses() {
        let e = egress(Action::Deny, &["allowed.test"], &["198.51.100.0/24:80"]);

        assert_eq!(
            check_address(&e, ip("198.51.100.9"), 80).unwrap_err().rule,
            "network.egress.deny[0] 198.51.100.0/24:80"
        );
        assert_eq!(check_address(&e, ip("198.51.100.9"), 443), Ok(None));
    }

    /// A sandbox allowed everything connects to one of the host's own addresses (a
    /// service on 0.0.0.0 answers there as on loopback): refused unless a rule names that
    /// very address; a rule for its whole range is not enough.
    #[test]
    fn the_hosts_own_addresses_need_a_rule_naming_them() {
        let own: Vec<IpAddr> = crate::proxy::sys::interface_addresses()
            .into_iter()
            .filter(|a| special_range(*a).is_none_or(|s| s.kind != "loopback"))
            .filter(|a| !matches!(a, IpAddr::V6(v) if v.segments()[0] & 0xffc0 == 0xfe80))
            .collect();
        assert!(!own.is_empty(), "this host has no address but loopback");
        let allow_all = egress(Action::Allow, &[], &[]);
        for addr in own {
            let range = if addr.is_ipv4() { "0.0.0.0/0" } else { "::/0" };
            let exact = egress(Action::Deny, &[&addr.to_string()], &[]);
            let wide = egress(Action::Deny, &[range], &[]);

            let refused = check_address(&allow_all, addr, 80).unwrap_err();

            assert_eq!(refused.rule, format!("host-address {}", show_addr(addr)));
            assert!(check_address(&wide, addr, 80).is_err(), "{addr}");
            assert!(check_address(&exact, addr, 80).is_ok(), "{addr}");
        }
    }
}
