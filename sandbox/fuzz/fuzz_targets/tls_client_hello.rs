//! Fuzz the proxy's look at the first bytes of a tunnel (`proxy::tls::inspect`): the
//! record gathering and the ClientHello server name, against a model written from RFC 8446
//! (4.1.2) and RFC 6066 (3) here.
//!
//! Checks: no panic; a server name it returns is non-empty lowercase ASCII and is the one
//! the model finds (the proxy must never see another name than a TLS server would); and
//! the answer does not depend on how the bytes arrive: a prefix of the input gives either
//! "need more" or the same answer (the relay inspects the bytes as they come in).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sandbox::proxy::fuzzing::{inspect_tls, TlsHello};

/// Reads big-endian fields off the front of a slice.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<usize> {
        Some(usize::from(*self.take(1)?.first()?))
    }
    fn u16(&mut self) -> Option<usize> {
        let b = self.take(2)?;
        Some(usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(n)
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(n)
    }
}

/// The model: the server name of a complete ClientHello handshake message (header and
/// body), `Some(None)` when it names none, `None` when it is malformed (with the proxy's
/// own stricter rules: at least one cipher suite and one compression method, a session id
/// of at most 32 bytes, one server_name extension at most, with one host_name at most).
fn model_sni(message: &[u8]) -> Option<Option<String>> {
    let mut m = Cursor(message);
    if m.u8()? != 1 {
        return None;
    }
    let len = (m.u8()? << 16) | m.u16()?;
    let mut body = Cursor(m.take(len)?);
    if !m.0.is_empty() {
        return None;
    }
    body.take(2 + 32)?; // legacy_version, random
    if body.vec8()?.len() > 32 {
        return None;
    }
    let suites = body.vec16()?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return None;
    }
    if body.vec8()?.is_empty() {
        return None;
    }
    if body.0.is_empty() {
        return Some(None);
    }
    let mut exts = Cursor(body.vec16()?);
    if !body.0.is_empty() {
        return None;
    }
    let mut sni: Option<Option<String>> = None;
    while !exts.0.is_empty() {
        let kind = exts.u16()?;
        let data = exts.vec16()?;
        if kind != 0 {
            continue;
        }
        if sni.is_some() {
            return None;
        }
        let mut ext = Cursor(data);
        let mut list = Cursor(ext.vec16()?);
        if !ext.0.is_empty() {
            return None;
        }
        let mut name = None;
        while !list.0.is_empty() {
            let kind = list.u8()?;
            let entry = list.vec16()?;
            if kind == 0 {
                if name.is_some() {
                    return None; // one host_name at most (RFC 6066; OpenSSL, Go)
                }
                name = Some(entry);
            }
        }
        sni = Some(match name {
            None => None,
            Some(n) if n.is_empty() || !n.is_ascii() => return None,
            Some(n) => Some(String::from_utf8(n.to_ascii_lowercase()).ok()?),
        });
    }
    Some(sni.flatten())
}

/// The handshake message the records at the start of `buf` carry, if they carry a whole
/// ClientHello (the proxy's record rules: handshake records of version 3.x, 1 to 18432
/// bytes each).
fn model_message(buf: &[u8]) -> Option<Vec<u8>> {
    let mut rest = Cursor(buf);
    let mut handshake = Vec::new();
    loop {
        if rest.u8()? != 0x16 || rest.u8()? != 3 {
            return None;
        }
        rest.u8()?;
        let payload = rest.vec16()?;
        if payload.is_empty() || payload.len() > (1 << 14) + 2048 {
            return None;
        }
        handshake.extend_from_slice(payload);
        if handshake.len() >= 4 {
            let len = (usize::from(handshake[1]) << 16)
                | (usize::from(handshake[2]) << 8)
                | usize::from(handshake[3]);
            if handshake.len() >= len + 4 {
                handshake.truncate(len + 4);
                return Some(handshake);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let answer = inspect_tls(data);
    if let TlsHello::Sni(Some(name)) = &answer {
        assert!(!name.is_empty() && name.is_ascii());
        assert_eq!(name, &name.to_ascii_lowercase());
    }
    if let TlsHello::Sni(sni) = &answer {
        let message = model_message(data).expect("the model finds the ClientHello");
        assert_eq!(
            model_sni(&message).as_ref(),
            Some(sni),
            "the proxy and the model read different server names"
        );
    }
    // A few prefixes, at cut points the input's own bytes pick.
    for &b in data.iter().take(4) {
        let cut = usize::from(b) * data.len() / 256;
        let early = inspect_tls(&data[..cut]);
        assert!(
            early == TlsHello::NeedMore || early == answer,
            "the first {cut} bytes give {early:?}, all of them {answer:?}"
        );
    }
});
