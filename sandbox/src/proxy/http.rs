//! The HTTP/1.x the proxy speaks: parsing request heads from the sandbox (hostile input:
//! `httparse` reads them, every length is bounded, anything ambiguous is refused),
//! rewriting a plain-HTTP request for the origin, the refusal responses, and the framing
//! of request bodies so a client cannot smuggle a second request to another host through
//! one connection.

use std::net::IpAddr;

/// Largest request or response head accepted.
pub(crate) const MAX_HEAD: usize = 16 * 1024;
/// Most header fields in one head.
pub(crate) const MAX_HEADERS: usize = 100;
/// Longest chunk-size line or trailer line of a chunked body.
const MAX_CHUNK_LINE: usize = 4096;
/// Most trailer bytes after the last chunk.
const MAX_TRAILERS: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HttpError {
    #[error("the request head is larger than {MAX_HEAD} bytes")]
    TooLarge,
    #[error("more than {MAX_HEADERS} header fields")]
    TooManyHeaders,
    #[error("malformed request line")]
    RequestLine,
    #[error("malformed header line")]
    HeaderLine,
    #[error("unsupported HTTP version")]
    Version,
    #[error("invalid target \"{0}\"")]
    Target(String),
    #[error("only http:// URLs can be forwarded; use CONNECT for https and other protocols")]
    Scheme,
    #[error("a proxy request needs an absolute URL (http://host/path) or CONNECT host:port")]
    OriginForm,
    #[error("the Host header \"{header}\" does not match the request target \"{target}\"")]
    HostMismatch { header: String, target: String },
    #[error("more than one Host header")]
    DuplicateHost,
    #[error("no Host header")]
    NoHost,
    #[error("conflicting body lengths (Content-Length with Transfer-Encoding, or several)")]
    AmbiguousBody,
    #[error("unsupported Transfer-Encoding \"{0}\"")]
    TransferEncoding(String),
    #[error("malformed chunked body")]
    Chunked,
    #[error("malformed response from the upstream proxy")]
    Response,
}

/// A host as a request names it: a validated DNS name (lowercase, no trailing dot) or an
/// address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Host {
    Name(String),
    Ip(IpAddr),
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Host::Name(n) => write!(f, "{n}"),
            Host::Ip(IpAddr::V6(a)) => write!(f, "[{a}]"),
            Host::Ip(a) => write!(f, "{a}"),
        }
    }
}

/// `host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Authority {
    pub host: Host,
    pub port: u16,
}

impl std::fmt::Display for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// A parsed request head. Borrowed from the bytes read.
#[derive(Debug)]
pub(crate) struct Head<'a> {
    pub method: &'a str,
    pub target: &'a str,
    pub version: &'a str,
    pub headers: Vec<(&'a str, &'a str)>,
}

impl Head<'_> {
    /// Values of every header named `name` (case-insensitive).
    fn all<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s str> + 's {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }
}

/// What the client asked the proxy for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Request {
    /// `CONNECT host:port`: a tunnel.
    Connect(Authority),
    /// An absolute-form plain-HTTP request, rewritten for the origin server
    /// (`origin_head`) or for an upstream proxy (`proxy_head`), and how its body is framed.
    Forward {
        target: Authority,
        origin_head: Vec<u8>,
        proxy_head: Vec<u8>,
        body: BodyFraming,
    },
}

