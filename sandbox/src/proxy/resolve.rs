//! Name resolution for the proxy, behind a trait so tests (and embedders) can inject
//! their own: the system resolver by default, a hosts file for tests.
//!
//! The proxy resolves a name only after the policy allowed it, and checks every address
//! it gets again (see `decide.rs`), so a resolver can never widen what a policy allows.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

/// Most addresses kept for one name; the rest are ignored.
pub const MAX_ADDRESSES: usize = 16;
/// Largest hosts file read.
const MAX_HOSTS_FILE: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("{name} does not resolve")]
    NotFound { name: String },
    #[error("resolving {name} failed")]
    Lookup {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read hosts file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("hosts file {path} is larger than {MAX_HOSTS_FILE} bytes")]
    TooLarge { path: PathBuf },
    #[error("{path}:{line}: {reason}")]
    Syntax {
        path: String,
        line: usize,
        reason: String,
    },
}

/// Turns an allowed host name into addresses.
pub trait Resolver: Send + Sync + fmt::Debug {
    /// The addresses of `name` (lowercase, no trailing dot), at most [`MAX_ADDRESSES`].
    fn resolve(&self, name: &str) -> Result<Vec<IpAddr>, ResolveError>;
}

/// The host's resolver: `/etc/hosts`, then DNS (getaddrinfo) with the name made absolute
/// (a trailing dot), so that the host's search domains are never appended to a name the
/// policy allowed (`api.example.com` must not become `api.example.com.corp.internal`).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

/// The form of `name` the system resolver asks DNS for: absolute.
fn absolute(name: &str) -> String {
    let mut fqdn = name.trim_end_matches('.').to_string();
    fqdn.push('.');
    fqdn
}

/// The addresses `/etc/hosts`-format `text` gives `name` (lines that do not parse are
/// skipped, as the C library does), if any.
fn hosts_lookup(text: &str, name: &str) -> Option<Vec<IpAddr>> {
    let mut out: Vec<IpAddr> = Vec::new();
    for line in text.lines() {
        let mut fields = line.split('#').next().unwrap_or("").split_whitespace();
        let Some(Ok(ip)) = fields.next().map(str::parse::<IpAddr>) else {
            continue;
        };
        if fields.any(|n| n.trim_end_matches('.').eq_ignore_ascii_case(name))
            && !out.contains(&ip)
            && out.len() < MAX_ADDRESSES
        {
            out.push(ip);
        }
    }
    (!out.is_empty()).then_some(out)
}

impl Resolver for SystemResolver {
    fn resolve(&self, name: &str) -> Result<Vec<IpAddr>, ResolveError> {
        use std::io::Read;
        // getaddrinfo looks an absolute name up in DNS only: read /etc/hosts here.
        let mut hosts = String::new();
        if let Ok(file) = std::fs::File::open("/etc/hosts") {
            let _ = file.take(MAX_HOSTS_FILE).read_to_string(&mut hosts);
        }
        if let Some(found) = hosts_lookup(&hosts, name) {
            return Ok(found);
        }
        let addrs = (absolute(name).as_str(), 0u16)
            .to_socket_addrs()
            .map_err(|source| ResolveError::Lookup {
                name: name.to_string(),
                source,
            })?;
        let mut out: Vec<IpAddr> = Vec::new();
        for a in addrs {
            if !out.contains(&a.ip()) && out.len() < MAX_ADDRESSES {
                out.push(a.ip());
            }
        }
        if out.is_empty() {
            return Err(ResolveError::NotFound {
                name: name.to_string(),
            });
        }
        Ok(out)
    }
}

/// Resolves only the names a hosts file lists (`ADDRESS NAME [ALIAS...]`, `#` comments);
/// every other name fails. Never falls back to DNS, so tests cannot reach the internet.
#[derive(Debug, Clone, Default)]
pub struct HostsResolver {
    names: HashMap<String, Vec<IpAddr>>,
}

