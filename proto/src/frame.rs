//! Length-prefixed frames: encoding, a blocking reader and writer, and an incremental
//! decoder for event loops.

use std::io::{ErrorKind, Read, Write};

use crate::{Control, ProtoError, DEFAULT_MAX_FRAME};

/// Bytes of the big-endian length prefix.
pub const LENGTH_PREFIX_LEN: usize = 4;

/// Bytes of the whole header: length prefix, kind, stream id.
pub const FRAME_HEADER_LEN: usize = LENGTH_PREFIX_LEN + 1 + 4;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// One JSON [`Control`] message.
    Control = 1,
    /// Bytes for a process's standard input (host to agent).
    Stdin = 2,
    /// Bytes a process wrote to standard output (agent to host).
    Stdout = 3,
    /// Bytes a process wrote to standard error (agent to host).
    Stderr = 4,
}

impl FrameKind {
    /// The kind for a wire byte.
    pub fn from_byte(byte: u8) -> Result<Self, ProtoError> {
        match byte {
            1 => Ok(Self::Control),
            2 => Ok(Self::Stdin),
            3 => Ok(Self::Stdout),
            4 => Ok(Self::Stderr),
            other => Err(ProtoError::UnknownKind(other)),
        }
    }

    /// A short name for messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Control => "control",
            Self::Stdin => "stdin",
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
        }
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What the payload is.
    pub kind: FrameKind,
    /// The exec the data belongs to (0 for control frames).
    pub stream: u32,
    /// The payload bytes.
    pub payload: Vec<u8>,
}

impl Frame {
    /// Parses the payload of a control frame.
    pub fn to_control(&self) -> Result<Control, ProtoError> {
        if self.kind != FrameKind::Control {
            return Err(ProtoError::NotControl(self.kind.name()));
        }
        Control::from_json(&self.payload)
    }
}

/// Checks the announced length (the value of the length prefix) against `max_frame`.
fn check_length(len: u32, max_frame: u32) -> Result<usize, ProtoError> {
    let total = u64::from(len) + LENGTH_PREFIX_LEN as u64;
    if total > u64::from(max_frame) {
        return Err(ProtoError::FrameTooLarge {
            len: total,
            max: max_frame,
        });
    }
    if (len as usize) < FRAME_HEADER_LEN - LENGTH_PREFIX_LEN {
        return Err(ProtoError::FrameTooShort { len });
    }
    Ok(len as usize)
}

/// Parses the body of a frame (everything after the length prefix).
fn parse_body(body: &[u8]) -> Result<Frame, ProtoError> {
    let (head, payload) = body.split_at_checked(5).ok_or(ProtoError::FrameTooShort {
        len: body.len() as u32,
    })?;
    let kind = FrameKind::from_byte(head[0])?;
    let stream = u32::from_be_bytes([head[1], head[2], head[3], head[4]]);
    Ok(Frame {
        kind,
        stream,
        payload: payload.to_vec(),
    })
}

/// Appends one encoded frame to `out`, refusing payloads that would exceed `max_frame`.
pub fn encode_frame(
    out: &mut Vec<u8>,
    kind: FrameKind,
    stream: u32,
    payload: &[u8],
    max_frame: u32,
) -> Result<(), ProtoError> {
    let total = payload.len() as u64 + FRAME_HEADER_LEN as u64;
    if total > u64::from(max_frame) {
        return Err(ProtoError::FrameTooLarge {
            len: total,
            max: max_frame,
        });
    }
    let len = (total as usize - LENGTH_PREFIX_LEN) as u32;
    out.reserve(total as usize);
    out.extend_from_slice(&len.to_be_bytes());
    out.push(kind as u8);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    Ok(())
}

/// Appends one control frame holding `msg` to `out`.
pub fn encode_control(out: &mut Vec<u8>, msg: &Control, max_frame: u32) -> Result<(), ProtoError> {
    let json = msg.to_json()?;
    encode_frame(out, FrameKind::Control, 0, &json, max_frame)
}

/// Reads whole frames from a blocking stream.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    max_frame: u32,
    desynced: bool,
}

impl<R: Read> FrameReader<R> {
    /// A reader that accepts frames up to [`DEFAULT_MAX_FRAME`].
    pub fn new(inner: R) -> Self {
        Self::with_max_frame(inner, DEFAULT_MAX_FRAME)
    }

    /// A reader that accepts frames up to `max_frame` bytes.
    pub fn with_max_frame(inner: R, max_frame: u32) -> Self {
        Self {
            inner,
            max_frame,
            desynced: false,
        }
    }

    /// Changes the maximum (after the handshake).
    pub fn set_max_frame(&mut self, max_frame: u32) {
        self.max_frame = max_frame;
    }

