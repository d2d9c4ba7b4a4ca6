//! The proxy's parsers of hostile bytes, for the fuzz targets in `sandbox/fuzz` (feature
//! `fuzzing`, which no build of mxc-vm turns on): request heads, CONNECT and absolute-form
//! targets, the request through a tunnel, body framing, upstream status lines and the TLS
//! ClientHello. Results are plain public types; errors are their messages.

use super::http::{self, BodyFraming, BodyLimit, InTunnel, Request};
use super::tls::{self, Hello};

/// A request head as the proxy parsed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedHead {
    pub method: String,
    pub target: String,
    pub version: String,
    pub headers: Vec<(String, String)>,
}

/// How a request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    Length(u64),
    Chunked,
}

/// What a request head asks the proxy for; hosts as a Host header writes them (an IPv6
/// address in brackets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyRequest {
    Connect {
        host: String,
        port: u16,
    },
    Forward {
        host: String,
        port: u16,
        origin_head: Vec<u8>,
        proxy_head: Vec<u8>,
        body: Body,
    },
}

/// The first bytes through a tunnel, read as plain HTTP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tunnel {
    NeedMore,
    NotHttp,
    Request {
        host: String,
        head_len: usize,
        body: Body,
    },
}

/// The first bytes through a tunnel, read as TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsHello {
    NeedMore,
    NotTls,
    Sni(Option<String>),
    Malformed(&'static str),
}

fn body(b: &BodyFraming) -> Body {
    match b {
        BodyFraming::Length(n) => Body::Length(*n),
        BodyFraming::Chunked => Body::Chunked,
    }
}

/// The index just past the blank line ending a head.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    http::head_end(buf)
}

/// `parse_head` on a whole head (its final blank line included).
pub fn parse_head(bytes: &[u8]) -> Result<ParsedHead, String> {
    let head = http::parse_head(bytes).map_err(|e| e.to_string())?;
    Ok(ParsedHead {
        method: head.method.to_string(),
        target: head.target.to_string(),
        version: head.version.to_string(),
        headers: head
            .headers
            .iter()
            .map(|(n, v)| ((*n).to_string(), (*v).to_string()))
            .collect(),
    })
}

/// `parse_head` then `classify`: what the proxy does with a request head.
pub fn classify(bytes: &[u8]) -> Result<ProxyRequest, String> {
    let head = http::parse_head(bytes).map_err(|e| e.to_string())?;
    match http::classify(&head).map_err(|e| e.to_string())? {
        Request::Connect(a) => Ok(ProxyRequest::Connect {
            host: a.host.to_string(),
            port: a.port,
        }),
        Request::Forward {
            target,
            origin_head,
            proxy_head,
            body: b,
        } => Ok(ProxyRequest::Forward {
            host: target.host.to_string(),
            port: target.port,
            origin_head,
            proxy_head,
            body: body(&b),
        }),
    }
}

/// `request_in_tunnel`.
pub fn request_in_tunnel(bytes: &[u8]) -> Result<Tunnel, String> {
    Ok(
        match http::request_in_tunnel(bytes).map_err(|e| e.to_string())? {
            InTunnel::NeedMore => Tunnel::NeedMore,
            InTunnel::NotHttp => Tunnel::NotHttp,
            InTunnel::Request {
                host,
                head_len,
                body: b,
            } => Tunnel::Request {
                host: host.to_string(),
                head_len,
                body: body(&b),
            },
        },
    )
}

/// Follows a body of framing `framing` through `pieces` as they arrive: the bytes of each
/// piece that belong to the body, up to the first error, and whether the body ended.
pub fn body_bytes(framing: Body, pieces: &[&[u8]]) -> (Vec<usize>, Result<bool, String>) {
    let mut limit = BodyLimit::new(&match framing {
        Body::Length(n) => BodyFraming::Length(n),
        Body::Chunked => BodyFraming::Chunked,
    });
    let mut taken = Vec::with_capacity(pieces.len());
    for piece in pieces {
        match limit.feed(piece) {
            Ok(n) => taken.push(n),
            Err(e) => return (taken, Err(e.to_string())),
        }
    }
    (taken, Ok(limit.done()))
}

/// The status code of an upstream proxy's response head.
pub fn response_status(head: &[u8]) -> Result<u16, String> {
    http::response_status(head).map_err(|e| e.to_string())
}

/// The status code at the start of a response.
pub fn status_prefix(first: &[u8]) -> Option<u16> {
    http::status_prefix(first)
}

/// `tls::inspect`.
pub fn inspect_tls(buf: &[u8]) -> TlsHello {
    match tls::inspect(buf) {
        Hello::NeedMore => TlsHello::NeedMore,
        Hello::NotTls => TlsHello::NotTls,
        Hello::Sni(s) => TlsHello::Sni(s),
        Hello::Malformed(why) => TlsHello::Malformed(why),
    }
}
