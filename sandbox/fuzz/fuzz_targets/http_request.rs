//! Fuzz the proxy's HTTP/1.1 parsing (`proxy::http`): a client's request head and what
//! the proxy makes of it (CONNECT or an absolute-form request, rewritten for the origin),
//! the request through a tunnel, the body framing, and an upstream proxy's status line.
//!
//! Input: one knob byte (where a body is cut into pieces), then the bytes a client (or an
//! upstream proxy) sends. Checks, beyond "no panic":
//! - differential: a head the proxy accepts, `httparse` parses completely with the same
//!   method, target, version and header names; a CONNECT target it accepts, the `http`
//!   crate reads as the same host and port; the scheme and authority of an absolute-form
//!   target too (scheme http, port 80 by default); the Host of a request through a
//!   tunnel likewise;
//! - the heads the proxy writes (for the origin and for an upstream proxy) parse again,
//!   and the one for an upstream proxy is classified the same way (same host, port,
//!   method, body framing);
//! - the body framing takes the same bytes whatever pieces they arrive in, never more
//!   than it was given;
//! - the request through a tunnel: a prefix of the bytes gives "need more" or the same
//!   answer;
//! - a status code the proxy reads from an upstream proxy's status line is the one
//!   `httparse` reads from that line.
#![no_main]

use std::net::Ipv6Addr;

use libfuzzer_sys::fuzz_target;
use sandbox::proxy::fuzzing::{
    body_bytes, classify, head_end, parse_head, request_in_tunnel, response_status, status_prefix,
    Body, ProxyRequest, Tunnel,
};

/// A host as the proxy writes it: lowercase, no trailing dot, IPv6 in brackets in its
/// canonical form.
fn normal_host(host: &str) -> String {
    let lower = host.to_ascii_lowercase();
    let lower = lower.strip_suffix('.').unwrap_or(&lower).to_string();
    match lower
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .and_then(|h| h.parse::<Ipv6Addr>().ok())
    {
        Some(a) => format!("[{a}]"),
        None => lower,
    }
}

fn check_head(head: &[u8]) {
    let Ok(ours) = parse_head(head) else {
        let _ = classify(head);
        return;
    };
    let mut slots = [httparse::EMPTY_HEADER; 100];
    let mut req = httparse::Request::new(&mut slots);
    let theirs = req.parse(head);
    assert_eq!(theirs, Ok(httparse::Status::Complete(head.len())));
    assert_eq!(req.method, Some(ours.method.as_str()));
    assert_eq!(req.path, Some(ours.target.as_str()));
    assert_eq!(
        req.version.map(|v| format!("HTTP/1.{v}")),
        Some(ours.version.clone())
    );
    let names: Vec<&str> = req.headers.iter().map(|h| h.name).collect();
    let ours_names: Vec<&str> = ours.headers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ours_names);

    match classify(head) {
        Ok(ProxyRequest::Connect { host, port }) => {
            let theirs = ours
                .target
                .parse::<http::uri::Authority>()
                .expect("http reads a CONNECT target the proxy accepts");
            assert_eq!(normal_host(theirs.host()), host, "CONNECT {}", ours.target);
            assert_eq!(theirs.port_u16(), Some(port), "CONNECT {}", ours.target);
        }
        Ok(ProxyRequest::Forward {
            host,
            port,
            origin_head,
            proxy_head,
            body,
        }) => {
            // The scheme and authority only: the proxy forwards any visible ASCII in the
            // path, which `http` refuses in part (`, {, }, |, ^, \, ", <, >).
            let end = ours.target[7..]
                .find(['/', '?', '#'])
                .map_or(ours.target.len(), |i| i + 7);
            let uri = ours.target[..end]
                .parse::<http::Uri>()
                .expect("http reads an absolute target the proxy accepts");
            assert!(uri
                .scheme_str()
                .is_some_and(|s| s.eq_ignore_ascii_case("http")));
            let authority = uri
                .authority()
                .expect("an absolute target has an authority");
            assert_eq!(
                normal_host(authority.host()),
                host,
                "target {}",
                ours.target
            );
            assert_eq!(
                authority.port_u16().unwrap_or(80),
                port,
                "target {}",
                ours.target
            );
            let origin = parse_head(&origin_head).expect("the origin head parses");
            assert_eq!(origin.method, ours.method);
            let hosts = origin
                .headers
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case("host"))
                .count();
            assert_eq!(hosts, 1);
            match classify(&proxy_head) {
                Ok(ProxyRequest::Forward {
                    host: h2,
                    port: p2,
                    body: b2,
                    ..
                }) => assert_eq!((h2, p2, b2), (host, port, body)),
                other => panic!("the head for the upstream proxy reads as {other:?}"),
            }
        }
        Err(_) => {}
    }
}