    /// The maximum in force.
    pub fn max_frame(&self) -> u32 {
        self.max_frame
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// Reads the next frame; `Ok(None)` when the stream ends cleanly between frames.
    ///
    /// A read timeout (`WouldBlock`/`TimedOut`) before the first byte of a frame leaves
    /// the reader usable; any other error leaves it failed ([`ProtoError::Desynced`]).
    pub fn read_frame(&mut self) -> Result<Option<Frame>, ProtoError> {
        if self.desynced {
            return Err(ProtoError::Desynced);
        }
        let mut prefix = [0u8; LENGTH_PREFIX_LEN];
        match read_full(&mut self.inner, &mut prefix) {
            Ok(0) => return Ok(None),
            Ok(n) if n < prefix.len() => {
                self.desynced = true;
                return Err(ProtoError::Truncated {
                    have: n,
                    want: prefix.len(),
                });
            }
            Ok(_) => {}
            Err((0, e)) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(ProtoError::Io(e));
            }
            Err((_, e)) => {
                self.desynced = true;
                return Err(ProtoError::Io(e));
            }
        }
        let result = self.read_body(u32::from_be_bytes(prefix));
        if result.is_err() {
            self.desynced = true;
        }
        result.map(Some)
    }

    fn read_body(&mut self, len: u32) -> Result<Frame, ProtoError> {
        let len = check_length(len, self.max_frame)?;
        let mut body = vec![0u8; len];
        let got = read_full(&mut self.inner, &mut body).map_err(|(_, e)| ProtoError::Io(e))?;
        if got < len {
            return Err(ProtoError::Truncated {
                have: got + LENGTH_PREFIX_LEN,
                want: len + LENGTH_PREFIX_LEN,
            });
        }
        parse_body(&body)
    }
}

/// Reads until `buf` is full or the stream ends; returns the bytes read, or the bytes
/// read before an error together with the error.
fn read_full(inner: &mut impl Read, buf: &mut [u8]) -> Result<usize, (usize, std::io::Error)> {
    let mut filled = 0;
    while filled < buf.len() {
        match inner.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err((filled, e)),
        }
    }
    Ok(filled)
}

/// Writes whole frames to a blocking stream.
#[derive(Debug)]
pub struct FrameWriter<W> {
    inner: W,
    max_frame: u32,
    buf: Vec<u8>,
}

impl<W: Write> FrameWriter<W> {
    /// A writer that sends frames up to [`DEFAULT_MAX_FRAME`].
    pub fn new(inner: W) -> Self {
        Self::with_max_frame(inner, DEFAULT_MAX_FRAME)
    }

    /// A writer that sends frames up to `max_frame` bytes.
    pub fn with_max_frame(inner: W, max_frame: u32) -> Self {
        Self {
            inner,
            max_frame,
            buf: Vec::new(),
        }
    }

    /// Changes the maximum (after the handshake).
    pub fn set_max_frame(&mut self, max_frame: u32) {
        self.max_frame = max_frame;
    }

    /// The maximum in force.
    pub fn max_frame(&self) -> u32 {
        self.max_frame
    }

    /// The largest payload one frame can carry under the maximum in force.
    pub fn max_payload(&self) -> usize {
        (self.max_frame as usize).saturating_sub(FRAME_HEADER_LEN)
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// Writes one frame and flushes.
    pub fn write_frame(
        &mut self,
        kind: FrameKind,
        stream: u32,
        payload: &[u8],
    ) -> Result<(), ProtoError> {
        self.buf.clear();
        encode_frame(&mut self.buf, kind, stream, payload, self.max_frame)?;
        self.send_buf()
    }

    /// Writes one control message and flushes.
    pub fn write_control(&mut self, msg: &Control) -> Result<(), ProtoError> {
        self.buf.clear();
        encode_control(&mut self.buf, msg, self.max_frame)?;
        self.send_buf()
    }

    fn send_buf(&mut self) -> Result<(), ProtoError> {
        self.inner.write_all(&self.buf).map_err(ProtoError::Io)?;
        self.inner.flush().map_err(ProtoError::Io)
    }
}

/// An incremental frame decoder: feed it bytes as they arrive, take frames out.
///
/// It keeps at most one partial frame plus the bytes of the last [`Decoder::feed`]; a
/// frame's length is checked against the maximum as soon as its prefix is in, before
/// any allocation for it. After an error it stays failed ([`ProtoError::Desynced`]).
#[derive(Debug)]
pub struct Decoder {
    max_frame: u32,
    buf: Vec<u8>,
    start: usize,
    failed: bool,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME)
    }
}

impl Decoder {
    /// A decoder that accepts frames up to `max_frame` bytes.
    pub fn new(max_frame: u32) -> Self {
        Self {
            max_frame,
            buf: Vec::new(),
            start: 0,
            failed: false,
        }
    }