/// The index just past the blank line ending a head, if `buf` holds one.
pub(crate) fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Parses a request head (including its final blank line) with `httparse`, then holds it
/// to what the proxy accepts: the whole head and nothing after it, HTTP/1.0 or 1.1, a
/// target of visible ASCII, header values in UTF-8.
pub(crate) fn parse_head(bytes: &[u8]) -> Result<Head<'_>, HttpError> {
    if bytes.len() > MAX_HEAD {
        return Err(HttpError::TooLarge);
    }
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    let parsed = req.parse(bytes).map_err(|e| match e {
        httparse::Error::TooManyHeaders => HttpError::TooManyHeaders,
        httparse::Error::Version => HttpError::Version,
        httparse::Error::HeaderName | httparse::Error::HeaderValue => HttpError::HeaderLine,
        _ => HttpError::RequestLine,
    })?;
    // The head ends exactly at our blank line (no bare-LF ends, nothing after it), and
    // starts with the request line (no blank lines before it).
    if parsed != httparse::Status::Complete(bytes.len())
        || !bytes.ends_with(b"\r\n\r\n")
        || bytes.starts_with(b"\r")
        || bytes.starts_with(b"\n")
    {
        return Err(HttpError::HeaderLine);
    }
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(HttpError::RequestLine);
    };
    if target.is_empty() || target.bytes().any(|b| b <= b' ' || b >= 0x7f) {
        return Err(HttpError::RequestLine);
    }
    let version = match minor {
        0 => "HTTP/1.0",
        1 => "HTTP/1.1",
        _ => return Err(HttpError::Version),
    };
    let mut headers = Vec::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value).map_err(|_| HttpError::HeaderLine)?;
        headers.push((h.name, value.trim_matches([' ', '\t'])));
    }
    Ok(Head {
        method,
        target,
        version,
        headers,
    })
}

/// Parses `host`, `host:port`, `[v6]` or `[v6]:port`; `default_port` applies when no port
/// is given (`None`: a port is required).
pub(crate) fn parse_authority(s: &str, default_port: Option<u16>) -> Result<Authority, HttpError> {
    let bad = || HttpError::Target(s.to_string());
    if s.contains('@') {
        return Err(bad());
    }
    let (host_text, port_text) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or_else(bad)?;
        match after {
            "" => (h, None),
            p => (h, Some(p.strip_prefix(':').ok_or_else(bad)?)),
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    let port = match port_text {
        Some(p) if !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) => {
            match p.parse::<u16>() {
                Ok(n) if n > 0 => n,
                _ => return Err(bad()),
            }
        }
        Some(_) => return Err(bad()),
        None => default_port.ok_or_else(bad)?,
    };
    let host = if s.starts_with('[') {
        match host_text.parse::<std::net::Ipv6Addr>() {
            Ok(a) => Host::Ip(IpAddr::V6(a)),
            Err(_) => return Err(bad()),
        }
    } else if let Ok(a) = host_text.parse::<std::net::Ipv4Addr>() {
        Host::Ip(IpAddr::V4(a))
    } else {
        // Anything else must be a DNS name: this also refuses numeric forms such as
        // "127.1" or "0x7f.1" that some resolvers would read as addresses.
        Host::Name(policy::parse_domain(host_text).map_err(|_| bad())?)
    };
    Ok(Authority { host, port })
}

/// What the first bytes through a tunnel to a host name are, read as plain HTTP.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum InTunnel {
    /// Not enough bytes yet to tell, or the head is not complete.
    NeedMore,
    /// Not an HTTP/1 request.
    NotHttp,
    /// A complete request head: the host it names (its Host header, and its target when
    /// that is absolute), the head's length and how its body is framed.
    Request {
        host: Host,
        head_len: usize,
        body: BodyFraming,
    },
}

