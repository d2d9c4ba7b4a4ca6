//! Network rule strings (`pypi.org`, `*.pythonhosted.org:443`, `10.1.0.0/16:80-90`,
//! `[2001:db8::1]:443`), their validation, display and matching.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::model::{Action, DomainPattern, Egress, IpNet, NetRule, NetTarget, PortRange, Protocol};

/// Why a rule string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("empty rule")]
    Empty,
    #[error("rule \"{0}\" contains whitespace")]
    Whitespace(String),
    #[error("\"*\" alone would match every host")]
    MatchAll,
    #[error("\"*.{0}\" would match every site under the public suffix \"{0}\"")]
    PublicSuffix(String),
    #[error("\"{0}\": a wildcard is only allowed as a leading \"*.\" label")]
    Wildcard(String),
    #[error("\"{text}\" is not a valid domain name: {reason}")]
    Domain { text: String, reason: String },
    #[error("\"{0}\" is not ASCII")]
    NonAscii(String),
    #[error("\"{0}\" is not a valid IP address")]
    Address(String),
    #[error("\"{0}\" is not a valid port: ports are 1 to 65535")]
    Port(String),
    #[error("port range {first}-{last} is reversed")]
    PortOrder { first: u16, last: u16 },
    #[error("\"{given}\" has host bits set")]
    HostBits { given: String, network: String },
    #[error("prefix /{prefix} is too long for {family} (at most /{max})")]
    PrefixTooLong {
        prefix: String,
        family: &'static str,
        max: u8,
    },
    #[error("\"{0}\": a port on an IPv6 address needs brackets")]
    V6PortNeedsBrackets(String),
    #[error("\"{0}\" does not contain \"{1}\"")]
    ExceptOutside(String, String),
}

impl RuleError {
    /// What to write instead.
    pub fn hint(&self) -> Option<String> {
        Some(match self {
            Self::MatchAll => {
                "set \"default\": \"allow\" and list what to deny, or name the hosts".into()
            }
            Self::PublicSuffix(s) => format!("name the domains you need, e.g. \"*.example.{s}\""),
            Self::Wildcard(_) => "write \"*.example.com\"".into(),
            Self::NonAscii(_) => "write internationalised names in punycode (xn--...)".into(),
            Self::HostBits { network, .. } => format!("the network address is {network}"),
            Self::V6PortNeedsBrackets(_) => "write \"[2001:db8::1]:443\"".into(),
            Self::Port(_) | Self::PortOrder { .. } => {
                "write \":443\" or a range \":8000-8080\"".into()
            }
            _ => return None,
        })
    }

    /// Message and hint in the `message\nhint: hint` form serde errors carry.
    pub(crate) fn serde_message(&self) -> String {
        match self.hint() {
            Some(h) => format!("{self}{}{h}", crate::error::HINT_SEP),
            None => self.to_string(),
        }
    }
}

/// A parsed rule string: what it matches and on which ports (empty = every port).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSpec {
    pub target: NetTarget,
    pub ports: Vec<PortRange>,
}