impl HostsResolver {
    pub fn from_file(path: &Path) -> Result<Self, ResolveError> {
        use std::io::Read;
        let read_err = |source| ResolveError::Read {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read_err)?;
        let mut text = String::new();
        file.take(MAX_HOSTS_FILE + 1)
            .read_to_string(&mut text)
            .map_err(read_err)?;
        if text.len() as u64 > MAX_HOSTS_FILE {
            return Err(ResolveError::TooLarge {
                path: path.to_path_buf(),
            });
        }
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses hosts-file text; `label` names it in errors.
    pub fn parse(text: &str, label: &str) -> Result<Self, ResolveError> {
        let mut names: HashMap<String, Vec<IpAddr>> = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("");
            let mut fields = line.split_whitespace();
            let Some(addr) = fields.next() else {
                continue;
            };
            let syntax = |reason: String| ResolveError::Syntax {
                path: label.to_string(),
                line: i + 1,
                reason,
            };
            let ip: IpAddr = addr
                .parse()
                .map_err(|_| syntax(format!("\"{addr}\" is not an IP address")))?;
            let mut any = false;
            for name in fields {
                let name = policy::parse_domain(name).map_err(|e| syntax(e.to_string()))?;
                let list = names.entry(name).or_default();
                if !list.contains(&ip) && list.len() < MAX_ADDRESSES {
                    list.push(ip);
                }
                any = true;
            }
            if !any {
                return Err(syntax(format!("no name after {addr}")));
            }
        }
        Ok(Self { names })
    }
}

impl Resolver for HostsResolver {
    fn resolve(&self, name: &str) -> Result<Vec<IpAddr>, ResolveError> {
        self.names
            .get(name)
            .cloned()
            .ok_or_else(|| ResolveError::NotFound {
                name: name.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_is_asked_for_the_absolute_name_only() {
        assert_eq!(absolute("api.example.com"), "api.example.com.");
        assert_eq!(absolute("intranet"), "intranet.");
        assert_eq!(absolute("a.example."), "a.example.");
    }

    #[test]
    fn the_hosts_file_is_read_like_the_c_library_does() {
        let text = "127.0.0.1 localhost\n# 10.0.0.1 commented\nnot-an-ip name\n\
                    ::1 localhost ip6-localhost\n10.1.1.1 Build.Example build\n";

        assert_eq!(
            hosts_lookup(text, "localhost"),
            Some(vec!["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()])
        );
        assert_eq!(
            hosts_lookup(text, "build.example"),
            Some(vec!["10.1.1.1".parse().unwrap()])
        );
        assert_eq!(hosts_lookup(text, "commented"), None);
        assert_eq!(hosts_lookup(text, "name"), None);
        assert_eq!(
            SystemResolver
                .resolve("localhost")
                .ok()
                .map(|a| !a.is_empty()),
            Some(true)
        );
    }

    #[test]
    fn hosts_file_lists_names_and_aliases() {
        let text = "# test names\n198.51.100.2 allowed.test a.wild.test\n\n::1 six.test # v6\n\
                    198.51.100.3 allowed.test\n";

        let r = HostsResolver::parse(text, "hosts").unwrap();

        assert_eq!(
            r.resolve("allowed.test").unwrap(),
            vec![
                "198.51.100.2".parse::<IpAddr>().unwrap(),
                "198.51.100.3".parse().unwrap()
            ]
        );
        assert_eq!(
            r.resolve("six.test").unwrap(),
            vec!["::1".parse::<IpAddr>().unwrap()]
        );
        assert!(matches!(
            r.resolve("other.test"),
            Err(ResolveError::NotFound { .. })
        ));
    }

    #[test]
    fn hosts_file_errors_name_the_line() {
        let e = HostsResolver::parse("1.2.3.4 ok.test\nnot-an-ip x.test\n", "h").unwrap_err();

        assert_eq!(
            e.to_string(),
            "h:2: \"not-an-ip\" is not an IP address".to_string()
        );
    }

    #[test]
    fn hosts_file_names_are_lowercased() {
        let r = HostsResolver::parse("10.0.0.1 MiXeD.Test.\n", "h").unwrap();

        assert!(r.resolve("mixed.test").is_ok());
    }
}
