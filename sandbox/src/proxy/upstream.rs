//! Chaining to an upstream HTTP proxy (`network.upstreamProxy`, MXC
//! `runtimeConfig.networkProxy`): tunnels are opened with CONNECT through it, plain-HTTP
//! requests are sent to it in absolute form. The policy is still decided here first;
//! names are then resolved by the upstream proxy, not on this host (it may sit in a
//! network where names resolve differently), so the special-address check applies only
//! to addresses the sandbox gave literally.

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Instant;

use super::http::{self, Authority, Host};
use super::resolve::Resolver;
use super::sys;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream proxy \"{0}\" is not an http://host:port URL")]
    Url(String),
    #[error("cannot resolve the upstream proxy {url}")]
    Resolve {
        url: String,
        #[source]
        source: super::resolve::ResolveError,
    },
    #[error("cannot connect to the upstream proxy {url}")]
    Connect {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the upstream proxy {url} did not answer the CONNECT properly")]
    Reply { url: String },
    #[error("the upstream proxy {url} refused the CONNECT with status {status}")]
    Refused { url: String, status: u16 },
}

/// Where the upstream proxy is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Upstream {
    pub authority: Authority,
    /// `http://host:port`, for messages and the audit log.
    pub url: String,
}

impl Upstream {
    /// Parses `http://host[:port][/]` (the policy crate normalises it to this form).
    pub(crate) fn parse(url: &str) -> Result<Self, UpstreamError> {
        let bad = || UpstreamError::Url(url.to_string());
        let rest = url.strip_prefix("http://").ok_or_else(bad)?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let authority = http::parse_authority(rest, Some(80)).map_err(|_| bad())?;
        Ok(Self {
            url: format!("http://{authority}"),
            authority,
        })
    }

    /// Connects to the upstream proxy (any of its addresses, in order).
    pub(crate) fn connect(
        &self,
        resolver: &dyn Resolver,
        deadline: Instant,
        stop: i32,
    ) -> Result<OwnedFd, UpstreamError> {
        let addrs = match &self.authority.host {
            Host::Ip(a) => vec![*a],
            Host::Name(n) => resolver
                .resolve(n)
                .map_err(|source| UpstreamError::Resolve {
                    url: self.url.clone(),
                    source,
                })?,
        };
        let mut last = std::io::Error::from(std::io::ErrorKind::NotFound);
        for a in addrs {
            match sys::connect((a, self.authority.port).into(), deadline, stop) {
                Ok(fd) => return Ok(fd),
                Err(e) => last = e,
            }
        }
        Err(UpstreamError::Connect {
            url: self.url.clone(),
            source: last,
        })
    }

    /// Asks the upstream proxy for a tunnel to `target` on the connected `fd`. Returns
    /// any bytes of the tunnel that arrived with the reply.
    pub(crate) fn open_tunnel(
        &self,
        fd: &OwnedFd,
        target: &Authority,
        deadline: Instant,
        stop: i32,
    ) -> Result<Vec<u8>, UpstreamError> {
        let raw = fd.as_raw_fd();
        let reply_err = || UpstreamError::Reply {
            url: self.url.clone(),
        };
        sys::set_nonblocking(raw, true).map_err(|_| reply_err())?;
        let request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
        sys::send_all(raw, request.as_bytes(), deadline, stop).map_err(|_| reply_err())?;
        let (head, rest) = read_head(raw, deadline, stop).ok_or_else(reply_err)?;
        let status = http::response_status(&head).map_err(|_| reply_err())?;
        if !(200..300).contains(&status) {
            return Err(UpstreamError::Refused {
                url: self.url.clone(),
                status,
            });
        }
        Ok(rest)
    }
}

/// Reads a head (up to the blank line, at most `MAX_HEAD` bytes) from a non-blocking
/// socket before `deadline`; returns it and whatever followed it. `None` on timeout,
/// error, end of stream or an oversized head.
pub(crate) fn read_head(fd: i32, deadline: Instant, stop: i32) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        match sys::recv(fd, &mut chunk) {
            Ok(0) => return None,
            Ok(n) => {
                let from = buf.len().saturating_sub(3);
                buf.extend_from_slice(&chunk[..n]);
                if let Some(end) = http::head_end(&buf[from..]).map(|e| e + from) {
                    let rest = buf.split_off(end);
                    return Some((buf, rest));
                }
                if buf.len() > http::MAX_HEAD {
                    return None;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                sys::wait(fd, libc::POLLIN, deadline, stop).ok()?;
            }
            Err(_) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_urls_parse() {
        let a = Upstream::parse("http://proxy.corp.test:3128").unwrap();
        let b = Upstream::parse("http://10.0.0.1/").unwrap();

        assert_eq!(a.url, "http://proxy.corp.test:3128");
        assert_eq!(b.url, "http://10.0.0.1:80");
        assert!(Upstream::parse("https://p.test:1").is_err());
        assert!(Upstream::parse("http://u:p@p.test:1").is_err());
    }
}