/// Reads the start of a tunnel's client bytes as an HTTP/1 request, for the check that its
/// Host names the tunnel's host.
pub(crate) fn request_in_tunnel(bytes: &[u8]) -> Result<InTunnel, HttpError> {
    // A method is a short run (at most 23) of capital letters followed by a space: the
    // same verdict whether the bytes after the 24th have arrived or not.
    let method_len = bytes
        .iter()
        .take(24)
        .take_while(|b| b.is_ascii_uppercase())
        .count();
    match bytes.get(method_len) {
        Some(b' ') if method_len > 0 && method_len < 24 => {}
        None if method_len == bytes.len() && method_len < 24 => return Ok(InTunnel::NeedMore),
        _ => return Ok(InTunnel::NotHttp),
    }
    let Some(head_len) = head_end(&bytes[..bytes.len().min(MAX_HEAD + 4)]) else {
        return if bytes.len() > MAX_HEAD {
            Err(HttpError::TooLarge)
        } else {
            Ok(InTunnel::NeedMore)
        };
    };
    let head = parse_head(&bytes[..head_len])?;
    if head.method == "CONNECT" {
        return Err(HttpError::RequestLine);
    }
    let mut hosts = head.all("host");
    let header = match (hosts.next(), hosts.next()) {
        (Some(one), None) => one,
        (None, _) => return Err(HttpError::NoHost),
        (Some(_), Some(_)) => return Err(HttpError::DuplicateHost),
    };
    let named = parse_authority(header, Some(80))?;
    if head
        .target
        .get(..7)
        .is_some_and(|p| p.eq_ignore_ascii_case("http://"))
    {
        let authority = head.target[7..]
            .split(['/', '?', '#'])
            .next()
            .unwrap_or_default();
        let target = parse_authority(authority, Some(80))?;
        if target.host != named.host {
            return Err(HttpError::HostMismatch {
                header: header.to_string(),
                target: head.target.to_string(),
            });
        }
    } else if !head.target.starts_with('/') && head.target != "*" {
        return Err(HttpError::Target(head.target.to_string()));
    }
    Ok(InTunnel::Request {
        host: named.host,
        head_len,
        body: body_framing(&head)?,
    })
}

/// Hop-by-hop headers, never forwarded.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
];

/// Classifies a request and, for plain HTTP, checks and rewrites it.
pub(crate) fn classify(head: &Head<'_>) -> Result<Request, HttpError> {
    if head.method.eq_ignore_ascii_case("CONNECT") {
        return Ok(Request::Connect(parse_authority(head.target, None)?));
    }
    let rest = match head.target.get(..7) {
        Some(p) if p.eq_ignore_ascii_case("http://") => &head.target[7..],
        _ if head.target.starts_with('/') => return Err(HttpError::OriginForm),
        _ if head.target.contains("://") => return Err(HttpError::Scheme),
        _ => return Err(HttpError::Target(head.target.to_string())),
    };
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (auth_text, path) = rest.split_at(split);
    let target = parse_authority(auth_text, Some(80))?;
    let path = match path {
        "" => "/".to_string(),
        p if p.starts_with('?') => format!("/{p}"),
        p => p.to_string(),
    };
    if path.contains('#') {
        return Err(HttpError::Target(head.target.to_string()));
    }
    let mut hosts = head.all("host");
    let host_header = hosts.next();
    if hosts.next().is_some() {
        return Err(HttpError::DuplicateHost);
    }
    if let Some(h) = host_header {
        let matches = parse_authority(h, Some(80)).is_ok_and(|a| a == target);
        if !matches {
            return Err(HttpError::HostMismatch {
                header: h.to_string(),
                target: target.to_string(),
            });
        }
    }
    let body = body_framing(head)?;
    // Headers the Connection header names are hop-by-hop too.
    let listed: Vec<String> = head
        .all("connection")
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    let mut fields = String::new();
    let host_value = host_header.map_or_else(|| host_for_header(&target), str::to_string);
    fields.push_str(&format!("Host: {host_value}\r\n"));
    for (name, value) in &head.headers {
        let lower = name.to_ascii_lowercase();
        if lower == "host" || HOP_BY_HOP.contains(&lower.as_str()) || listed.contains(&lower) {
            continue;
        }
        fields.push_str(&format!("{name}: {value}\r\n"));
    }
    fields.push_str("Connection: close\r\n\r\n");
    let origin_head = format!("{} {path} {}\r\n{fields}", head.method, head.version).into_bytes();
    let proxy_head = format!(
        "{} http://{}{path} {}\r\n{fields}",
        head.method,
        host_for_header(&target),
        head.version
    )
    .into_bytes();
    Ok(Request::Forward {
        target,
        origin_head,
        proxy_head,
        body,
    })
}

/// `host` or `host:port` as a Host header writes it (port 80 left out).
fn host_for_header(a: &Authority) -> String {
    if a.port == 80 {
        a.host.to_string()
    } else {
        a.to_string()
    }
}

/// How a request body is delimited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BodyFraming {
    /// Exactly this many bytes (0: no body).
    Length(u64),
    Chunked,
}