fn check_body(framing: Body, rest: &[u8], knob: u8) {
    let cut = (usize::from(knob) * rest.len() / 256).min(rest.len());
    let (a, b) = rest.split_at(cut);
    let (whole, whole_end) = body_bytes(framing, &[rest]);
    let (pieces, pieces_end) = body_bytes(framing, &[a, b]);
    match (&whole_end, &pieces_end) {
        (Ok(x), Ok(y)) => {
            assert_eq!(x, y);
            assert_eq!(whole.iter().sum::<usize>(), pieces.iter().sum::<usize>());
        }
        (Err(_), Err(_)) => {}
        _ => panic!("one piece gives {whole_end:?}, two give {pieces_end:?}"),
    }
    for (n, piece) in pieces.iter().zip([a, b]) {
        assert!(*n <= piece.len());
    }
    if let Body::Length(n) = framing {
        assert!(whole.iter().sum::<usize>() as u64 <= n);
    }
}

fn check_tunnel(input: &[u8]) {
    let answer = request_in_tunnel(input);
    if let Ok(Tunnel::Request { host, head_len, .. }) = &answer {
        let head = &input[..*head_len];
        let parsed = parse_head(head).expect("the tunnel's head parses");
        let header = parsed
            .headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("host"))
            .map(|(_, v)| v.clone())
            .expect("a Host header");
        let theirs = header
            .parse::<http::uri::Authority>()
            .expect("http reads the Host the proxy accepts");
        assert_eq!(&normal_host(theirs.host()), host, "Host: {header}");
    }
    if let Ok(answer) = &answer {
        for &b in input.iter().take(3) {
            let cut = usize::from(b) * input.len() / 256;
            if let Ok(early) = request_in_tunnel(&input[..cut]) {
                assert!(
                    early == Tunnel::NeedMore || &early == answer,
                    "the first {cut} bytes give {early:?}, all of them {answer:?}"
                );
            }
        }
    }
}

/// The version and code of the status line, as a head `httparse` can finish (the proxy
/// reads only those of an upstream proxy's answer, not its reason phrase or header lines).
fn status_line(input: &[u8]) -> Option<Vec<u8>> {
    let end = input.windows(2).position(|w| w == b"\r\n")?;
    let mut fields = input[..end].splitn(3, |b| *b == b' ');
    let mut line = fields.next()?.to_vec();
    line.push(b' ');
    line.extend_from_slice(fields.next()?);
    line.extend_from_slice(b" \r\n\r\n");
    Some(line)
}

fn check_status(input: &[u8]) {
    let line = status_line(input).unwrap_or_default();
    let mut slots = [httparse::EMPTY_HEADER; 1];
    let mut resp = httparse::Response::new(&mut slots);
    let parsed = resp.parse(&line);
    if let Ok(code) = response_status(input) {
        assert!(
            parsed.is_ok(),
            "httparse refuses a status line the proxy reads as {code}"
        );
        assert_eq!(resp.code, Some(code));
    }
    if let (Some(code), Ok(_), Some(theirs)) = (status_prefix(input), &parsed, resp.code) {
        assert_eq!(code, theirs);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&knob, input)) = data.split_first() else {
        return;
    };
    if let Some(end) = head_end(input) {
        let (head, rest) = input.split_at(end);
        check_head(head);
        if let Ok(ProxyRequest::Forward { body, .. }) = classify(head) {
            check_body(body, rest, knob);
        }
    }
    check_body(Body::Chunked, input, knob);
    check_tunnel(input);
    check_status(input);
});