/// Common public suffixes of more than one label. Every single-label name (`com`,
/// `uk`, `dev`) is a public suffix too. A wildcard directly under any of these would
/// match unrelated owners' sites, so it is refused.
const MULTI_LABEL_PUBLIC_SUFFIXES: &[&str] = &[
    "co.uk",
    "org.uk",
    "me.uk",
    "ltd.uk",
    "plc.uk",
    "net.uk",
    "ac.uk",
    "gov.uk",
    "nhs.uk",
    "sch.uk",
    "com.au",
    "net.au",
    "org.au",
    "edu.au",
    "gov.au",
    "id.au",
    "asn.au",
    "co.nz",
    "net.nz",
    "org.nz",
    "govt.nz",
    "ac.nz",
    "co.jp",
    "ne.jp",
    "or.jp",
    "ac.jp",
    "go.jp",
    "ad.jp",
    "ed.jp",
    "gr.jp",
    "lg.jp",
    "co.kr",
    "or.kr",
    "ne.kr",
    "re.kr",
    "go.kr",
    "ac.kr",
    "com.br",
    "net.br",
    "org.br",
    "gov.br",
    "com.cn",
    "net.cn",
    "org.cn",
    "gov.cn",
    "edu.cn",
    "com.hk",
    "org.hk",
    "net.hk",
    "edu.hk",
    "gov.hk",
    "com.tw",
    "org.tw",
    "net.tw",
    "edu.tw",
    "gov.tw",
    "com.sg",
    "org.sg",
    "net.sg",
    "edu.sg",
    "gov.sg",
    "com.my",
    "net.my",
    "org.my",
    "co.in",
    "net.in",
    "org.in",
    "firm.in",
    "gen.in",
    "ind.in",
    "ac.in",
    "gov.in",
    "co.za",
    "org.za",
    "net.za",
    "gov.za",
    "ac.za",
    "co.il",
    "org.il",
    "net.il",
    "ac.il",
    "gov.il",
    "com.mx",
    "org.mx",
    "net.mx",
    "gob.mx",
    "com.ar",
    "org.ar",
    "net.ar",
    "gob.ar",
    "com.tr",
    "org.tr",
    "net.tr",
    "gov.tr",
    "com.ua",
    "org.ua",
    "net.ua",
    "co.id",
    "or.id",
    "ac.id",
    "go.id",
    "com.pl",
    "net.pl",
    "org.pl",
    "co.th",
    "in.th",
    "ac.th",
    "go.th",
    "com.vn",
    "com.ph",
    "com.pk",
    "com.eg",
    "com.sa",
    "com.co",
    "com.pe",
    "com.ng",
    "co.ke",
    // Hosting platforms whose customers get sibling subdomains.
    "github.io",
    "gitlab.io",
    "githubusercontent.com",
    "herokuapp.com",
    "appspot.com",
    "blogspot.com",
    "azurewebsites.net",
    "cloudapp.net",
    "cloudfront.net",
    "vercel.app",
    "netlify.app",
    "pages.dev",
    "workers.dev",
    "web.app",
    "firebaseapp.com",
    "r2.dev",
    "fly.dev",
    "onrender.com",
    "ngrok.io",
    "ngrok-free.app",
    "s3.amazonaws.com",
];

/// True when `suffix` (lowercase, no leading dot) is a public suffix.
pub fn is_public_suffix(suffix: &str) -> bool {
    !suffix.contains('.') || MULTI_LABEL_PUBLIC_SUFFIXES.contains(&suffix)
}

/// Parses a native rule string: a domain (`example.com`), a wildcard domain
/// (`*.example.com`), an IPv4/IPv6 address or CIDR, each with an optional `:port` or
/// `:first-last` (IPv6 with a port goes in brackets).
pub fn parse_rule(text: &str) -> Result<RuleSpec, RuleError> {
    if text.is_empty() {
        return Err(RuleError::Empty);
    }
    if text.chars().any(char::is_whitespace) {
        return Err(RuleError::Whitespace(text.into()));
    }
    if let Some(inner) = text.strip_prefix('[') {
        let (host, after) = inner
            .split_once(']')
            .ok_or_else(|| RuleError::Address(text.into()))?;
        let ports = match after {
            "" => Vec::new(),
            p => vec![parse_ports(
                p.strip_prefix(':')
                    .ok_or_else(|| RuleError::Address(text.into()))?,
            )?],
        };
        let net = parse_cidr(host)?;
        if !net.addr.is_ipv6() {
            return Err(RuleError::Address(text.into()));
        }
        return Ok(RuleSpec {
            target: NetTarget::Ip(net),
            ports,
        });
    }
    if text.matches(':').count() > 1 {
        // A bare IPv6 address or CIDR, no port.
        return match parse_cidr(text) {
            Ok(net) => Ok(RuleSpec {
                target: NetTarget::Ip(net),
                ports: Vec::new(),
            }),
            Err(e) => match text.rsplit_once(':') {
                Some((a, _)) if parse_cidr(a).is_ok() => {
                    Err(RuleError::V6PortNeedsBrackets(text.into()))
                }
                _ => Err(e),
            },
        };
    }
    let (host, ports) = match text.split_once(':') {
        Some((h, p)) => (h, vec![parse_ports(p)?]),
        None => (text, Vec::new()),
    };
    let target = parse_host(host)?;
    Ok(RuleSpec { target, ports })
}

/// A host part without a port: IPv4 address or CIDR, or a (wildcard) domain.
fn parse_host(host: &str) -> Result<NetTarget, RuleError> {
    if host.is_empty() {
        return Err(RuleError::Domain {
            text: host.into(),
            reason: "empty host".into(),
        });
    }
    if host.contains('/') || looks_like_ipv4(host) {
        return Ok(NetTarget::Ip(parse_cidr(host)?));
    }
    if host == "*" {
        return Err(RuleError::MatchAll);
    }
    if let Some(suffix) = host.strip_prefix("*.") {
        if suffix.contains('*') {
            return Err(RuleError::Wildcard(host.into()));
        }
        let suffix = parse_domain(suffix)?;
        if is_public_suffix(&suffix) {
            return Err(RuleError::PublicSuffix(suffix));
        }
        return Ok(NetTarget::Domain(DomainPattern::Wildcard(suffix)));
    }
    if host.contains('*') {
        return Err(RuleError::Wildcard(host.into()));
    }
    Ok(NetTarget::Domain(DomainPattern::Exact(parse_domain(host)?)))
}

