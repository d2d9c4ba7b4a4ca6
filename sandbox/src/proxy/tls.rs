//! A look at the first bytes a client sends through an allowed CONNECT tunnel: when they
//! are a TLS ClientHello, its server name (SNI) must be the CONNECT host (no domain
//! fronting). Nothing is decrypted or changed; the bytes are passed on as they came.
//! Records are gathered here (bounded by [`MAX_HELLO`]); the ClientHello itself is
//! parsed by `tls-parser`.

/// Largest ClientHello accepted (handshake message body). Real ones are a few KiB.
pub(crate) const MAX_HELLO: usize = 32 * 1024;

/// What the first client bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Hello {
    /// Not enough bytes yet to tell.
    NeedMore,
    /// Not a TLS handshake (e.g. SSH, plain HTTP through the tunnel).
    NotTls,
    /// A complete ClientHello and its server name, if it sends one.
    Sni(Option<String>),
    /// A TLS handshake record that is not a well-formed ClientHello.
    Malformed(&'static str),
}

const HANDSHAKE: u8 = 0x16;
const CLIENT_HELLO: u8 = 1;
const MAX_RECORD: usize = (1 << 14) + 2048;

/// Looks at the first bytes of a tunnel. The ClientHello may span several records.
pub(crate) fn inspect(buf: &[u8]) -> Hello {
    let Some(&first) = buf.first() else {
        return Hello::NeedMore;
    };
    if first != HANDSHAKE {
        return Hello::NotTls;
    }
    // Gather handshake bytes from consecutive handshake records.
    let mut handshake: Vec<u8> = Vec::new();
    let mut rest = buf;
    let mut need: Option<usize> = None;
    loop {
        if rest.len() < 5 {
            return Hello::NeedMore;
        }
        if rest[0] != HANDSHAKE {
            return Hello::Malformed("a ClientHello record is followed by a non-handshake record");
        }
        if rest[1] != 3 {
            return Hello::Malformed("unknown TLS record version");
        }
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        if len == 0 || len > MAX_RECORD {
            return Hello::Malformed("bad TLS record length");
        }
        let Some(payload) = rest.get(5..5 + len) else {
            return Hello::NeedMore;
        };
        handshake.extend_from_slice(payload);
        rest = &rest[5 + len..];
        if need.is_none() && handshake.len() >= 4 {
            if handshake[0] != CLIENT_HELLO {
                return Hello::Malformed("the first handshake message is not a ClientHello");
            }
            let body = (usize::from(handshake[1]) << 16)
                | (usize::from(handshake[2]) << 8)
                | usize::from(handshake[3]);
            if body > MAX_HELLO {
                return Hello::Malformed("ClientHello is too large");
            }
            need = Some(body + 4);
        }
        if let Some(total) = need {
            if handshake.len() >= total {
                return match client_hello_sni(&handshake[..total]) {
                    Some(sni) => Hello::Sni(sni),
                    None => Hello::Malformed("malformed ClientHello"),
                };
            }
        }
        if handshake.len() > MAX_HELLO + 4 {
            return Hello::Malformed("ClientHello is too large");
        }
    }
}

/// The server name of a ClientHello handshake message (header and body), parsed by
/// `tls-parser` (a fuzzed parser made for this): `Some(None)` when it names none, `None`
/// when the message is malformed or names a server twice.
fn client_hello_sni(message: &[u8]) -> Option<Option<String>> {
    use tls_parser::{
        parse_tls_client_hello_extensions, parse_tls_message_handshake, SNIType, TlsExtension,
        TlsMessage, TlsMessageHandshake,
    };
    let body_len = message.len().checked_sub(4)?;
    let (rest, parsed) = parse_tls_message_handshake(message).ok()?;
    let TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello)) = parsed else {
        return None;
    };
    // Every byte of the body must be accounted for: the parser stops quietly at an
    // extension block that overruns the body, which a TLS server would refuse.
    let used = 2
        + 32
        + 1
        + hello.session_id.map_or(0, <[u8]>::len)
        + 2
        + 2 * hello.ciphers.len()
        + 1
        + hello.comp.len()
        + hello.ext.map_or(0, |e| 2 + e.len());
    if !rest.is_empty()
        || used != body_len
        || hello.ciphers.is_empty()
        || hello.comp.is_empty()
        || hello.session_id.is_some_and(|id| id.len() > 32)
    {
        return None;
    }
    let Some(extensions) = hello.ext else {
        return Some(None);
    };
    let (rest, parsed) = parse_tls_client_hello_extensions(extensions).ok()?;
    if !rest.is_empty() || !server_names_exact(extensions) {
        return None;
    }
    let extensions = parsed;
    let mut lists = extensions.iter().filter_map(|e| match e {
        TlsExtension::SNI(list) => Some(list),
        _ => None,
    });
    let Some(list) = lists.next() else {
        return Some(None);
    };
    if lists.next().is_some() {
        return None; // a duplicate extension
    }
    match list.iter().find(|(kind, _)| *kind == SNIType::HostName) {
        None => Some(None),
        Some((_, name)) => {
            let text = std::str::from_utf8(name).ok()?;
            if text.is_empty() || !text.is_ascii() {
                return None;
            }
            Some(Some(text.to_ascii_lowercase()))
        }
    }
}