    /// Changes the maximum (after the handshake).
    pub fn set_max_frame(&mut self, max_frame: u32) {
        self.max_frame = max_frame;
    }

    /// Appends `data` and returns an iterator over the frames now complete. Frames the
    /// iterator does not take stay buffered for the next call.
    pub fn feed(&mut self, data: &[u8]) -> Frames<'_> {
        self.push(data);
        Frames { decoder: self }
    }

    /// Appends `data` without decoding.
    pub fn push(&mut self, data: &[u8]) {
        if self.failed {
            return;
        }
        if self.start > 0 && (self.start == self.buf.len() || self.start >= self.buf.len() / 2) {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Whether an error has stopped the decoder.
    pub fn is_failed(&self) -> bool {
        self.failed
    }

    /// Takes the next complete frame, if there is one.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ProtoError> {
        if self.failed {
            return Err(ProtoError::Desynced);
        }
        let result = self.next_frame_inner();
        if result.is_err() {
            self.failed = true;
            self.buf = Vec::new();
            self.start = 0;
        }
        result
    }

    fn next_frame_inner(&mut self) -> Result<Option<Frame>, ProtoError> {
        let avail = &self.buf[self.start..];
        let Some((prefix, rest)) = avail.split_first_chunk::<LENGTH_PREFIX_LEN>() else {
            return Ok(None);
        };
        let len = check_length(u32::from_be_bytes(*prefix), self.max_frame)?;
        let Some(body) = rest.get(..len) else {
            return Ok(None);
        };
        let frame = parse_body(body)?;
        self.start += LENGTH_PREFIX_LEN + len;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        Ok(Some(frame))
    }

    /// Call when the stream has ended: an error if it ended inside a frame.
    pub fn finish(&self) -> Result<(), ProtoError> {
        let have = self.buffered();
        if self.failed || have == 0 {
            return Ok(());
        }
        let want = self.buf[self.start..]
            .first_chunk::<LENGTH_PREFIX_LEN>()
            .map_or(LENGTH_PREFIX_LEN, |p| {
                u32::from_be_bytes(*p) as usize + LENGTH_PREFIX_LEN
            });
        Err(ProtoError::Truncated { have, want })
    }
}

/// Iterator over the complete frames of a [`Decoder`]; yields an error at most once.
#[derive(Debug)]
pub struct Frames<'a> {
    decoder: &'a mut Decoder,
}