fn body_framing(head: &Head<'_>) -> Result<BodyFraming, HttpError> {
    let te: Vec<&str> = head.all("transfer-encoding").collect();
    let cl: Vec<&str> = head.all("content-length").collect();
    match (te.as_slice(), cl.as_slice()) {
        ([], []) => Ok(BodyFraming::Length(0)),
        ([], [one]) => {
            if one.is_empty() || one.len() > 19 || !one.bytes().all(|b| b.is_ascii_digit()) {
                return Err(HttpError::AmbiguousBody);
            }
            one.parse()
                .map(BodyFraming::Length)
                .map_err(|_| HttpError::AmbiguousBody)
        }
        ([one], []) if one.eq_ignore_ascii_case("chunked") => {
            if head.version == "HTTP/1.0" {
                return Err(HttpError::TransferEncoding((*one).to_string()));
            }
            Ok(BodyFraming::Chunked)
        }
        ([one], []) => Err(HttpError::TransferEncoding((*one).to_string())),
        _ => Err(HttpError::AmbiguousBody),
    }
}

/// Follows a request body through the bytes the client sends, so only the body reaches
/// the origin and whatever follows it is dropped.
#[derive(Debug)]
pub(crate) struct BodyLimit {
    state: BodyState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyState {
    Remaining(u64),
    /// In a chunk-size line; `len` bytes of it seen, `saw_cr` after a CR.
    SizeLine {
        size: u64,
        digits: usize,
        in_ext: bool,
        len: usize,
        saw_cr: bool,
    },
    Data(u64),
    DataCr,
    DataLf,
    /// In the trailer section; `line` bytes of the current line, `total` overall.
    Trailer {
        line: usize,
        total: usize,
        saw_cr: bool,
    },
    Done,
}

impl BodyLimit {
    pub(crate) fn new(framing: &BodyFraming) -> Self {
        let state = match framing {
            BodyFraming::Length(0) => BodyState::Done,
            BodyFraming::Length(n) => BodyState::Remaining(*n),
            BodyFraming::Chunked => BodyState::SizeLine {
                size: 0,
                digits: 0,
                in_ext: false,
                len: 0,
                saw_cr: false,
            },
        };
        Self { state }
    }

    pub(crate) fn done(&self) -> bool {
        self.state == BodyState::Done
    }