fn looks_like_ipv4(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_digit() || b == b'.') && s.contains('.')
}

/// Validates and lowercases a domain name (LDH labels of 1-63 characters, at most 253
/// characters, one trailing dot allowed, last label not all digits).
pub fn parse_domain(text: &str) -> Result<String, RuleError> {
    if !text.is_ascii() {
        return Err(RuleError::NonAscii(text.into()));
    }
    let bad = |reason: &str| RuleError::Domain {
        text: text.into(),
        reason: reason.into(),
    };
    let name = text.strip_suffix('.').unwrap_or(text).to_ascii_lowercase();
    if name.is_empty() {
        return Err(bad("empty name"));
    }
    if name.len() > 253 {
        return Err(bad("longer than 253 characters"));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(bad("empty label"));
        }
        if label.len() > 63 {
            return Err(bad("a label is longer than 63 characters"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(bad("labels may only hold letters, digits and '-'"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(bad("a label starts or ends with '-'"));
        }
    }
    if name
        .rsplit('.')
        .next()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(bad(
            "the last label is all digits (a malformed IP address?)",
        ));
    }
    Ok(name)
}

/// Parses `443` or `8000-8080`.
pub fn parse_ports(text: &str) -> Result<PortRange, RuleError> {
    let port = |s: &str| -> Result<u16, RuleError> {
        match s.parse::<u32>() {
            Ok(n) if (1..=65535).contains(&n) && s.bytes().all(|b| b.is_ascii_digit()) => {
                Ok(n as u16)
            }
            _ => Err(RuleError::Port(s.into())),
        }
    };
    let (first, last) = match text.split_once('-') {
        Some((a, b)) => (port(a)?, port(b)?),
        None => {
            let p = port(text)?;
            (p, p)
        }
    };
    if first > last {
        return Err(RuleError::PortOrder { first, last });
    }
    Ok(PortRange { first, last })
}

/// Parses an address (a host network, /32 or /128) or a CIDR whose host bits are zero.
pub fn parse_cidr(text: &str) -> Result<IpNet, RuleError> {
    let (addr_text, prefix_text) = match text.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (text, None),
    };
    let addr: IpAddr = addr_text
        .parse()
        .map_err(|_| RuleError::Address(addr_text.into()))?;
    let (family, max) = match addr {
        IpAddr::V4(_) => ("IPv4", 32u8),
        IpAddr::V6(_) => ("IPv6", 128u8),
    };
    let prefix = match prefix_text {
        None => max,
        Some(p) => {
            let n: u16 = p
                .parse()
                .ok()
                .filter(|_| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| RuleError::Address(text.into()))?;
            if n > u16::from(max) {
                return Err(RuleError::PrefixTooLong {
                    prefix: p.into(),
                    family,
                    max,
                });
            }
            n as u8
        }
    };
    let net = IpNet { addr, prefix };
    let network = net.network();
    if network.addr != addr {
        return Err(RuleError::HostBits {
            given: text.into(),
            network: network.to_string(),
        });
    }
    Ok(net)
}

fn to_bits(addr: IpAddr) -> (u128, u8) {
    match addr {
        IpAddr::V4(a) => (u128::from(u32::from(a)), 32),
        IpAddr::V6(a) => (u128::from(a), 128),
    }
}

fn from_bits(bits: u128, width: u8) -> IpAddr {
    if width == 32 {
        IpAddr::V4(Ipv4Addr::from(bits as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(bits))
    }
}

fn mask(prefix: u8, width: u8) -> u128 {
    let all = if width == 32 {
        u128::from(u32::MAX)
    } else {
        u128::MAX
    };
    if prefix == 0 {
        0
    } else {
        all & !((1u128 << (width - prefix)) - 1) & all
    }
}

impl IpNet {
    /// The same network with the host bits cleared.
    pub fn network(&self) -> IpNet {
        let (bits, width) = to_bits(self.addr);
        let p = self.prefix.min(width);
        IpNet {
            addr: from_bits(bits & mask(p, width), width),
            prefix: p,
        }
    }

    /// True when `ip` lies in this network (same family only).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (a, wa) = to_bits(self.addr);
        let (b, wb) = to_bits(ip);
        wa == wb && (a ^ b) & mask(self.prefix.min(wa), wa) == 0
    }

    /// True when every address of `other` lies in this network.
    pub fn covers(&self, other: &IpNet) -> bool {
        other.prefix >= self.prefix && self.contains(other.addr)
    }

    /// This network minus `except`, as the smallest set of CIDRs (MXC's
    /// `to: [{cidr, except}]`). `except` must lie inside this network.
    pub fn subtract(&self, except: &IpNet) -> Vec<IpNet> {
        if except.covers(self) {
            return Vec::new();
        }
        if !self.covers(except) {
            return vec![*self];
        }
        let (bits, width) = to_bits(self.addr);
        let mut out = Vec::new();
        let mut cur = bits;
        let mut prefix = self.prefix;
        // Walk down towards `except`, keeping the sibling half at each level.
        while prefix < except.prefix {
            prefix += 1;
            let bit = 1u128 << (width - prefix);
            let (ebits, _) = to_bits(except.addr);
            let (keep, next) = if ebits & bit == 0 {
                (cur | bit, cur)
            } else {
                (cur, cur | bit)
            };
            out.push(IpNet {
                addr: from_bits(keep, width),
                prefix,
            });
            cur = next;
        }
        out
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl DomainPattern {
    /// True when `host` (a DNS name, any case, optional trailing dot) matches: exact
    /// names match only themselves; `*.suffix` matches any depth below the suffix but
    /// not the suffix itself.
    pub fn matches(&self, host: &str) -> bool {
        let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
        match self {
            DomainPattern::Exact(name) => host == *name,
            DomainPattern::Wildcard(suffix) => host
                .strip_suffix(suffix.as_str())
                .and_then(|head| head.strip_suffix('.'))
                .is_some_and(|head| !head.is_empty()),
        }
    }
}

impl fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DomainPattern::Exact(n) => write!(f, "{n}"),
            DomainPattern::Wildcard(s) => write!(f, "*.{s}"),
        }
    }
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

impl fmt::Display for NetTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetTarget::Domain(d) => write!(f, "{d}"),
            NetTarget::Ip(net) => {
                let full = if net.addr.is_ipv4() { 32 } else { 128 };
                if net.prefix == full {
                    write!(f, "{}", net.addr)
                } else {
                    write!(f, "{net}")
                }
            }
            NetTarget::Any => write!(f, "any"),
        }
    }
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Any => "any",
        }
    }

    fn admits(self, proto: Protocol) -> bool {
        self == Protocol::Any || self == proto
    }
}