impl Iterator for Frames<'_> {
    type Item = Result<Frame, ProtoError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.decoder.failed {
            return None;
        }
        self.decoder.next_frame().transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(kind: FrameKind, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_frame(&mut out, kind, stream, payload, DEFAULT_MAX_FRAME).unwrap();
        out
    }

    #[test]
    fn frame_layout_is_length_kind_stream_payload() {
        let bytes = encoded(FrameKind::Stdout, 7, b"hi");

        assert_eq!(bytes, [0, 0, 0, 7, 3, 0, 0, 0, 7, b'h', b'i']);
    }

    #[test]
    fn reader_round_trips_frames_and_ends_cleanly() {
        let mut bytes = encoded(FrameKind::Stdin, 1, b"abc");
        bytes.extend(encoded(FrameKind::Stderr, 2, b""));
        let mut reader = FrameReader::new(&bytes[..]);

        let first = reader.read_frame().unwrap().unwrap();
        let second = reader.read_frame().unwrap().unwrap();
        let end = reader.read_frame().unwrap();

        assert_eq!(
            (first.kind, first.stream, first.payload),
            (FrameKind::Stdin, 1, b"abc".to_vec())
        );
        assert_eq!((second.kind, second.payload.len()), (FrameKind::Stderr, 0));
        assert!(end.is_none());
    }

    #[test]
    fn reader_rejects_oversized_frame_before_reading_it() {
        let bytes = [0xff, 0xff, 0xff, 0xff, 1];
        let mut reader = FrameReader::with_max_frame(&bytes[..], 1024);

        let err = reader.read_frame().unwrap_err();

        assert!(matches!(err, ProtoError::FrameTooLarge { max: 1024, .. }));
    }

    #[test]
    fn reader_reports_truncated_body() {
        let bytes = encoded(FrameKind::Stdout, 1, b"hello");
        let mut reader = FrameReader::new(&bytes[..bytes.len() - 1]);

        let err = reader.read_frame().unwrap_err();

        assert!(matches!(err, ProtoError::Truncated { have: 13, want: 14 }));
    }

    #[test]
    fn reader_reports_truncated_prefix() {
        let mut reader = FrameReader::new(&[0u8, 0][..]);

        let err = reader.read_frame().unwrap_err();

        assert!(matches!(err, ProtoError::Truncated { have: 2, want: 4 }));
    }

    #[test]
    fn reader_stays_failed_after_error() {
        let mut bytes = vec![0, 0, 0, 5, 99, 0, 0, 0, 0];
        bytes.extend(encoded(FrameKind::Stdout, 1, b"x"));
        let mut reader = FrameReader::new(&bytes[..]);

        let first = reader.read_frame().unwrap_err();
        let second = reader.read_frame().unwrap_err();

        assert!(matches!(first, ProtoError::UnknownKind(99)));
        assert!(matches!(second, ProtoError::Desynced));
    }

    #[test]
    fn short_length_is_rejected() {
        let bytes = [0u8, 0, 0, 4, 1, 0, 0, 0];
        let mut reader = FrameReader::new(&bytes[..]);

        let err = reader.read_frame().unwrap_err();

        assert!(matches!(err, ProtoError::FrameTooShort { len: 4 }));
    }

    #[test]
    fn writer_refuses_payload_over_max() {
        let mut out = Vec::new();
        let mut writer = FrameWriter::with_max_frame(&mut out, 100);

        let err = writer
            .write_frame(FrameKind::Stdout, 1, &[0u8; 92])
            .unwrap_err();

        assert!(matches!(
            err,
            ProtoError::FrameTooLarge { len: 101, max: 100 }
        ));
    }

    #[test]
    fn writer_accepts_payload_exactly_at_max() {
        let mut out = Vec::new();
        let mut writer = FrameWriter::with_max_frame(&mut out, 100);

        writer
            .write_frame(FrameKind::Stdout, 1, &[0u8; 91])
            .unwrap();

        assert_eq!(out.len(), 100);
    }

    #[test]
    fn decoder_yields_frames_split_at_every_byte() {
        let mut bytes = encoded(FrameKind::Stdout, 9, b"split me");
        bytes.extend(encoded(FrameKind::Stderr, 9, b"and me"));
        let mut decoder = Decoder::default();

        let frames: Vec<Frame> = bytes
            .iter()
            .flat_map(|b| decoder.feed(std::slice::from_ref(b)).collect::<Vec<_>>())
            .map(Result::unwrap)
            .collect();

        assert_eq!(frames.len(), 2);
        assert_eq!(frames[1].payload, b"and me");
        assert_eq!(decoder.buffered(), 0);
    }

    #[test]
    fn decoder_rejects_oversized_length_before_the_body_arrives() {
        let mut decoder = Decoder::new(64);

        let results: Vec<_> = decoder.feed(&[0, 0, 1, 0]).collect();

        assert!(matches!(
            results.as_slice(),
            [Err(ProtoError::FrameTooLarge { len: 260, max: 64 })]
        ));
        assert!(decoder.is_failed());
    }

    #[test]
    fn decoder_keeps_untaken_frames() {
        let mut bytes = encoded(FrameKind::Stdout, 1, b"a");
        bytes.extend(encoded(FrameKind::Stdout, 1, b"b"));
        let mut decoder = Decoder::default();

        let first = decoder.feed(&bytes).next().unwrap().unwrap();
        let second = decoder.feed(&[]).next().unwrap().unwrap();

        assert_eq!(
            (first.payload, second.payload),
            (b"a".to_vec(), b"b".to_vec())
        );
    }

    #[test]
    fn decoder_finish_reports_partial_frame() {
        let bytes = encoded(FrameKind::Stdout, 1, b"abc");
        let mut decoder = Decoder::default();
        decoder.push(&bytes[..6]);

        let err = decoder.finish().unwrap_err();

        assert!(matches!(err, ProtoError::Truncated { have: 6, want: 12 }));
    }

    #[test]
    fn decoder_rejects_unknown_kind_once_then_stops() {
        let mut decoder = Decoder::default();

        let results: Vec<_> = decoder.feed(&[0, 0, 0, 5, 0, 0, 0, 0, 1]).collect();
        let later = decoder.next_frame().unwrap_err();

        assert!(matches!(
            results.as_slice(),
            [Err(ProtoError::UnknownKind(0))]
        ));
        assert!(matches!(later, ProtoError::Desynced));
    }

    #[test]
    fn control_frame_parses_and_data_frame_does_not() {
        let mut bytes = Vec::new();
        encode_control(&mut bytes, &Control::Ping, DEFAULT_MAX_FRAME).unwrap();
        let frame = Decoder::default().feed(&bytes).next().unwrap().unwrap();
        let data = Frame {
            kind: FrameKind::Stdout,
            stream: 1,
            payload: Vec::new(),
        };

        let msg = frame.to_control().unwrap();
        let err = data.to_control().unwrap_err();

        assert_eq!(msg, Control::Ping);
        assert!(matches!(err, ProtoError::NotControl("stdout")));
    }
}