/// Whether every server_name extension in the raw extension block `exts` is exactly a
/// list of whole entries with at most one host_name (RFC 6066, 3; OpenSSL and Go refuse
/// anything else). `tls-parser` stops quietly at an entry that overruns the list, so a
/// name followed by a truncated entry would otherwise pass for a well-formed hello.
fn server_names_exact(mut exts: &[u8]) -> bool {
    fn split_u16(b: &[u8]) -> Option<(usize, &[u8])> {
        let (n, rest) = b.split_first_chunk::<2>()?;
        Some((usize::from(u16::from_be_bytes(*n)), rest))
    }
    while !exts.is_empty() {
        let Some((kind, rest)) = split_u16(exts) else {
            return false;
        };
        let Some((len, rest)) = split_u16(rest) else {
            return false;
        };
        let Some((data, rest)) = rest.split_at_checked(len) else {
            return false;
        };
        exts = rest;
        if kind != 0 {
            continue;
        }
        let Some((list_len, mut list)) = split_u16(data) else {
            return false;
        };
        if list_len != list.len() {
            return false;
        }
        let mut host_names = 0;
        while let Some((&name_type, rest)) = list.split_first() {
            let Some((name_len, rest)) = split_u16(rest) else {
                return false;
            };
            let Some((_, rest)) = rest.split_at_checked(name_len) else {
                return false;
            };
            host_names += usize::from(name_type == 0);
            list = rest;
        }
        if host_names > 1 {
            return false;
        }
    }
    true
}

