//! Errors of framing and message decoding.

/// A frame or message could not be read, written or understood.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The underlying stream failed.
    #[error("i/o error on the agent stream")]
    Io(#[source] std::io::Error),
    /// A frame announced more bytes than the maximum frame size.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    FrameTooLarge {
        /// Announced size of the whole frame, length prefix included.
        len: u64,
        /// The maximum in force.
        max: u32,
    },
    /// A frame announced fewer bytes than its own header.
    #[error("frame length {len} is shorter than the frame header")]
    FrameTooShort {
        /// The announced length.
        len: u32,
    },
    /// The frame kind byte is not one we know.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({have} of {want} bytes)")]
    Truncated {
        /// Bytes of the frame that arrived.
        have: usize,
        /// Bytes the frame needed.
        want: usize,
    },
    /// An earlier error left the stream without frame boundaries.
    #[error("stream out of sync after an earlier framing error")]
    Desynced,
    /// A control frame did not hold a valid JSON control message.
    #[error("malformed control message")]
    Json(#[source] serde_json::Error),
    /// A data frame arrived where a control frame was expected.
    #[error("expected a control frame, got a {0} frame")]
    NotControl(&'static str),
    /// A well-formed message carries a value that is not allowed.
    #[error("invalid message: {0}")]
    Invalid(String),
    /// The peer speaks another protocol version.
    #[error("protocol version mismatch: we speak {ours}, the peer speaks {theirs}")]
    VersionMismatch {
        /// Our version.
        ours: u32,
        /// The peer's version.
        theirs: u32,
    },
}