    /// How many leading bytes of `input` belong to the body.
    pub(crate) fn feed(&mut self, input: &[u8]) -> Result<usize, HttpError> {
        let mut i = 0;
        while i < input.len() {
            match &mut self.state {
                BodyState::Done => break,
                BodyState::Remaining(n) => {
                    let take = (*n).min((input.len() - i) as u64);
                    *n -= take;
                    i += take as usize;
                    if *n == 0 {
                        self.state = BodyState::Done;
                    }
                }
                BodyState::Data(n) => {
                    let take = (*n).min((input.len() - i) as u64);
                    *n -= take;
                    i += take as usize;
                    if *n == 0 {
                        self.state = BodyState::DataCr;
                    }
                }
                BodyState::DataCr => {
                    expect(input[i], b'\r')?;
                    i += 1;
                    self.state = BodyState::DataLf;
                }
                BodyState::DataLf => {
                    expect(input[i], b'\n')?;
                    i += 1;
                    self.state = size_line();
                }
                BodyState::SizeLine {
                    size,
                    digits,
                    in_ext,
                    len,
                    saw_cr,
                } => {
                    let b = input[i];
                    i += 1;
                    *len += 1;
                    if *len > MAX_CHUNK_LINE {
                        return Err(HttpError::Chunked);
                    }
                    if *saw_cr {
                        expect(b, b'\n')?;
                        if *digits == 0 {
                            return Err(HttpError::Chunked);
                        }
                        self.state = if *size == 0 {
                            BodyState::Trailer {
                                line: 0,
                                total: 0,
                                saw_cr: false,
                            }
                        } else {
                            BodyState::Data(*size)
                        };
                    } else if b == b'\r' {
                        *saw_cr = true;
                    } else if *in_ext {
                        if b < b' ' && b != b'\t' {
                            return Err(HttpError::Chunked);
                        }
                    } else if b == b';' {
                        *in_ext = true;
                    } else {
                        let d = (b as char).to_digit(16).ok_or(HttpError::Chunked)?;
                        *digits += 1;
                        if *digits > 15 {
                            return Err(HttpError::Chunked);
                        }
                        *size = *size * 16 + u64::from(d);
                    }
                }
                BodyState::Trailer {
                    line,
                    total,
                    saw_cr,
                } => {
                    let b = input[i];
                    i += 1;
                    *total += 1;
                    if *total > MAX_TRAILERS {
                        return Err(HttpError::Chunked);
                    }
                    if *saw_cr {
                        expect(b, b'\n')?;
                        if *line == 0 {
                            self.state = BodyState::Done;
                        } else {
                            *line = 0;
                            *saw_cr = false;
                        }
                    } else if b == b'\r' {
                        *saw_cr = true;
                    } else {
                        *line += 1;
                    }
                }
            }
        }
        Ok(i)
    }
}

fn size_line() -> BodyState {
    BodyState::SizeLine {
        size: 0,
        digits: 0,
        in_ext: false,
        len: 0,
        saw_cr: false,
    }
}

fn expect(got: u8, want: u8) -> Result<(), HttpError> {
    if got == want {
        Ok(())
    } else {
        Err(HttpError::Chunked)
    }
}

/// The status code of a response head (`HTTP/1.x NNN ...`).
pub(crate) fn response_status(head: &[u8]) -> Result<u16, HttpError> {
    let line_end = head
        .windows(2)
        .position(|w| w == b"\r\n")
        .ok_or(HttpError::Response)?;
    let line = std::str::from_utf8(&head[..line_end]).map_err(|_| HttpError::Response)?;
    let mut parts = line.splitn(3, ' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(HttpError::Response);
    };
    if !matches!(version, "HTTP/1.0" | "HTTP/1.1")
        || code.len() != 3
        || !code.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(HttpError::Response);
    }
    code.parse().map_err(|_| HttpError::Response)
}

/// The status code at the start of a response (`HTTP/1.x NNN`), if these first bytes
/// hold one.
pub(crate) fn status_prefix(first: &[u8]) -> Option<u16> {
    let rest = first.strip_prefix(b"HTTP/1.")?;
    let code = rest.get(2..5)?;
    if rest.get(1) != Some(&b' ') || !code.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(code).ok()?.parse().ok()
}

/// Keeps a header value to printable ASCII on one line.
fn header_safe(s: &str) -> String {
    s.chars()
        .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
        .take(512)
        .collect()
}

/// A refusal: status line, `X-Mxc-Deny` (policy) or `X-Mxc-Error` (network failure)
/// with the reason, and a one-line plain-text body.
pub(crate) fn refusal(status: u16, header: &str, reason: &str, message: &str) -> Vec<u8> {
    let phrase = match status {
        400 => "Bad Request",
        403 => "Forbidden",
        405 => "Method Not Allowed",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    };
    let body = format!("mxc-vm: {}\n", header_safe(message));
    format!(
        "HTTP/1.1 {status} {phrase}\r\n{header}: {}\r\nContent-Type: text/plain; \
         charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        header_safe(reason),
        body.len()
    )
    .into_bytes()
}