/// A fatal TLS alert (access_denied) to send before closing a refused tunnel, so the
/// client reports a TLS error instead of a silent reset.
pub(crate) const ACCESS_DENIED_ALERT: [u8; 7] = [0x15, 0x03, 0x01, 0x00, 0x02, 0x02, 49];

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal, well-formed ClientHello record carrying `sni` (or none).
    pub(crate) fn client_hello(sni: Option<&str>) -> Vec<u8> {
        let mut exts: Vec<u8> = Vec::new();
        // An unrelated extension first (supported_versions), as real clients send.
        exts.extend_from_slice(&[0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04]);
        if let Some(name) = sni {
            let n = name.as_bytes();
            let entry_len = 3 + n.len();
            exts.extend_from_slice(&0u16.to_be_bytes());
            exts.extend_from_slice(&((entry_len + 2) as u16).to_be_bytes());
            exts.extend_from_slice(&(entry_len as u16).to_be_bytes());
            exts.push(0);
            exts.extend_from_slice(&(n.len() as u16).to_be_bytes());
            exts.extend_from_slice(n);
        }
        let mut body: Vec<u8> = vec![0x03, 0x03];
        body.extend_from_slice(&[7u8; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]); // one cipher suite
        body.extend_from_slice(&[0x01, 0x00]); // null compression
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut hs = vec![CLIENT_HELLO];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut rec = vec![HANDSHAKE, 0x03, 0x01];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    #[test]
    fn finds_the_server_name() {
        let hello = client_hello(Some("Allowed.Test"));

        assert_eq!(inspect(&hello), Hello::Sni(Some("allowed.test".into())));
    }

    #[test]
    fn a_hello_without_sni_has_none() {
        assert_eq!(inspect(&client_hello(None)), Hello::Sni(None));
    }

    #[test]
    fn every_prefix_needs_more() {
        let hello = client_hello(Some("allowed.test"));

        for n in 0..hello.len() {
            assert_eq!(inspect(&hello[..n]), Hello::NeedMore, "prefix {n}");
        }
    }

    #[test]
    fn a_hello_split_over_two_records_is_read() {
        let one = client_hello(Some("split.test"));
        let hs = &one[5..];
        let (a, b) = hs.split_at(10);
        let mut two = Vec::new();
        for part in [a, b] {
            two.extend_from_slice(&[HANDSHAKE, 3, 1]);
            two.extend_from_slice(&(part.len() as u16).to_be_bytes());
            two.extend_from_slice(part);
        }

        assert_eq!(inspect(&two), Hello::Sni(Some("split.test".into())));
    }

    #[test]
    fn other_protocols_are_not_tls() {
        assert_eq!(inspect(b"SSH-2.0-OpenSSH_9.2\r\n"), Hello::NotTls);
        assert_eq!(inspect(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
    }

    #[test]
    fn garbage_after_the_record_header_is_malformed() {
        let mut bad = client_hello(Some("x.test"));
        bad[5] = 2; // ServerHello instead of ClientHello

        assert!(matches!(inspect(&bad), Hello::Malformed(_)));
    }

    #[test]
    fn truncated_lengths_inside_the_hello_are_malformed() {
        let mut bad = client_hello(Some("x.test"));
        let last = bad.len() - 1;
        bad.truncate(last);
        // Fix the outer lengths so only the inner SNI vector overruns.
        let hs_len = bad.len() - 5;
        bad[3..5].copy_from_slice(&(hs_len as u16).to_be_bytes());
        let body_len = (hs_len - 4) as u32;
        bad[6..9].copy_from_slice(&body_len.to_be_bytes()[1..]);

        assert!(matches!(inspect(&bad), Hello::Malformed(_)));
    }

    /// Rebuilds the record and handshake lengths after the body changed.
    fn fix_lengths(rec: &mut [u8]) {
        let hs_len = rec.len() - 5;
        rec[3..5].copy_from_slice(&(hs_len as u16).to_be_bytes());
        rec[6..9].copy_from_slice(&((hs_len - 4) as u32).to_be_bytes()[1..]);
    }

    #[test]
    fn two_server_name_extensions_or_bytes_after_them_are_malformed() {
        // The SNI extension is the last 15 bytes of the hello for "x.test" (4 + 2 + 3 + 6).
        let good = client_hello(Some("x.test"));
        let sni_ext = good[good.len() - 15..].to_vec();
        let ext_len_at = good.len() - 15 - 7 - 2;
        let mut twice = good.clone();
        twice.extend_from_slice(&sni_ext);
        let ext_len = u16::from_be_bytes([twice[ext_len_at], twice[ext_len_at + 1]]) + 15;
        twice[ext_len_at..ext_len_at + 2].copy_from_slice(&ext_len.to_be_bytes());
        fix_lengths(&mut twice);
        assert!(
            matches!(inspect(&twice), Hello::Malformed(_)),
            "{:?}",
            inspect(&twice)
        );

        let mut trailing = good.clone();
        trailing.push(0);
        fix_lengths(&mut trailing);
        assert!(matches!(inspect(&trailing), Hello::Malformed(_)));
        assert_eq!(inspect(&good), Hello::Sni(Some("x.test".into())));
    }

    /// A server_name list of `entries` (type, name) in a ClientHello record.
    fn hello_with_names(entries: &[(u8, &[u8])], list_extra: &[u8]) -> Vec<u8> {
        let mut list: Vec<u8> = Vec::new();
        for (kind, name) in entries {
            list.push(*kind);
            list.extend_from_slice(&(name.len() as u16).to_be_bytes());
            list.extend_from_slice(name);
        }
        list.extend_from_slice(list_extra);
        let mut rec = client_hello(Some("x"));
        // Replace the one-entry list ("x") at the end with ours, then fix the lengths.
        let ext_at = rec.len() - (4 + 2 + 3 + 1);
        rec.truncate(ext_at);
        rec.extend_from_slice(&[0, 0]);
        rec.extend_from_slice(&((list.len() + 2) as u16).to_be_bytes());
        rec.extend_from_slice(&(list.len() as u16).to_be_bytes());
        rec.extend_from_slice(&list);
        // The extensions block starts after the record and handshake headers, version,
        // random, empty session id, one cipher suite and one compression method.
        let exts_len = rec.len() - 52;
        rec[50..52].copy_from_slice(&(exts_len as u16).to_be_bytes());
        fix_lengths(&mut rec);
        rec
    }

    #[test]
    fn a_server_name_list_must_be_whole_entries_with_one_host_name() {
        let good = hello_with_names(&[(0, b"allowed.test")], &[]);
        // Found by the fuzz target sandbox/fuzz tls_client_hello: tls-parser stops at an
        // entry that overruns the list and keeps the names before it.
        let truncated = hello_with_names(&[(0, b"allowed.test")], &[0, 0xff, 0xf5, b'x']);
        let two_names = hello_with_names(&[(0, b"allowed.test"), (0, b"other.test")], &[]);
        let other_type = hello_with_names(&[(0, b"allowed.test"), (1, b"abc")], &[]);

        assert_eq!(inspect(&good), Hello::Sni(Some("allowed.test".into())));
        assert_eq!(
            inspect(&truncated),
            Hello::Malformed("malformed ClientHello")
        );
        assert_eq!(
            inspect(&two_names),
            Hello::Malformed("malformed ClientHello")
        );
        assert_eq!(
            inspect(&other_type),
            Hello::Sni(Some("allowed.test".into()))
        );
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 300) as usize;
            let mut buf = client_hello(Some("fuzz.test"));
            for i in 0..len.min(buf.len()) {
                let idx = (seed as usize).wrapping_mul(i + 1) % buf.len();
                buf[idx] = (seed >> (i % 56)) as u8;
            }
            let _ = inspect(&buf);
        }
    }
}