/// A destination a sandbox asked for: a name (before resolution) or an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination<'a> {
    Name(&'a str),
    Ip(IpAddr),
}

impl NetRule {
    /// The rule written back in rule-string form (`*.example.com:443`,
    /// `[2001:db8::1]:443`, `10.0.0.0/8:80-90`), protocol not included.
    pub fn rule_string(&self) -> String {
        let target = self.target.to_string();
        let host = match &self.target {
            NetTarget::Ip(net) if net.addr.is_ipv6() && !self.ports.is_empty() => {
                format!("[{target}]")
            }
            _ => target,
        };
        match self.ports.as_slice() {
            [] => host,
            ports => {
                let list: Vec<String> = ports.iter().map(|p| format!("{host}:{p}")).collect();
                list.join(",")
            }
        }
    }

    /// True when the rule matches this destination, port and protocol. A name only
    /// matches domain rules and an address only matches IP rules; `Any` matches both.
    pub fn matches(&self, dest: Destination<'_>, port: u16, proto: Protocol) -> bool {
        let target = match (&self.target, dest) {
            (NetTarget::Any, _) => true,
            (NetTarget::Domain(d), Destination::Name(n)) => d.matches(n),
            (NetTarget::Ip(net), Destination::Ip(ip)) => net.contains(ip),
            _ => false,
        };
        target
            && self.protocol.admits(proto)
            && (self.ports.is_empty() || self.ports.iter().any(|r| r.contains(port)))
    }
}

/// The outcome of an egress decision and the rule that made it (`None`: the default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision<'a> {
    pub action: Action,
    pub rule: Option<&'a NetRule>,
}

