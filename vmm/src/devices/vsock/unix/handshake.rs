//! The host half of the hybrid-vsock handshake: the `CONNECT <port>\n` line.
//!
//! The line is read one byte at a time so that nothing after the newline (the start of the
//! raw stream) is consumed here, it is checked as it arrives so garbage is refused at its
//! first wrong byte, and it may be at most [`MAX_LINE`] bytes long.

use std::io::{ErrorKind, Read};
use std::os::unix::net::UnixStream;
use std::time::Instant;

/// Longest accepted line, newline included (`CONNECT 4294967295\n` is 19 bytes).
pub const MAX_LINE: usize = 32;

const PREFIX: &[u8] = b"CONNECT ";
/// Decimal digits in `u32::MAX`.
const MAX_DIGITS: usize = 10;

/// Why a host's connect line was refused.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("connect line longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("malformed connect line, expected `CONNECT <port>\\n`")]
    Malformed,
    #[error("host closed the socket before finishing the connect line")]
    Eof,
    #[error("reading the connect line failed")]
    Io(#[source] std::io::Error),
}

/// Check a line received so far (no newline yet) could still become valid.
fn check_partial(line: &[u8]) -> Result<(), HandshakeError> {
    let (head, digits) = line.split_at(line.len().min(PREFIX.len()));
    let prefix_ok = PREFIX.starts_with(head);
    let digits_ok = digits.len() <= MAX_DIGITS && digits.iter().all(u8::is_ascii_digit);
    if prefix_ok && digits_ok {
        Ok(())
    } else {
        Err(HandshakeError::Malformed)
    }
}

/// Parse a complete line without its newline: `CONNECT <port>`, port a decimal u32.
pub fn parse_connect_line(line: &[u8]) -> Result<u32, HandshakeError> {
    let digits = line.strip_prefix(PREFIX).ok_or(HandshakeError::Malformed)?;
    if digits.is_empty() || digits.len() > MAX_DIGITS || !digits.iter().all(u8::is_ascii_digit) {
        return Err(HandshakeError::Malformed);
    }
    let value = digits
        .iter()
        .fold(0u64, |acc, d| acc * 10 + u64::from(d - b'0'));
    u32::try_from(value).map_err(|_| HandshakeError::Malformed)
}

/// A host connection that has not finished its connect line yet.
#[derive(Debug)]
pub struct Handshake {
    stream: UnixStream,
    line: [u8; MAX_LINE],
    len: usize,
    deadline: Instant,
}

impl Handshake {
    /// `stream` must be non-blocking.
    pub fn new(stream: UnixStream, deadline: Instant) -> Self {
        Self {
            stream,
            line: [0; MAX_LINE],
            len: 0,
            deadline,
        }
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    pub fn into_stream(self) -> UnixStream {
        self.stream
    }

    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Read what is available. `Ok(Some(port))`: the line is complete. `Ok(None)`: wait
    /// for more bytes.
    pub fn step(&mut self) -> Result<Option<u32>, HandshakeError> {
        loop {
            let mut byte = [0u8; 1];
            match self.stream.read(&mut byte) {
                Ok(0) => return Err(HandshakeError::Eof),
                Ok(_) if byte[0] == b'\n' => {
                    let line = self.line.get(..self.len).unwrap_or_default();
                    return parse_connect_line(line).map(Some);
                }
                Ok(_) => {
                    let slot = self.line.get_mut(self.len).ok_or(HandshakeError::TooLong)?;
                    *slot = byte[0];
                    self.len += 1;
                    if self.len >= MAX_LINE {
                        return Err(HandshakeError::TooLong);
                    }
                    check_partial(self.line.get(..self.len).unwrap_or_default())?;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(HandshakeError::Io(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    #[test]
    fn parses_valid_lines() {
        assert_eq!(parse_connect_line(b"CONNECT 1024").unwrap(), 1024);
        assert_eq!(parse_connect_line(b"CONNECT 0").unwrap(), 0);
        assert_eq!(parse_connect_line(b"CONNECT 4294967295").unwrap(), u32::MAX);
        assert_eq!(parse_connect_line(b"CONNECT 0000000052").unwrap(), 52);
    }

    #[test]
    fn refuses_malformed_lines() {
        let bad: [&[u8]; 11] = [
            b"",
            b"CONNECT",
            b"CONNECT ",
            b"connect 52",
            b"CONNECT  52",
            b"CONNECT +52",
            b"CONNECT -1",
            b"CONNECT 52 ",
            b"CONNECT 52\r",
            b"CONNECT 4294967296",
            b"CONNECT 99999999999",
        ];
        let errors = bad
            .iter()
            .filter(|l| parse_connect_line(l).is_err())
            .count();
        assert_eq!(errors, bad.len());
    }

    #[test]
    fn partial_check_stops_garbage_early() {
        assert!(check_partial(b"CONN").is_ok());
        assert!(check_partial(b"CONNECT 12").is_ok());
        assert!(check_partial(b"GET /").is_err());
        assert!(check_partial(b"CONNECT x").is_err());
        assert!(check_partial(b"CONNECT 12345678901").is_err());
    }

    fn handshake_with(bytes: &[u8]) -> (Handshake, UnixStream) {
        let (ours, mut host) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        host.write_all(bytes).unwrap();
        let hs = Handshake::new(ours, Instant::now() + Duration::from_secs(1));
        (hs, host)
    }

    #[test]
    fn step_stops_at_newline_and_leaves_the_rest() {
        let (mut hs, _host) = handshake_with(b"CONNECT 52\nraw bytes");

        let port = hs.step().unwrap();
        let mut rest = [0u8; 16];
        let n = hs.into_stream().read(&mut rest).unwrap();

        assert_eq!(port, Some(52));
        assert_eq!(&rest[..n], b"raw bytes");
    }

    #[test]
    fn step_waits_for_more_bytes() {
        let (mut hs, mut host) = handshake_with(b"CONNE");

        let first = hs.step().unwrap();
        host.write_all(b"CT 7\n").unwrap();
        let second = hs.step().unwrap();

        assert_eq!(first, None);
        assert_eq!(second, Some(7));
    }

    #[test]
    fn step_refuses_garbage_overlong_and_eof() {
        let (mut garbage, _h1) = handshake_with(b"HELLO\n");
        let (mut long, _h2) = handshake_with(b"CONNECT 000000000000000000000000000000001\n");
        let (mut eof, h3) = handshake_with(b"CONNECT 5");
        drop(h3);

        assert!(matches!(garbage.step(), Err(HandshakeError::Malformed)));
        assert!(matches!(long.step(), Err(HandshakeError::Malformed)));
        assert!(matches!(eof.step(), Err(HandshakeError::Eof)));
    }
}