/// The reply to an established CONNECT tunnel.
pub(crate) const CONNECT_OK: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Head<'_> {
        parse_head(text.as_bytes()).unwrap()
    }

    fn name(n: &str, port: u16) -> Authority {
        Authority {
            host: Host::Name(n.into()),
            port,
        }
    }

    #[test]
    fn connect_targets_parse() {
        let cases = [
            (
                "CONNECT Allowed.Test:443 HTTP/1.1\r\n\r\n",
                name("allowed.test", 443),
            ),
            (
                "CONNECT 198.51.100.2:22 HTTP/1.1\r\nHost: x\r\n\r\n",
                Authority {
                    host: Host::Ip("198.51.100.2".parse().unwrap()),
                    port: 22,
                },
            ),
            (
                "CONNECT [2001:db8::1]:443 HTTP/1.1\r\n\r\n",
                Authority {
                    host: Host::Ip("2001:db8::1".parse().unwrap()),
                    port: 443,
                },
            ),
        ];

        for (text, want) in cases {
            assert_eq!(classify(&head(text)), Ok(Request::Connect(want)), "{text}");
        }
    }

    #[test]
    fn bad_connect_targets_are_refused() {
        for target in [
            "allowed.test",
            "allowed.test:0",
            "allowed.test:65536",
            "allowed.test:+1",
            "user@allowed.test:443",
            "127.1:80",
            "0x7f.1:80",
            "[::1:443",
            "2001:db8::1:443",
            "a_b.test:443",
            ":443",
        ] {
            let text = format!("CONNECT {target} HTTP/1.1\r\n\r\n");
            assert!(
                matches!(classify(&head(&text)), Err(HttpError::Target(_))),
                "{target}"
            );
        }
    }

    #[test]
    fn absolute_form_is_rewritten_for_the_origin() {
        let h = head(
            "GET http://allowed.test:8080/a?b=1 HTTP/1.1\r\nHost: allowed.test:8080\r\n\
             Proxy-Connection: keep-alive\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\n\
             Accept: */*\r\n\r\n",
        );

        let Ok(Request::Forward {
            target,
            origin_head,
            proxy_head,
            body,
        }) = classify(&h)
        else {
            panic!("not a forward");
        };

        assert_eq!(target, name("allowed.test", 8080));
        assert_eq!(
            String::from_utf8(origin_head).unwrap(),
            "GET /a?b=1 HTTP/1.1\r\nHost: allowed.test:8080\r\nAccept: */*\r\n\
             Connection: close\r\n\r\n"
        );
        assert!(String::from_utf8(proxy_head)
            .unwrap()
            .starts_with("GET http://allowed.test:8080/a?b=1 HTTP/1.1\r\n"));
        assert_eq!(body, BodyFraming::Length(0));
    }

    #[test]
    fn a_missing_host_header_is_added() {
        let h = head("GET http://allowed.test HTTP/1.0\r\n\r\n");

        let Ok(Request::Forward { origin_head, .. }) = classify(&h) else {
            panic!("not a forward");
        };

        assert_eq!(
            String::from_utf8(origin_head).unwrap(),
            "GET / HTTP/1.0\r\nHost: allowed.test\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn host_header_must_match_the_target() {
        let ok = head("GET http://a.test/ HTTP/1.1\r\nHost: A.test:80\r\n\r\n");
        let other = head("GET http://a.test/ HTTP/1.1\r\nHost: b.test\r\n\r\n");
        let port = head("GET http://a.test/ HTTP/1.1\r\nHost: a.test:81\r\n\r\n");
        let twice = head("GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nHost: a.test\r\n\r\n");

        assert!(classify(&ok).is_ok());
        assert!(matches!(
            classify(&other),
            Err(HttpError::HostMismatch { .. })
        ));
        assert!(matches!(
            classify(&port),
            Err(HttpError::HostMismatch { .. })
        ));
        assert_eq!(classify(&twice), Err(HttpError::DuplicateHost));
    }

    #[test]
    fn origin_form_and_other_schemes_are_refused() {
        assert_eq!(
            classify(&head("GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")),
            Err(HttpError::OriginForm)
        );
        assert_eq!(
            classify(&head("GET https://a.test/ HTTP/1.1\r\n\r\n")),
            Err(HttpError::Scheme)
        );
    }

    #[test]
    fn malformed_heads_are_refused() {
        let cases: &[(&[u8], HttpError)] = &[
            (b"GET  http://a/ HTTP/1.1\r\n\r\n", HttpError::RequestLine),
            (b"GET http://a/ HTTP/2\r\n\r\n", HttpError::Version),
            (
                b"GET http://a/ HTTP/1.1\r\nBad Name: x\r\n\r\n",
                HttpError::HeaderLine,
            ),
            (
                b"GET http://a/ HTTP/1.1\r\nX: a\r\n folded\r\n\r\n",
                HttpError::HeaderLine,
            ),
            (
                b"GET http://a/ HTTP/1.1\r\nX: a\x00b\r\n\r\n",
                HttpError::HeaderLine,
            ),
            (
                b"GET http://a/ HTTP/1.1\r\nX: \xff\r\n\r\n",
                HttpError::HeaderLine,
            ),
            (b"G(T http://a/ HTTP/1.1\r\n\r\n", HttpError::RequestLine),
            (
                b"GET http://a/ HTTP/1.1\r\nX : a\r\n\r\n",
                HttpError::HeaderLine,
            ),
            (
                b"GET http://a/ HTTP/1.1\nX: a\n\r\n\r\n",
                HttpError::HeaderLine,
            ),
            (b"\r\nGET http://a/ HTTP/1.1\r\n\r\n", HttpError::HeaderLine),
            (
                b"GET http://a/\xc3\xa9 HTTP/1.1\r\n\r\n",
                HttpError::RequestLine,
            ),
            (
                b"GET http://a/ HTTP/1.1\r\nX: a\r\n\r\nextra",
                HttpError::HeaderLine,
            ),
        ];

        for (bytes, want) in cases {
            assert_eq!(parse_head(bytes).err(), Some(want.clone()), "{bytes:?}");
        }
    }

    #[test]
    fn heads_are_bounded() {
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X{i}: v\r\n")).collect();
        let big = format!(
            "GET http://a/ HTTP/1.1\r\nX: {}\r\n\r\n",
            "v".repeat(MAX_HEAD)
        );

        assert_eq!(
            parse_head(format!("GET http://a/ HTTP/1.1\r\n{many}\r\n").as_bytes()).err(),
            Some(HttpError::TooManyHeaders)
        );
        assert_eq!(parse_head(big.as_bytes()).err(), Some(HttpError::TooLarge));
    }

    #[test]
    fn ambiguous_bodies_are_refused() {
        let both = head(
            "POST http://a.test/ HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        let two =
            head("POST http://a.test/ HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n");
        let gzip = head("POST http://a.test/ HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n");
        let sign = head("POST http://a.test/ HTTP/1.1\r\nContent-Length: +3\r\n\r\n");

        assert_eq!(classify(&both), Err(HttpError::AmbiguousBody));
        assert_eq!(classify(&two), Err(HttpError::AmbiguousBody));
        assert_eq!(
            classify(&gzip),
            Err(HttpError::TransferEncoding("gzip".into()))
        );
        assert_eq!(classify(&sign), Err(HttpError::AmbiguousBody));
    }

    #[test]
    fn content_length_body_stops_at_its_end() {
        let mut b = BodyLimit::new(&BodyFraming::Length(5));

        let first = b.feed(b"abc").unwrap();
        let second = b.feed(b"deGET http://evil.test/ HTTP/1.1\r\n").unwrap();

        assert_eq!((first, second, b.done()), (3, 2, true));
    }

    #[test]
    fn chunked_body_stops_after_the_last_chunk_and_trailers() {
        let body = b"4;ext=1\r\nWiki\r\n5\r\npedia\r\n0\r\nX-T: 1\r\n\r\nGET http://evil.test/";
        let mut whole = BodyLimit::new(&BodyFraming::Chunked);
        let mut bytewise = BodyLimit::new(&BodyFraming::Chunked);

        let n = whole.feed(body).unwrap();
        let m: usize = body.chunks(1).map(|c| bytewise.feed(c).unwrap()).sum();

        let end = body.len() - "GET http://evil.test/".len();
        assert_eq!((n, whole.done()), (end, true));
        assert_eq!((m, bytewise.done()), (end, true));
    }

    #[test]
    fn malformed_chunks_are_refused() {
        for bad in [
            &b"x\r\n"[..],
            b"4\r\nWikiXX",
            b"\r\n",
            b"10000000000000000\r\n",
            b"4\n",
        ] {
            let mut b = BodyLimit::new(&BodyFraming::Chunked);
            assert_eq!(b.feed(bad), Err(HttpError::Chunked), "{bad:?}");
        }
    }

    #[test]
    fn refusals_carry_the_reason_header() {
        let r =
            String::from_utf8(refusal(403, "X-Mxc-Deny", "default deny", "no\r\nrule")).unwrap();

        assert!(r.starts_with("HTTP/1.1 403 Forbidden\r\nX-Mxc-Deny: default deny\r\n"));
        assert!(r.ends_with("\r\n\r\nmxc-vm: no??rule\n"));
    }

    #[test]
    fn response_status_prefixes_parse() {
        assert_eq!(status_prefix(b"HTTP/1.1 404 Not Found\r\n"), Some(404));
        assert_eq!(status_prefix(b"HTTP/1.0 200"), Some(200));
        assert_eq!(status_prefix(b"HTTP/1.1 2"), None);
        assert_eq!(status_prefix(b"SSH-2.0"), None);
    }

    #[test]
    fn upstream_status_lines_parse() {
        assert_eq!(
            response_status(b"HTTP/1.1 200 Connection established\r\n\r\n"),
            Ok(200)
        );
        assert_eq!(response_status(b"HTTP/1.0 407 Auth\r\n\r\n"), Ok(407));
        // Found by the fuzz target sandbox/fuzz http_request (httparse refuses these).
        assert_eq!(
            response_status(b"HTTP/1.q 200 OK\r\n\r\n"),
            Err(HttpError::Response)
        );
        assert_eq!(
            response_status(b"HTTP/1.1 +20 OK\r\n\r\n"),
            Err(HttpError::Response)
        );
        assert_eq!(
            response_status(b"SSH-2.0\r\n\r\n"),
            Err(HttpError::Response)
        );
    }

    #[test]
    fn requests_in_a_tunnel_name_their_host() {
        let name = |n: &str| Host::Name(n.to_string());
        assert_eq!(request_in_tunnel(b"GE"), Ok(InTunnel::NeedMore));
        assert_eq!(
            request_in_tunnel(b"GET / HTTP/1.1\r\nHost: a.test"),
            Ok(InTunnel::NeedMore)
        );
        assert_eq!(request_in_tunnel(b"SSH-2.0-x\r\n"), Ok(InTunnel::NotHttp));
        assert_eq!(request_in_tunnel(b"get / HTTP/1.1"), Ok(InTunnel::NotHttp));
        assert_eq!(request_in_tunnel(&[0u8; 40]), Ok(InTunnel::NotHttp));
        // A 24-letter method is not one, whether the space after it has arrived or not
        // (found by the fuzzer: the two answers differed).
        let long = b"CONNECTLLLLLLLLLLLLLLLLL example.com:443 HTTP/1.1\r\n";
        assert_eq!(request_in_tunnel(long), Ok(InTunnel::NotHttp));
        assert_eq!(request_in_tunnel(&long[..24]), Ok(InTunnel::NotHttp));
        assert_eq!(
            request_in_tunnel(
                b"POST /x HTTP/1.1\r\nHost: A.Test:8080\r\nContent-Length: 2\r\n\r\nab"
            ),
            Ok(InTunnel::Request {
                host: name("a.test"),
                head_len: 58,
                body: BodyFraming::Length(2)
            })
        );
        assert_eq!(
            request_in_tunnel(b"GET http://b.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n"),
            Err(HttpError::HostMismatch {
                header: "a.test".into(),
                target: "http://b.test/".into()
            })
        );
        assert_eq!(
            request_in_tunnel(b"GET / HTTP/1.1\r\n\r\n"),
            Err(HttpError::NoHost)
        );
        assert_eq!(
            request_in_tunnel(b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n"),
            Err(HttpError::DuplicateHost)
        );
        assert_eq!(
            request_in_tunnel(b"CONNECT a.test:1 HTTP/1.1\r\nHost: a.test\r\n\r\n"),
            Err(HttpError::RequestLine)
        );
        let mut huge = b"GET / HTTP/1.1\r\nX: ".to_vec();
        huge.resize(MAX_HEAD + 10, b'a');
        assert_eq!(request_in_tunnel(&huge), Err(HttpError::TooLarge));
    }
}