impl Egress {
    /// Deny rules first, then allow rules, then the default.
    pub fn decide(&self, dest: Destination<'_>, port: u16, proto: Protocol) -> Decision<'_> {
        if let Some(r) = self.deny.iter().find(|r| r.matches(dest, port, proto)) {
            return Decision {
                action: Action::Deny,
                rule: Some(r),
            };
        }
        if let Some(r) = self.allow.iter().find(|r| r.matches(dest, port, proto)) {
            return Decision {
                action: Action::Allow,
                rule: Some(r),
            };
        }
        Decision {
            action: self.default,
            rule: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Origin;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> IpNet {
        parse_cidr(s).unwrap()
    }

    fn rule(s: &str) -> NetRule {
        let spec = parse_rule(s).unwrap();
        NetRule {
            target: spec.target,
            ports: spec.ports,
            protocol: Protocol::Tcp,
            origin: Origin::Field("t".into()),
        }
    }

    #[test]
    fn parses_every_documented_form() {
        let cases = [
            ("pypi.org", "pypi.org"),
            ("PyPI.Org.", "pypi.org"),
            ("*.pythonhosted.org:443", "*.pythonhosted.org:443"),
            ("10.1.0.0/16:80-90", "10.1.0.0/16:80-90"),
            ("192.0.2.7", "192.0.2.7"),
            ("[2001:db8::1]:443", "[2001:db8::1]:443"),
            ("2001:db8::/32", "2001:db8::/32"),
            ("[2001:db8::/32]:22", "[2001:db8::/32]:22"),
            ("localhost:8080", "localhost:8080"),
            ("*.s3.example.co.uk", "*.s3.example.co.uk"),
            ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ];

        for (text, shown) in cases {
            assert_eq!(rule(text).rule_string(), shown, "{text}");
        }
    }

    #[test]
    fn refuses_bad_rules_with_reasons() {
        let cases: Vec<(&str, RuleError)> = vec![
            ("", RuleError::Empty),
            ("a b.com", RuleError::Whitespace("a b.com".into())),
            ("*", RuleError::MatchAll),
            ("*:443", RuleError::MatchAll),
            ("*.com", RuleError::PublicSuffix("com".into())),
            ("*.co.uk", RuleError::PublicSuffix("co.uk".into())),
            (
                "*.github.io:443",
                RuleError::PublicSuffix("github.io".into()),
            ),
            ("foo.*.com", RuleError::Wildcard("foo.*.com".into())),
            ("*foo.com", RuleError::Wildcard("*foo.com".into())),
            ("*.*.foo.com", RuleError::Wildcard("*.*.foo.com".into())),
            ("bücher.de", RuleError::NonAscii("bücher.de".into())),
            ("example.com:0", RuleError::Port("0".into())),
            ("example.com:65536", RuleError::Port("65536".into())),
            ("example.com:http", RuleError::Port("http".into())),
            ("example.com:+80", RuleError::Port("+80".into())),
            (
                "example.com:90-80",
                RuleError::PortOrder {
                    first: 90,
                    last: 80,
                },
            ),
            (
                "10.1.2.3/16",
                RuleError::HostBits {
                    given: "10.1.2.3/16".into(),
                    network: "10.1.0.0/16".into(),
                },
            ),
            (
                "10.0.0.0/33",
                RuleError::PrefixTooLong {
                    prefix: "33".into(),
                    family: "IPv4",
                    max: 32,
                },
            ),
            (
                "2001:db8::/129",
                RuleError::PrefixTooLong {
                    prefix: "129".into(),
                    family: "IPv6",
                    max: 128,
                },
            ),
            ("1.2.3", RuleError::Address("1.2.3".into())),
            ("300.1.1.1", RuleError::Address("300.1.1.1".into())),
            ("2001:db8::zz", RuleError::Address("2001:db8::zz".into())),
            ("[10.0.0.1]:80", RuleError::Address("[10.0.0.1]:80".into())),
        ];

        for (text, want) in cases {
            assert_eq!(parse_rule(text), Err(want), "{text:?}");
        }
    }

    #[test]
    fn refuses_malformed_domains() {
        for text in [
            "-a.com",
            "a-.com",
            "a..com",
            "a_b.com",
            "example.123",
            &format!("{}.com", "a".repeat(64)),
            &format!("{}.com", ["a"; 130].join(".")),
        ] {
            assert!(
                matches!(parse_rule(text), Err(RuleError::Domain { .. })),
                "{text}"
            );
        }
    }

    #[test]
    fn host_bits_hint_names_the_network() {
        let e = parse_rule("192.168.1.1/24").unwrap_err();

        assert_eq!(
            e.hint().as_deref(),
            Some("the network address is 192.168.1.0/24")
        );
    }

    #[test]
    fn ipv6_with_port_without_brackets_says_so() {
        let e = parse_rule("2001:db8::1:443x").unwrap_err();

        assert_eq!(e, RuleError::V6PortNeedsBrackets("2001:db8::1:443x".into()));
    }

    #[test]
    fn wildcard_matches_any_depth_but_not_the_apex() {
        let w = DomainPattern::Wildcard("example.com".into());

        assert!(w.matches("a.example.com"));
        assert!(w.matches("a.b.c.EXAMPLE.com."));
        assert!(!w.matches("example.com"));
        assert!(!w.matches("badexample.com"));
        assert!(!w.matches("example.com.evil.org"));
    }

    #[test]
    fn exact_matches_only_itself() {
        let e = DomainPattern::Exact("example.com".into());

        assert!(e.matches("Example.COM"));
        assert!(!e.matches("a.example.com"));
    }

    #[test]
    fn ipnet_contains_and_covers() {
        assert!(net("10.0.0.0/8").contains(ip("10.200.1.1")));
        assert!(!net("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(!net("10.0.0.0/8").contains(ip("::ffff:10.0.0.1")));
        assert!(net("0.0.0.0/0").contains(ip("8.8.8.8")));
        assert!(net("2001:db8::/32").contains(ip("2001:db8:ffff::1")));
        assert!(net("10.0.0.0/8").covers(&net("10.1.0.0/16")));
        assert!(!net("10.1.0.0/16").covers(&net("10.0.0.0/8")));
    }

    #[test]
    fn subtract_leaves_exactly_the_rest() {
        let whole = net("10.0.0.0/8");
        let hole = net("10.1.2.0/24");

        let parts = whole.subtract(&hole);

        assert_eq!(parts.len(), 16);
        for probe in ["10.0.0.1", "10.1.1.255", "10.1.3.0", "10.255.255.255"] {
            assert_eq!(parts.iter().filter(|p| p.contains(ip(probe))).count(), 1);
        }
        for probe in ["10.1.2.0", "10.1.2.77", "10.1.2.255"] {
            assert!(!parts.iter().any(|p| p.contains(ip(probe))), "{probe}");
        }
    }

    #[test]
    fn subtract_edge_cases() {
        assert_eq!(
            net("10.0.0.0/24").subtract(&net("10.0.0.0/8")),
            Vec::<IpNet>::new()
        );
        assert_eq!(
            net("10.0.0.0/24").subtract(&net("11.0.0.0/8")),
            vec![net("10.0.0.0/24")]
        );
        assert_eq!(net("::/0").subtract(&net("::/1")), vec![net("8000::/1")]);
    }

    #[test]
    fn rules_match_target_port_and_protocol() {
        let r = rule("*.pythonhosted.org:443");

        assert!(r.matches(
            Destination::Name("files.pythonhosted.org"),
            443,
            Protocol::Tcp
        ));
        assert!(!r.matches(
            Destination::Name("files.pythonhosted.org"),
            80,
            Protocol::Tcp
        ));
        assert!(!r.matches(
            Destination::Name("files.pythonhosted.org"),
            443,
            Protocol::Udp
        ));
        assert!(!r.matches(Destination::Ip(ip("10.0.0.1")), 443, Protocol::Tcp));
    }

    #[test]
    fn deny_beats_allow_then_default() {
        let egress = Egress {
            default: Action::Deny,
            allow: vec![rule("*.example.com"), rule("10.0.0.0/8:80-90")],
            deny: vec![rule("evil.example.com")],
        };

        let evil = egress.decide(Destination::Name("evil.example.com"), 443, Protocol::Tcp);
        let good = egress.decide(Destination::Name("www.example.com"), 443, Protocol::Tcp);
        let ip_ok = egress.decide(Destination::Ip(ip("10.9.9.9")), 85, Protocol::Tcp);
        let other = egress.decide(Destination::Ip(ip("10.9.9.9")), 91, Protocol::Tcp);

        assert_eq!(evil.action, Action::Deny);
        assert_eq!(
            evil.rule.map(|r| r.rule_string()),
            Some("evil.example.com".into())
        );
        assert_eq!(good.action, Action::Allow);
        assert_eq!(ip_ok.action, Action::Allow);
        assert_eq!(
            other,
            Decision {
                action: Action::Deny,
                rule: None
            }
        );
    }
}
